"""A changed text part, compiled once into the chunks its transfer encoding renders from.

Edits are found in the decoded text. Each constant stretch between them is encoded back into the
part's charset on its own; for the stateless charsets mail uses that gives exactly the sender's
bytes (checked), so the edits map to byte offsets and every byte outside them is the sender's.
A stateful charset (ISO-2022-JP) may shift differently at an edit: the part is then re-encoded
whole from its text, same charset and transfer encoding, and a note says so.
"""

from __future__ import annotations

import binascii
import codecs
from collections.abc import Sequence
from dataclasses import dataclass

from ..mime import MimeError
from ._encoding import (
    B64_LINE,
    CachedRun,
    base64_body,
    base64_lines,
    line_ending,
    qp_encode,
    qp_lines,
)
from ._footer import Edit
from ._parts import Base64Part, Chunk, Dirty, Hole, LinkHole, QPPart, RawPart, Slot

CACHE_RUN = 4096  # constant base64 runs at least this long are encoded once per phase
ENCODINGS = frozenset({"7bit", "8bit", "binary", "quoted-printable", "base64"})
_PROBE = '<a href="x">-- %</a>\r\n:/?#&;=+~_.'


@dataclass(frozen=True, slots=True)
class ByteEdit:
    start: int
    end: int
    chunks: tuple[Chunk, ...]


@dataclass(slots=True)
class Decoded:
    """A leaf's body undone: transfer encoding, then charset."""

    data: bytes
    text: str
    charset: str


def decode(body: bytes, cte: str, charset: str) -> Decoded:
    if cte not in ENCODINGS:
        raise MimeError(f"unknown transfer encoding {cte!r}")
    if cte == "base64":
        data = base64_body(body).decoded
    elif cte == "quoted-printable":
        data = binascii.a2b_qp(body)  # what qp_lines counts its lines' starts back from
    else:
        if cte == "7bit" and not body.isascii():
            raise MimeError("8-bit data in a part declared 7bit")
        data = body
    try:
        codecs.lookup(charset)
        text = data.decode(charset)
    except LookupError as exc:
        raise MimeError(f"unknown charset {charset!r}") from exc
    except UnicodeDecodeError as exc:
        raise MimeError(f"not valid {charset} ({exc.reason} at byte {exc.start})") from exc
    if _PROBE.encode(charset, "replace") != _PROBE.encode("ascii"):
        raise MimeError(f"charset {charset!r} does not keep ASCII as it is")
    return Decoded(data, text, charset)


def byte_edits(
    decoded: Decoded, edits: Sequence[Edit], html: bool
) -> tuple[bytes, list[ByteEdit], bool]:
    """(decoded bytes to edit, the edits at byte offsets, whether those bytes are the sender's)."""
    text, charset = decoded.text, decoded.charset
    pieces: list[bytes] = []
    out: list[ByteEdit] = []
    cursor = 0
    offset = 0
    for edit in edits:
        before = text[cursor : edit.start].encode(charset)
        replaced = text[edit.start : edit.end].encode(charset)
        pieces += [before, replaced]
        offset += len(before)
        chunks = tuple(
            Slot(item, html, charset) if isinstance(item, Hole | LinkHole) else item.encode(charset)
            for item in edit.replacement
        )
        out.append(ByteEdit(offset, offset + len(replaced), chunks))
        offset += len(replaced)
        cursor = edit.end
    pieces.append(text[cursor:].encode(charset))
    data = b"".join(pieces)
    return data, out, data == decoded.data


def apply(
    data: bytes, edits: Sequence[ByteEdit], start: int = 0, end: int | None = None
) -> list[Chunk]:
    """data[start:end] with the edits inside that range applied.

    Ranges are half-open: an insertion at `end` belongs to the next range; with no `end` the
    range runs to the end of the data, insertions there included.
    """
    stop = len(data) if end is None else end
    chunks: list[Chunk] = []
    cursor = start
    for edit in edits:
        if edit.start < start or edit.end > stop:
            continue
        if edit.start == stop and end is not None:
            continue
        chunks.append(data[cursor : edit.start])
        chunks.extend(edit.chunks)
        cursor = edit.end
    chunks.append(data[cursor:stop])
    return [c for c in chunks if c != b""]


def raw_part(body: bytes, data: bytes, edits: Sequence[ByteEdit]) -> RawPart:
    """The part as 7bit/8bit text, knowing which of its lines hold a hole and their width."""
    chunks = apply(data, edits)
    hole_lines: list[tuple[int, tuple[Slot, ...]]] = []
    width = 0
    slots: list[Slot] = []
    for chunk in chunks:
        if isinstance(chunk, Slot):
            slots.append(chunk)
            continue
        lf = chunk.find(b"\n")
        if lf < 0:
            width += len(chunk)
            continue
        if slots:
            hole_lines.append((width + lf - (chunk[lf - 1 : lf] == b"\r"), tuple(slots)))
        width = len(chunk) - chunk.rfind(b"\n") - 1
        slots = []
    if slots:
        hole_lines.append((width, tuple(slots)))
    return RawPart(chunks, line_ending(body), not data.isascii(), hole_lines)


def qp_part(body: bytes, data: bytes, edits: Sequence[ByteEdit], exact: bool) -> QPPart:
    """The sender's encoded lines, except the lines an edit falls in: those are re-encoded."""
    nl = line_ending(body)
    if not exact:
        return QPPart([Dirty(tuple(apply(data, edits)), b"")], nl)
    lines = qp_lines(body, len(data), min(edit.start for edit in edits) if edits else len(data))
    last_line = lines.last
    dirty: list[tuple[int, int]] = []
    for edit in edits:
        first = lines.line_of(edit.start)
        last = lines.line_of(edit.end - 1) if edit.end > edit.start else first
        if first == last_line and first and lines.soft(first - 1):
            # The body ends in "=" with no line break after it: text added at the end is
            # encoded together with that line, or the "=" would run into it.
            first -= 1
        if dirty and first <= dirty[-1][1]:
            dirty[-1] = (dirty[-1][0], max(last, dirty[-1][1]))
        else:
            dirty.append((first, last))

    chunks: list[bytes | Dirty] = []
    cursor = 0
    for first, last in dirty:
        chunks.append(body[cursor : lines.encoded_starts[first]])
        content = apply(
            data,
            edits,
            lines.decoded_start(first),
            lines.decoded_start(last + 1) if last < last_line else None,
        )
        cursor = lines.encoded_starts[last + 1] if last < last_line else len(body)
        ending = body[lines.encoded_starts[last] : cursor]
        tail = b"=" + ending[len(ending.rstrip(b"\r\n")) :] if lines.soft(last) else b""
        chunks.append(Dirty(tuple(content), tail))
    chunks.append(body[cursor:])
    return QPPart([c for c in chunks if c != b""], nl)


def base64_part(body: bytes, data: bytes, edits: Sequence[ByteEdit], exact: bool) -> Base64Part:
    layout = base64_body(body)
    line_bytes = layout.line_chars // 4 * 3
    reuse = min(edits[0].start // line_bytes, layout.regular_lines) if exact and edits else 0
    prefix = body[: layout.line_starts[reuse]] if reuse else b""
    chunks: list[Chunk | CachedRun] = [
        CachedRun(c) if isinstance(c, bytes) and len(c) >= CACHE_RUN else c
        for c in apply(data, edits, reuse * line_bytes)
    ]
    return Base64Part(prefix, chunks, layout.line_chars, layout.nl, layout.trailer)


def seven_bit(data: bytes, text_type: bool, nl: bytes) -> bytes:
    """A body that was 8bit or binary, for a next hop without 8BITMIME."""
    if text_type:
        return qp_encode(data, nl)
    return base64_lines(data, B64_LINE, nl).rstrip(b"\r\n")
