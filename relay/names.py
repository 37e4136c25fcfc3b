"""Domain names and DKIM selectors as the relay writes them: one rule for the config file,
the accounts and the DKIM signer, so a name one of them takes the others take too."""

from __future__ import annotations

import re

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"(?:{_LABEL}\.)+{_LABEL}")
# Selectors are dot-separated labels that may hold underscores (RFC 6376 §3.1).
_SELECTOR_LABEL = r"[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?"
_SELECTOR = re.compile(rf"{_SELECTOR_LABEL}(?:\.{_SELECTOR_LABEL})*")


def domain_name(text: str) -> str:
    """`text` as a domain: lower case, A-labels (IDNA), no final dot. ValueError unless it
    is a name of two or more labels."""
    name = text.strip().rstrip(".").lower()
    try:
        name = name if name.isascii() else name.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"{text!r} is not a domain name") from None
    if len(name) > 253 or not _DOMAIN.fullmatch(name):
        raise ValueError(f"{text!r} is not a domain name")
    return name


def selector_name(text: str) -> str:
    """`text` as a DKIM selector, lower case. ValueError unless it is one."""
    name = text.strip().lower()
    if len(name) > 253 or not _SELECTOR.fullmatch(name):
        raise ValueError(f"{text!r} is not a DKIM selector")
    return name
