"""Content-Transfer-Encodings, decoded with enough bookkeeping to re-encode only what changed.

Quoted-printable lines are independent after each hard line break, so a changed QP part keeps the
sender's encoded lines everywhere except the few hard lines that hold an insertion. Base64 keeps
the sender's lines before the first change; after it, lines are re-encoded, and long constant runs
are encoded once per line phase and cached, so a recipient costs little more than their URLs.
"""

from __future__ import annotations

import binascii
import itertools
import re
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import AnyStr

from ..mime import MimeError

QP_LINE = 76  # RFC 2045 6.7 (5): encoded lines at most 76 characters
B64_LINE = 76
_NEEDS_QP = re.compile(rb"[^\t\x20-\x3c\x3e-\x7e]")
_BASE64_LINE = re.compile(rb"[A-Za-z0-9+/]*")


def line_ending(text: AnyStr) -> AnyStr:
    """The line break `text` uses: CRLF unless its first break is a bare LF. One rule for raw
    bodies and decoded text, so what a footer adds breaks lines as the encoder does."""
    cr, lf, crlf = (b"\r", b"\n", b"\r\n") if isinstance(text, bytes) else ("\r", "\n", "\r\n")
    at = text.find(lf)
    return lf if at >= 0 and text[at - 1 : at] != cr else crlf


# Quoted-printable -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QPLines:
    """A QP body by physical line: where each starts, encoded and decoded, and if it is soft.

    A soft line break may stand anywhere between encoded characters, so a run of physical lines
    can be re-encoded on its own: ending it with a soft break when its last line had one keeps
    the sender's lines on either side valid and unchanged.

    Only the lines from `first` on are decoded and tabled (`decoded_starts[i - first]`): edits
    are mostly near the end (a footer, a pixel), and the lines before them are kept as sent.
    """

    lines: list[bytes]  # each with its line break
    encoded_starts: list[int]  # of every line, and the end
    first: int
    decoded_starts: list[int]  # of lines first.., and the end

    @property
    def last(self) -> int:
        """The index of a final empty line, so an insertion at the very end has a line."""
        return len(self.lines)

    def line_of(self, decoded_offset: int) -> int:
        """The line an insertion at `decoded_offset` lands in (the later one at a boundary)."""
        return self.first + bisect_right(self.decoded_starts, decoded_offset) - 1

    def decoded_start(self, line: int) -> int:
        return self.decoded_starts[line - self.first]

    def soft(self, line: int) -> bool:
        if line >= len(self.lines):
            return False
        return self.lines[line].rstrip(b"\r\n").rstrip(b" \t").endswith(b"=")


def qp_lines(body: bytes, decoded_length: int, from_offset: int = 0) -> QPLines:
    """The line table of a QP body whose decoded form is `decoded_length` bytes long, decoded
    line by line (in C) from the end back to the line holding `from_offset`."""
    parts = body.split(b"\n")
    lines = [part + b"\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    encoded_starts = [0, *itertools.accumulate(map(len, lines))]
    # Decoding each line alone gives the bytes decoding the body at once does (QP is decoded
    # line by line), so the decoded starts can be counted back from the decoded length.
    # One line more than `from_offset` needs: an edit at the very end may join the line
    # before it (see qp_part).
    starts = [decoded_length]
    first = len(lines)
    while first > 0 and (starts[-1] > from_offset or len(starts) < 2):
        first -= 1
        starts.append(starts[-1] - len(binascii.a2b_qp(lines[first])))
    if first > 0:
        first -= 1
        starts.append(starts[-1] - len(binascii.a2b_qp(lines[first])))
    starts.reverse()
    return QPLines(lines, encoded_starts, first, starts)


def qp_encode(data: bytes, nl: bytes) -> bytes:
    """Quoted-printable for text: hard breaks kept as `nl`, lines at most 76 characters."""
    lines = data.split(b"\n")
    out: list[bytes] = []
    for index, line in enumerate(lines):
        last = index == len(lines) - 1
        if not last and line.endswith(b"\r"):
            line = line[:-1]
        out.append(_qp_line(line, nl))
        if not last:
            out.append(nl)
    return b"".join(out)


def _qp_line(line: bytes, nl: bytes) -> bytes:
    if len(line) <= QP_LINE and not _NEEDS_QP.search(line) and not line.endswith((b" ", b"\t")):
        return line
    # One line, no breaks in it: binascii's soft breaks are bare LFs, and istext=False has it
    # escape a stray CR rather than pass it on.
    encoded = binascii.b2a_qp(line, quotetabs=False, istext=False, header=False)
    return encoded if nl == b"\n" else encoded.replace(b"=\n", b"=\r\n")


# Base64 -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Base64Body:
    decoded: bytes
    line_chars: int  # characters per encoded line, a multiple of 4
    nl: bytes
    regular_lines: int  # leading full lines of exactly line_chars, reusable as they are
    line_starts: list[int]  # offset of each encoded line in the body
    trailer: bytes  # what followed the last base64 character (usually a line break or nothing)


def base64_body(body: bytes) -> Base64Body:
    stripped = body.rstrip(b" \t\r\n")
    trailer = body[len(stripped) :]
    try:
        decoded = binascii.a2b_base64(b"".join(stripped.split()), strict_mode=True)
    except binascii.Error as exc:
        raise MimeError(f"bad base64 ({exc})") from exc
    lines = stripped.splitlines(keepends=True)
    contents = [line.rstrip(b"\r\n") for line in lines]
    first = len(contents[0]) if contents else 0
    line_chars = first if first % 4 == 0 and 4 <= first <= B64_LINE else B64_LINE
    regular = 0
    for content, line in zip(contents[:-1], lines[:-1], strict=True):
        if len(content) != line_chars or content.count(b"=") or not _plain_base64(content):
            break
        if line[len(content) :] not in (b"\r\n", b"\n"):
            break
        regular += 1
    starts = []
    offset = 0
    for line in lines:
        starts.append(offset)
        offset += len(line)
    return Base64Body(decoded, line_chars, line_ending(body), regular, starts, trailer)


def _plain_base64(content: bytes) -> bool:
    match = _BASE64_LINE.match(content)
    return match is not None and match.end() == len(content)


def base64_lines(data: bytes, line_chars: int, nl: bytes) -> bytes:
    """`data` (a multiple of the bytes per line, or the last chunk) as lines, each ending in nl."""
    encoded = binascii.b2a_base64(data, newline=False)
    if len(encoded) <= line_chars:
        return encoded + nl if encoded else b""
    return nl.join(encoded[i : i + line_chars] for i in range(0, len(encoded), line_chars)) + nl


# Phases of one run kept encoded. A campaign's tokens have one length, or a few, so its
# copies start a run at one phase or a few; keeping every phase (up to 57) would keep a
# base64 body dozens of times over, for as long as the body cache keeps the template.
KEPT_PHASES = 4


@dataclass(slots=True)
class CachedRun:
    """A long constant run of bytes, encoded once for each of the first phases it starts at."""

    data: bytes
    by_phase: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)

    def encoded(
        self, skip: int, line_bytes: int, line_chars: int, nl: bytes
    ) -> tuple[bytes, bytes]:
        """(full lines of data[skip:], the bytes left over for the next line)."""
        found = self.by_phase.get(skip)
        if found is None:
            rest = self.data[skip:]
            full = len(rest) - len(rest) % line_bytes
            found = (base64_lines(rest[:full], line_chars, nl), rest[full:])
            if len(self.by_phase) < KEPT_PHASES:
                self.by_phase[skip] = found
        return found
