"""Ages as an operator writes them in config and on the command line: 180d, 12h, 6w, 1y."""

from __future__ import annotations

import re
from datetime import timedelta

from .errors import InvalidAge

_AGE = re.compile(r"^\s*(\d+)\s*([smhdwy])\s*$")
_UNIT = {
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
    # A year is 365 days: retention periods are counted in days, never calendar-aligned.
    "y": timedelta(days=365),
}


def parse_age(text: str) -> timedelta:
    """`180d` -> 180 days. Raises InvalidAge for anything else, zero included."""
    match = _AGE.match(text.lower()) if isinstance(text, str) else None
    if not match or int(match.group(1)) == 0:
        raise InvalidAge(str(text))
    try:
        return int(match.group(1)) * _UNIT[match.group(2)]
    except OverflowError:
        raise InvalidAge(text) from None
