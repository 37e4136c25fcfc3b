"""The MIME tree of a message as byte ranges: its leaves, and the subtrees never to be opened."""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message

from ..mime import (
    UNTOUCHABLE_TYPES,
    Buffer,
    MimeLimits,
    entity_bounds,
    header_fields,
    parameters,
    walk_entities,
)

__all__ = ["UNTOUCHABLE_TYPES", "Appendable", "Leaf", "Sealed", "Tree", "appendable", "walk"]

DECORATED_TYPES = frozenset({"text/plain", "text/html"})


@dataclass(frozen=True, slots=True)
class Leaf:
    """A part with content: where its header block and body are in the message."""

    headers: Message
    ctype: str  # asked of the headers once: the email package parses it anew on each call
    cte: str
    header_start: int
    body_start: int
    body_end: int
    cte_field: tuple[int, int] | None  # the Content-Transfer-Encoding field's bytes, if any
    decorable: bool  # inline text/plain or text/html with a body, not an attachment


@dataclass(frozen=True, slots=True)
class Sealed:
    """A subtree left exactly as it is."""

    ctype: str
    start: int
    end: int


@dataclass(slots=True)
class Tree:
    leaves: list[Leaf]
    sealed: list[Sealed]


def walk(raw: bytes, headers: Message | None = None, limits: MimeLimits | None = None) -> Tree:
    """Every leaf and sealed subtree of `raw`, in order; MimeError if the structure is broken,
    MimeLimitError past `limits`. `headers`: the message's own header block, parsed already."""
    tree = Tree([], [])
    for entity in walk_entities(raw, headers, limits):
        if entity.sealed:
            tree.sealed.append(Sealed(entity.ctype, entity.body_start, entity.end))
            continue
        headers_ = entity.headers
        tree.leaves.append(
            Leaf(
                headers_,
                entity.ctype,
                str(headers_.get("Content-Transfer-Encoding") or "7bit").strip().lower(),
                entity.start,
                entity.body_start,
                entity.end,
                _cte_field(raw[entity.start : entity.header_end], entity.start),
                entity.ctype in DECORATED_TYPES
                and headers_.get_content_disposition() != "attachment"
                # A part that is all headers has nowhere to put text: the footer would run
                # into its last header line. The message itself gets a blank line added.
                and (entity.separated or entity.start == 0),
            )
        )
    return tree


@dataclass(frozen=True, slots=True)
class Appendable:
    """Where a part can be added at the end of the message's own multipart/mixed."""

    at: int  # the start of the close delimiter line, or the end of the message
    boundary: bytes
    closed: bool  # False: no close delimiter; the added part brings one


def appendable(raw: Buffer, headers: Message) -> Appendable | None:
    """Where a text part can join a top-level multipart/mixed (None for any other shape).
    Reads only the top level: the parts' own structure may be what defeated the rewrite.
    With an unreadable top level (no delimiter at all) nothing is added."""
    if headers.get_content_type() != "multipart/mixed":
        return None
    boundary = parameters(headers).get("boundary")
    if not isinstance(boundary, str) or not boundary.strip():
        return None
    boundary = boundary.rstrip()
    _, body_start = entity_bounds(raw)
    delimiter = b"--" + boundary.encode("latin-1")
    close = _close_delimiter(raw, delimiter, body_start)
    if close is not None:
        return Appendable(close, delimiter, True)
    opened = raw[body_start : body_start + len(delimiter)] == delimiter
    if not opened and raw.find(b"\n" + delimiter, body_start) < 0:
        return None
    return Appendable(len(raw), delimiter, False)


def _close_delimiter(raw: Buffer, delimiter: bytes, start: int) -> int | None:
    """The first close delimiter line at the message's top level."""
    close = delimiter + b"--"
    at = raw.find(close, start)
    while at >= 0:
        line_start = at == start or raw[at - 1 : at] == b"\n"
        line_end = raw.find(b"\n", at)
        rest = bytes(raw[at + len(close) : len(raw) if line_end < 0 else line_end])
        if line_start and not rest.strip(b"\r\t "):
            return at
        at = raw.find(close, at + len(close))
    return None


def _cte_field(block: bytes, offset: int) -> tuple[int, int] | None:
    for field_ in header_fields(block):
        if field_.lname == "content-transfer-encoding":
            return offset, offset + len(field_.raw)
        offset += len(field_.raw)
    return None
