"""The From field read as receivers read it: RFC 5322 with its obsolete syntax, and nothing
left for a mail client, a DMARC check and the DKIM signer to read three different ways.

A header section may carry `From:`, `FROM:` or the obsolete `From :` (white space before
the colon, RFC 5322 §4.5); receivers take all of them for the From field. The value is
parsed by the email package's RFC 5322 parser (its header registry), which records a
defect wherever it had to guess; a guess is where readers part ways, so it is refused.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from email import errors
from email.message import Message
from email.policy import default

from .errors import RelayError
from .mime import header_fields

# Defects about the display name's words only: the address stays certain.
_HARMLESS = (errors.ObsoleteHeaderDefect, errors.UndecodableBytesDefect, errors.CharsetError)
_FOLD = re.compile(r"\r\n|\r|\n")
# A campaign's messages share one From field: its reading is kept, for fields of one line.
_CACHED_FIELD = 998


class AmbiguousFrom(RelayError, ValueError):
    """A From field that readers may take for different authors."""


@dataclass(frozen=True, slots=True)
class Author:
    local_part: str
    domain: str  # lowercased, as written otherwise (an address literal keeps its brackets)


def from_values(block: bytes) -> list[str]:
    """The value of every From field of a header section, obsolete spellings included.
    Text that is not UTF-8 is read as Latin-1, as old mail systems wrote it: a display
    name may come out garbled, an address cannot."""
    values = []
    for field in header_fields(block):
        if field.lname != "from":
            continue
        raw = field.raw.partition(b":")[2]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        values.append(text.strip(" \t\r\n"))
    return values


def authors(values: Iterable[str]) -> tuple[Author, ...]:
    """The mailboxes of a message's From field (`from_values`, unfolded here as RFC 5322
    §2.2.3 says); () when it has none, or a field without any address.

    Raises AmbiguousFrom for more than one From field, a value the parser had to guess
    at (two `@`, text after the address, an unclosed bracket or comment, a control
    character), or a mailbox without a local part or domain.
    """
    fields = [_FOLD.sub("", value) for value in values]
    if len(fields) > 1:
        raise AmbiguousFrom(f"{len(fields)} From fields (RFC 5322 allows one)")
    if not fields or "@" not in fields[0]:
        return ()  # no address at all: nothing to read two ways, no author domain
    field = fields[0]
    found = _read_cached(field) if len(field) <= _CACHED_FIELD else _read(field)
    if isinstance(found, str):
        raise AmbiguousFrom(found)
    return found


@functools.lru_cache(maxsize=256)
def _read_cached(field: str) -> tuple[Author, ...] | str:
    return _read(field)


def _read(field: str) -> tuple[Author, ...] | str:
    """The authors of one unfolded From value, or why readers may disagree about them."""
    try:
        header = default.header_factory("From", field)
        parsed = header.addresses
    except Exception:  # the email parser raises many kinds on garbage
        return "From field cannot be parsed"
    doubts = [d for d in header.defects if not isinstance(d, _HARMLESS)]
    if doubts:
        return f"From field is malformed ({doubts[0]})"
    found = []
    for address in parsed:
        if not address.username or not address.domain:
            return "From field has a mailbox without a local part or domain"
        if "@" in address.username:
            return "From field has an address with two @"
        found.append(Author(address.username, address.domain.lower()))
    return tuple(found)


def from_domains(headers: Message) -> set[str]:
    """The domains of a parsed header section's From addresses; none when it is ambiguous."""
    try:
        return {author.domain for author in authors(headers.get_all("From") or [])}
    except AmbiguousFrom:
        return set()
