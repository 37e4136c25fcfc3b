"""The pieces a template is made of, and how each one renders for a recipient.

A template is a list of pieces: the sender's bytes, switches that depend on whether the next hop
takes 8-bit data, and changed parts. A changed part holds its content already cut into constant
bytes and slots, in the form its transfer encoding needs, so that rendering is a join plus the
encoding of the few bytes around each slot.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

from ._encoding import CachedRun, base64_lines, qp_encode

LINE_LIMIT = 998  # RFC 5322 2.1.1, without the CRLF


class Hole(StrEnum):
    UNSUBSCRIBE_URL = "unsubscribe_url"
    PIXEL_URL = "pixel_url"
    CLICK_URL = "click_url"  # in `Template.holes` when links are tracked (see LinkHole)
    PREFERENCES_URL = "preferences_url"  # the recipient's tracking preferences page


@dataclass(frozen=True, slots=True)
class LinkHole:
    """The click-tracking URL of the message's link number `index` (`Template.links`)."""

    index: int


HoleKey = Hole | LinkHole


@dataclass(frozen=True, slots=True)
class Slot:
    """Where a hole's value goes, and how it is written there."""

    hole: HoleKey
    html: bool  # escaped as an HTML attribute value
    charset: str

    def value(self, values: Mapping[HoleKey, str]) -> bytes:
        value = values[self.hole]
        if self.html:
            return html.escape(value, quote=True).encode(self.charset, "xmlcharrefreplace")
        return value.encode(self.charset)


Chunk = bytes | Slot


def join(chunks: Sequence[Chunk], values: Mapping[HoleKey, str]) -> bytes:
    return b"".join(c if isinstance(c, bytes) else c.value(values) for c in chunks)


@dataclass(frozen=True, slots=True)
class Switch:
    """Bytes that differ when the next hop lacks 8BITMIME (a Content-Transfer-Encoding field)."""

    normal: bytes
    downgraded: bytes

    def render(self, values: Mapping[HoleKey, str], eight_bit_ok: bool) -> bytes:
        return self.normal if eight_bit_ok else self.downgraded


@dataclass
class Downgrade:
    """An unchanged 8-bit body, re-encoded only if some recipient's next hop needs 7-bit."""

    original: bytes
    encode: Callable[[bytes], bytes]

    def render(self, values: Mapping[HoleKey, str], eight_bit_ok: bool) -> bytes:
        return self.original if eight_bit_ok else self.seven_bit

    @cached_property
    def seven_bit(self) -> bytes:
        return self.encode(self.original)


@dataclass(slots=True)
class RawPart:
    """7bit, 8bit or binary: the decoded bytes are the bytes sent.

    Sent as quoted-printable instead when the next hop lacks 8BITMIME and the part is 8-bit, or
    when a recipient's URLs would stretch a line of the sender's past 998 octets (the relay
    never breaks a sender's line; QP's soft breaks keep the decoded text as it was).
    """

    chunks: list[Chunk]
    nl: bytes
    eight_bit: bool
    hole_lines: list[tuple[int, tuple[Slot, ...]]]  # (constant width, slots) of lines with holes

    def as_qp(self, values: Mapping[HoleKey, str], eight_bit_ok: bool) -> bool:
        if self.eight_bit and not eight_bit_ok:
            return True
        return any(
            width + sum(len(slot.value(values)) for slot in slots) > LINE_LIMIT
            for width, slots in self.hole_lines
        )

    def render(self, values: Mapping[HoleKey, str], eight_bit_ok: bool) -> bytes:
        data = join(self.chunks, values)
        return qp_encode(data, self.nl) if self.as_qp(values, eight_bit_ok) else data


@dataclass(frozen=True, slots=True)
class CteField:
    """A raw part's Content-Transfer-Encoding field, which says quoted-printable whenever the
    part renders as such for this recipient."""

    part: RawPart
    normal: bytes  # the sender's field (empty when it had none)
    qp: bytes

    def render(self, values: Mapping[HoleKey, str], eight_bit_ok: bool) -> bytes:
        return self.qp if self.part.as_qp(values, eight_bit_ok) else self.normal


@dataclass(frozen=True, slots=True)
class Dirty:
    """Decoded lines to encode again; `tail` is the soft break ("=" and its line break, if any)
    the sender's last line of the run ended with, so that the next line joins on as before."""

    chunks: tuple[Chunk, ...]
    tail: bytes


@dataclass(slots=True)
class QPPart:
    """Quoted-printable: the sender's encoded lines, and decoded dirty lines to encode again."""

    chunks: list[bytes | Dirty]
    nl: bytes

    def render(self, values: Mapping[HoleKey, str], eight_bit_ok: bool) -> bytes:
        return b"".join(
            c if isinstance(c, bytes) else qp_encode(join(c.chunks, values), self.nl) + c.tail
            for c in self.chunks
        )


@dataclass(slots=True)
class Base64Part:
    """Base64: the sender's lines up to the first change, then an encoder that keeps line phase."""

    prefix: bytes
    chunks: list[Chunk | CachedRun]
    line_chars: int
    nl: bytes
    trailer: bytes
    line_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.line_bytes = self.line_chars // 4 * 3

    def render(self, values: Mapping[HoleKey, str], eight_bit_ok: bool) -> bytes:
        size, chars, nl = self.line_bytes, self.line_chars, self.nl
        out = [self.prefix]
        pending = b""
        for chunk in self.chunks:
            if isinstance(chunk, CachedRun):
                skip = (size - len(pending)) % size
                if skip:
                    out.append(base64_lines(pending + chunk.data[:skip], chars, nl))
                lines, pending = chunk.encoded(skip, size, chars, nl)
                out.append(lines)
                continue
            data = pending + (chunk if isinstance(chunk, bytes) else chunk.value(values))
            full = len(data) - len(data) % size
            out.append(base64_lines(data[:full], chars, nl))
            pending = data[full:]
        encoded = b"".join(out)
        if pending:
            encoded += base64_lines(pending, chars, nl)
        if encoded.endswith(nl):
            encoded = encoded[: -len(nl)]
        return encoded + self.trailer


Piece = bytes | Switch | CteField | Downgrade | RawPart | QPPart | Base64Part
