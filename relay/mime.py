"""Just enough MIME to find parts by byte offset, so untouched bytes stay untouched."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from email.message import Message
from email.policy import compat32

from .errors import RelayError

# What the email package's feed parser takes for a header line (its headerRE): a field
# name of printable ASCII up to a colon, a continuation, or a Unix "From " envelope line.
_HEADER_LINE = re.compile(r"From |[\041-\071\073-\176]*:|[\t ]")
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")


class MimeError(RelayError, ValueError):
    """The structure of a message or part cannot be followed."""


@dataclass(frozen=True, slots=True)
class HeaderField:
    name: str
    raw: bytes  # the whole field as sent, folding and line ending included

    @property
    def lname(self) -> str:
        return self.name.lower()


def crlf_line_breaks(message: bytes) -> bytes:
    """`message` with every line break (CRLF, lone LF, lone CR) as CRLF, as SMTP carries it.

    The relay's SMTP client sends this form and the DKIM signer signs it: one definition,
    so a signature always covers the bytes that leave."""
    crlf = message.count(b"\r\n")
    if message.count(b"\n") == crlf and message.count(b"\r") == crlf:
        return message
    return message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def entity_bounds(data: bytes, start: int = 0, end: int | None = None) -> tuple[int, int]:
    """Where the header block of the entity `data[start:end]` ends and where its body
    begins, as offsets in `data` (the blank line between belongs to neither). Without a
    blank line the entity is all headers: (end, end). Nothing is copied."""
    stop = len(data) if end is None else end
    if data.startswith(b"\r\n", start, stop):
        return start, start + 2
    if data.startswith(b"\n", start, stop):
        return start, start + 1
    crlf = data.find(b"\r\n\r\n", start, stop)
    # Only a bare-LF blank line before that one counts: no need to scan the whole body.
    lf = data.find(b"\n\n", start, stop if crlf < 0 else crlf + 1)
    if lf >= 0:
        return lf + 1, lf + 2
    if crlf >= 0:
        return crlf + 2, crlf + 4
    return stop, stop


def headers_of(data: bytes) -> bytes:
    """The header block of an entity, without copying its body."""
    return data[: entity_bounds(data)[0]]


def header_fields(block: bytes) -> list[HeaderField]:
    """The fields of a header block, each with its continuation lines."""
    fields: list[HeaderField] = []
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            last = fields[-1]
            fields[-1] = HeaderField(last.name, last.raw + line)
            continue
        name, colon, _ = line.partition(b":")
        fields.append(HeaderField(name.strip().decode("latin-1") if colon else "", line))
    return fields


def address_domain(address: str) -> str:
    """The domain of `address` (angle brackets allowed), lowercased, without a final dot."""
    return address.strip("<>").rpartition("@")[2].lower().rstrip(".")


def parse_headers(block: bytes) -> Message:
    """The header block as a Message, for content types and their parameters.

    The fields and envelope line are those `email.parser.BytesHeaderParser` (compat32)
    finds, by its rules; its feed machinery cost a tenth of a delivery's CPU. Whatever
    follows the first line that is not a header is ignored, not kept as a payload.
    """
    message = Message()
    field: list[str] = []
    for number, line in enumerate(_LINE.findall(block.decode("ascii", "surrogateescape"))):
        if not _HEADER_LINE.match(line):
            break
        if line[0] in " \t":
            if field:  # a continuation with no field before it is dropped
                field.append(line)
            continue
        if field:
            message.set_raw(*compat32.header_source_parse(field))
            field = []
        if line.startswith("From "):
            if number == 0:
                message.set_unixfrom(line.rstrip("\r\n"))
            continue  # an envelope line anywhere else is no header
        if not line.startswith(":"):  # a field without a name is dropped
            field = [line]
    if field:
        message.set_raw(*compat32.header_source_parse(field))
    return message


@dataclass(frozen=True, slots=True)
class BodyPart:
    start: int  # first byte of the part's headers
    end: int  # one past its last byte (the line break before the next delimiter excluded)


def split_multipart(body: bytes, boundary: str) -> list[BodyPart]:
    """The parts of a multipart body, by offset; a missing close delimiter ends at the end."""
    if not boundary or len(boundary) > 200:
        raise MimeError("multipart without a usable boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    lines: list[tuple[int, int, bool]] = []  # (delimiter start, next line start, is close)
    pos = 0
    while (found := body.find(delimiter, pos)) >= 0:
        pos = found + len(delimiter)
        if found and body[found - 1 : found] != b"\n":
            continue
        line_end = body.find(b"\n", found)
        next_line = len(body) if line_end < 0 else line_end + 1
        rest = body[pos:next_line].rstrip(b"\r\n \t")
        if rest not in (b"", b"--"):
            continue
        lines.append((found, next_line, rest == b"--"))
        if rest == b"--":
            break
    if not lines or lines[0][2]:
        raise MimeError(f"multipart body has no delimiter for boundary {boundary!r}")
    parts = []
    for (_, part_start, _), (next_delim, _, _) in itertools.pairwise(lines):
        parts.append(BodyPart(part_start, _before_line_break(body, next_delim)))
    if not lines[-1][2]:
        parts.append(BodyPart(lines[-1][1], len(body)))
    return parts


def _before_line_break(body: bytes, index: int) -> int:
    if body[index - 2 : index] == b"\r\n":
        return index - 2
    return index - 1
