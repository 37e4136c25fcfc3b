"""Durations as an operator writes them in config and on the command line: 180d, 12h, 6w, 1y.

The one parser for every such value (retention ages, suppression expiries, windows). Only
units that cannot be misread are taken: `m` is refused, since "6m" is read as six months as
often as six minutes, and retention kept for six minutes loses data.
"""

from __future__ import annotations

import re
from datetime import timedelta

from .errors import InvalidAge

_AGE = re.compile(r"\s*(\d+)\s*([a-z]+)\s*")
_DAY = timedelta(days=1)
# Months and years are fixed numbers of days: ages are counted, never calendar-aligned.
UNITS: dict[str, timedelta] = {
    "s": timedelta(seconds=1),
    "min": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": _DAY,
    "w": timedelta(weeks=1),
    "mo": 30 * _DAY,
    "y": 365 * _DAY,
}


def parse_age(text: str) -> timedelta:
    """`180d` -> 180 days. InvalidAge for anything else: zero, fractions, unknown units."""
    match = _AGE.fullmatch(text.lower()) if isinstance(text, str) else None
    if match and match.group(2) == "m":
        raise InvalidAge(text, " ('m' is ambiguous: write min for minutes or mo for months)")
    if not match or match.group(2) not in UNITS or int(match.group(1)) == 0:
        raise InvalidAge(str(text))
    try:
        return int(match.group(1)) * UNITS[match.group(2)]
    except OverflowError:
        raise InvalidAge(text) from None


def format_age(age: timedelta) -> str:
    """An age in the form `parse_age` reads back: whole years if it is some, else the largest
    of days, hours, minutes, seconds that divides it (so "180d" shows as 180d, not 6mo)."""
    for unit in ("y", "d", "h", "min"):
        if age % UNITS[unit] == timedelta(0) and age >= UNITS[unit]:
            return f"{age // UNITS[unit]}{unit}"
    return f"{int(age.total_seconds())}s"
