"""Just enough MIME to find parts by byte offset, so untouched bytes stay untouched."""

from __future__ import annotations

import itertools
import mmap
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from email.policy import compat32
from email.utils import collapse_rfc2231_value
from typing import TypeAlias

from .errors import RelayError

# What the email package's feed parser takes for a header line (its headerRE): a field
# name of printable ASCII up to a colon, a continuation, or a Unix "From " envelope line.
_HEADER_LINE = re.compile(r"From |[\041-\071\073-\176]*:|[\t ]")
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")


# What the MIME functions read: the message in memory, or a spilled one mapped from its file.
Buffer = bytes | mmap.mmap


class MimeError(RelayError, ValueError):
    """The structure of a message or part cannot be followed."""


class MimeLimitError(MimeError):
    """The message is past one of the limits that bound the work spent on it."""


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


def smtp_lines(content: bytes) -> bytes:
    """`content` as SMTP carries it: CRLF line breaks (`crlf_line_breaks`), ending in CRLF."""
    content = crlf_line_breaks(content)
    return content if content.endswith(b"\r\n") or not content else content + b"\r\n"


def _starts(data: Buffer, prefix: bytes, start: int, stop: int) -> bool:
    """data[start:stop].startswith(prefix), for an mmap too."""
    return stop - start >= len(prefix) and data[start : start + len(prefix)] == prefix


def entity_bounds(data: Buffer, start: int = 0, end: int | None = None) -> tuple[int, int]:
    """Where the header block of the entity `data[start:end]` ends and where its body
    begins, as offsets in `data` (the blank line between belongs to neither). Without a
    blank line the entity is all headers: (end, end). Nothing is copied."""
    stop = len(data) if end is None else end
    if _starts(data, b"\r\n", start, stop):
        return start, start + 2
    if _starts(data, b"\n", start, stop):
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


def first_non_header(block: bytes) -> int | None:
    """Where the first line of a header block that is no header field starts (parsers read
    the body from there: `parse_headers` stops at it), or None when every line is one."""
    offset = 0
    for line in _LINE.findall(block.decode("ascii", "surrogateescape")):
        if not _HEADER_LINE.match(line):
            return offset
        offset += len(line)
    return None


@dataclass(frozen=True, slots=True)
class BodyPart:
    start: int  # first byte of the part's headers
    end: int  # one past its last byte (the line break before the next delimiter excluded)


@dataclass(frozen=True, slots=True)
class Multipart:
    """A multipart body split at its delimiters, by offsets into the whole message."""

    parts: list[BodyPart]
    close: int | None  # where the close delimiter line starts; None when it is missing


def split_multipart(
    data: Buffer, boundary: str, start: int = 0, end: int | None = None, max_parts: int = 0
) -> Multipart:
    """The parts of the multipart body `data[start:end]`, by offsets into `data`; a missing
    close delimiter ends the last part at `end`. Nothing is copied, and with `max_parts`
    the search stops at the first delimiter past that many parts (MimeLimitError)."""
    stop = len(data) if end is None else end
    if not boundary or len(boundary) > 200:
        raise MimeError("multipart without a usable boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    # (delimiter line start, next line start); delimiters start a line, so the search is
    # for a line break and the delimiter together, in C, except at the very start.
    lines: list[tuple[int, int]] = []
    close: int | None = None
    found = (
        start
        if _starts(data, delimiter, start, stop)
        else _next_delimiter(data, delimiter, start, stop)
    )
    while found >= 0:
        after = found + len(delimiter)
        line_end = data.find(b"\n", after, stop)
        next_line = stop if line_end < 0 else line_end + 1
        rest = bytes(data[after:next_line]).rstrip(b"\r\n \t")
        if rest == b"--":
            close = found
            break
        if rest == b"":
            if max_parts and len(lines) >= max_parts:
                raise MimeLimitError(f"more than {max_parts} MIME parts")
            lines.append((found, next_line))
        found = _next_delimiter(data, delimiter, after, stop)
    if not lines:
        raise MimeError(f"multipart body has no delimiter for boundary {boundary!r}")
    parts = [
        BodyPart(part_start, _before_line_break(data, next_delim))
        for (_, part_start), (next_delim, _) in itertools.pairwise(lines)
    ]
    last_end = stop if close is None else _before_line_break(data, close)
    parts.append(BodyPart(lines[-1][1], max(last_end, lines[-1][1])))
    return Multipart(parts, close)


def _next_delimiter(data: Buffer, delimiter: bytes, start: int, stop: int) -> int:
    found = data.find(b"\n" + delimiter, start, stop)
    return found + 1 if found >= 0 else -1


def _before_line_break(data: Buffer, index: int) -> int:
    if data[index - 2 : index] == b"\r\n":
        return index - 2
    return index - 1


# The MIME tree, walked within limits ------------------------------------------------------------

# Subtrees whose bytes are a signature or ciphertext: any change breaks a signature or alters
# what someone else wrote. They (and message/* parts) are never opened.
UNTOUCHABLE_TYPES = frozenset(
    {
        "multipart/signed",
        "multipart/encrypted",
        "application/pkcs7-mime",
        "application/x-pkcs7-mime",
    }
)
# The header section of one part; a longer one is not read (the front door refuses a
# message's own over this size, as Postfix's header_size_limit bounds what it reads).
MAX_HEADER_BYTES = 1024 * 1024

# A parameter's value as the email package gives it: RFC 2231 ones as (charset, language, text).
ParamValue: TypeAlias = str | tuple[str | None, str | None, str]


@dataclass(frozen=True, slots=True)
class MimeLimits:
    """How much work one message may cost the relay, whatever its shape. Past a limit the
    front door refuses it when it can tell (parts, nesting), else the rewrite falls back."""

    max_parts: int = 1000  # MIME entities in the whole tree
    max_depth: int = 100  # nesting of multiparts, as Postfix's mime_nesting_limit
    max_html_tokens: int = 100_000  # tags, comments and declarations kept per HTML part
    max_tag_attributes: int = 1000  # attributes read in one HTML tag


@dataclass(frozen=True, slots=True)
class Entity:
    """A leaf of the MIME tree, or a subtree never opened (`sealed`), by offsets."""

    headers: Message
    ctype: str
    start: int  # first byte of its header block
    header_end: int
    body_start: int  # == header_end == end when there is no blank line after the headers
    end: int
    sealed: bool

    @property
    def separated(self) -> bool:
        """Its header block ends with a blank line (else it is all headers, no body)."""
        return self.body_start > self.header_end


def walk_entities(
    data: Buffer, headers: Message | None = None, limits: MimeLimits | None = None
) -> Iterator[Entity]:
    """Every leaf and sealed subtree of `data`, in order. MimeError when the structure is
    broken; MimeLimitError as soon as it goes past `limits`, so the work stays bounded.
    `headers`: the message's own header block, parsed already."""
    limits = limits or MimeLimits()
    header_end, body_start = entity_bounds(data)
    if headers is None:
        headers = parse_headers(_header_block(data, 0, header_end))
    counter = [1]
    yield from _entity(data, 0, header_end, body_start, len(data), headers, 0, limits, counter)


def _header_block(data: Buffer, start: int, end: int) -> bytes:
    if end - start > MAX_HEADER_BYTES:
        raise MimeLimitError(f"a header section over {MAX_HEADER_BYTES} octets")
    return bytes(data[start:end])


def _entity(
    data: Buffer,
    start: int,
    header_end: int,
    body_start: int,
    end: int,
    headers: Message,
    depth: int,
    limits: MimeLimits,
    counter: list[int],
) -> Iterator[Entity]:
    ctype = headers.get_content_type()
    maintype = ctype.partition("/")[0]
    if maintype != "multipart" or ctype in UNTOUCHABLE_TYPES:
        sealed = ctype in UNTOUCHABLE_TYPES or maintype == "message"
        yield Entity(headers, ctype, start, header_end, body_start, end, sealed)
        return
    if depth >= limits.max_depth:
        raise MimeLimitError(f"MIME parts nested deeper than {limits.max_depth}")
    boundary = parameters(headers).get("boundary")
    if boundary is None:
        raise MimeError(f"{ctype} without a boundary parameter")
    boundary = collapse_rfc2231_value(boundary).rstrip()  # as Message.get_boundary
    budget = limits.max_parts - counter[0]
    if budget <= 0:
        raise MimeLimitError(f"more than {limits.max_parts} MIME parts")
    try:
        body = split_multipart(data, boundary, body_start, end, max_parts=budget)
    except MimeLimitError:
        raise MimeLimitError(f"more than {limits.max_parts} MIME parts") from None
    counter[0] += len(body.parts)
    for part in body.parts:
        part_end = max(part.end, part.start)
        part_header_end, part_body = entity_bounds(data, part.start, part_end)
        child = parse_headers(_header_block(data, part.start, part_header_end))
        if ctype == "multipart/digest" and "content-type" not in child:
            child.set_default_type("message/rfc822")  # RFC 2046 5.1.5
        yield from _entity(
            data,
            part.start,
            part_header_end,
            part_body,
            part_end,
            child,
            depth + 1,
            limits,
            counter,
        )


def parameters(headers: Message) -> dict[str, ParamValue]:
    """Content-Type's parameters by lowercased name; the first of a repeated name counts,
    as with Message.get_param. Asked once: the email package parses them anew each time."""
    params: dict[str, ParamValue] = {}
    for name, value in headers.get_params([]):
        params.setdefault(name.lower(), value)
    return params


def limit_problem(data: Buffer, limits: MimeLimits | None = None) -> str | None:
    """Why the MIME structure of `data` is past `limits` (parts, nesting, header sections),
    or None. A structure broken in other ways is not this function's business: the rewrite
    copes with it. Reads only the header blocks and delimiter lines."""
    try:
        for _ in walk_entities(data, limits=limits):
            pass
    except MimeLimitError as exc:
        return str(exc)
    except MimeError:
        return None
    return None
