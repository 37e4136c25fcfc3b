"""Parse once, personalise many: a message becomes a template of bytes and holes.

Building the template decodes each text part that will change and cuts it at the places where
per-recipient values go. Rendering a recipient joins the untouched bytes with those parts
re-encoded in their own charset and transfer encoding. Everything else is the sender's bytes.
"""

from __future__ import annotations

import base64
import binascii
import html
import html.parser
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from enum import StrEnum
from typing import Literal

from .mime import (
    HeaderField,
    MimeError,
    header_fields,
    parse_headers,
    split_entity,
    split_multipart,
)

PLACEHOLDER = "%unsubscribe_url%"
CONTROL_HEADER_PREFIX = "x-optout-"
# Replaced by ours (RFC 8058 wants exactly one of each).
OWNED_HEADERS = frozenset({"list-unsubscribe", "list-unsubscribe-post"})
# Subtrees whose bytes are a signature or ciphertext: any change breaks them.
UNTOUCHABLE_TYPES = frozenset(
    {
        "multipart/signed",
        "multipart/encrypted",
        "application/pkcs7-mime",
        "application/x-pkcs7-mime",
        "message/rfc822",
        "message/global",
    }
)
CRLF = "\r\n"


class Hole(StrEnum):
    UNSUBSCRIBE_URL = "unsubscribe_url"
    PIXEL_URL = "pixel_url"


@dataclass(frozen=True, slots=True)
class Decorations:
    """What this message gets: decided by policy from the control headers."""

    unsubscribe: bool = True
    pixel: bool = True


Encoding = Literal["base64", "quoted-printable", "7bit", "8bit", "binary"]


@dataclass(slots=True)
class TextPart:
    """A decoded text part cut into literal text and holes."""

    segments: list[str | Hole]
    charset: str
    encoding: Encoding
    html: bool

    def render(self, values: Mapping[Hole, str]) -> bytes:
        text = "".join(
            (html.escape(values[s]) if self.html else values[s]) if isinstance(s, Hole) else s
            for s in self.segments
        )
        data = text.encode(self.charset)
        if self.encoding == "base64":
            return base64.encodebytes(data).replace(b"\n", b"\r\n").rstrip(b"\r\n")
        if self.encoding == "quoted-printable":
            return (
                binascii.b2a_qp(data, istext=True).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            )
        return data


Piece = bytes | TextPart


@dataclass(slots=True)
class Template:
    headers: list[bytes]
    body: list[Piece]
    decorations: Decorations
    notes: list[str] = field(default_factory=list)  # every decision, for logs and events

    def render(self, values: Mapping[Hole, str], extra_headers: Sequence[bytes] = ()) -> bytes:
        out = [*self.headers, *extra_headers, b"\r\n"]
        out.extend(p if isinstance(p, bytes) else p.render(values) for p in self.body)
        return b"".join(out)

    @property
    def has_holes(self) -> bool:
        return any(isinstance(p, TextPart) for p in self.body)


def build_template(raw: bytes, decorations: Decorations) -> Template:
    """The template of `raw`: owned and control headers dropped, text parts opened for holes."""
    block, body = split_entity(raw)
    kept = [f.raw for f in header_fields(block) if _kept(f)]
    if kept and not kept[-1].endswith(b"\n"):
        kept[-1] += b"\r\n"
    template = Template(kept, [body], decorations)
    if not (decorations.unsubscribe or decorations.pixel):
        template.notes.append("body not decorated (transactional or tracking off)")
        return template
    builder = _BodyBuilder(decorations, template.notes)
    try:
        pieces = builder.entity(parse_headers(block), body)
    except MimeError as exc:
        template.notes.append(f"rewrite_failed: {exc}")
        return template
    template.body = _merge(pieces)
    if not template.has_holes:
        template.notes.append("no text part could carry the unsubscribe link")
    return template


def list_unsubscribe_headers(unsubscribe_url: str) -> list[bytes]:
    return [
        f"List-Unsubscribe: <{unsubscribe_url}>\r\n".encode("ascii"),
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
    ]


def _kept(field_: HeaderField) -> bool:
    name = field_.lname
    return name not in OWNED_HEADERS and not name.startswith(CONTROL_HEADER_PREFIX)


def _merge(pieces: list[Piece]) -> list[Piece]:
    merged: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += piece
        elif piece != b"":
            merged.append(piece)
    return merged


class _BodyBuilder:
    def __init__(self, decorations: Decorations, notes: list[str]) -> None:
        self.decorations = decorations
        self.notes = notes
        self.footed: set[str] = set()  # the first text/plain and text/html get the footer

    def entity(self, headers: Message, body: bytes) -> list[Piece]:
        ctype = headers.get_content_type()
        if ctype in UNTOUCHABLE_TYPES:
            self.notes.append(f"{ctype} left untouched")
            return [body]
        if headers.get_content_maintype() == "multipart":
            return self._multipart(headers, body)
        if ctype in ("text/plain", "text/html"):
            if headers.get_content_disposition() == "attachment":
                return [body]
            return [self._text(headers, body, ctype)]
        return [body]

    def _multipart(self, headers: Message, body: bytes) -> list[Piece]:
        boundary = headers.get_boundary()
        if boundary is None:
            raise MimeError("multipart without boundary parameter")
        parts = split_multipart(body, boundary)
        pieces: list[Piece] = []
        cursor = 0
        for part in parts:
            end = max(part.end, part.start)
            pieces.append(body[cursor : part.start])
            block, part_body = split_entity(body[part.start : end])
            pieces.append(body[part.start : end - len(part_body)])
            pieces.extend(self.entity(parse_headers(block), part_body))
            cursor = end
        pieces.append(body[cursor:])
        return pieces

    def _text(self, headers: Message, body: bytes, ctype: str) -> Piece:
        encoding = (headers.get("Content-Transfer-Encoding") or "7bit").strip().lower()
        if encoding not in ("base64", "quoted-printable", "7bit", "8bit", "binary"):
            self.notes.append(f"{ctype}: unknown transfer encoding {encoding!r}, left untouched")
            return body
        charset = headers.get_content_charset() or "us-ascii"
        try:
            decoded = _decode_transfer(body, encoding)
            text = decoded.decode(charset)
            if text.encode(charset) != decoded:
                raise UnicodeError("charset does not round-trip")
        except (LookupError, UnicodeError, binascii.Error, ValueError) as exc:
            self.notes.append(f"{ctype}: cannot decode as {charset}/{encoding} ({exc}), untouched")
            return body
        is_html = ctype == "text/html"
        segments = _with_placeholders(text)
        wants_footer = ctype not in self.footed and PLACEHOLDER not in text
        if wants_footer and self.decorations.unsubscribe:
            self.footed.add(ctype)
            segments = (
                _html_footer(segments, text, self.decorations)
                if is_html
                else _text_footer(segments, text)
            )
        elif is_html and self.decorations.pixel and ctype not in self.footed:
            self.footed.add(ctype)
            segments = _html_footer(segments, text, self.decorations)
        if len(segments) == 1:
            return body
        if encoding == "7bit" and not text.isascii():
            encoding = "8bit"
        self.notes.append(f"{ctype} ({charset}, {encoding}) personalised")
        return TextPart(segments, charset, encoding, is_html)  # type: ignore[arg-type]


def _decode_transfer(body: bytes, encoding: str) -> bytes:
    if encoding == "base64":
        return base64.b64decode(b"".join(body.split()), validate=True)
    if encoding == "quoted-printable":
        return binascii.a2b_qp(body)
    return body


def _with_placeholders(text: str) -> list[str | Hole]:
    segments: list[str | Hole] = []
    for i, chunk in enumerate(text.split(PLACEHOLDER)):
        if i:
            segments.append(Hole.UNSUBSCRIBE_URL)
        segments.append(chunk)
    return segments


def _line_break(text: str) -> str:
    return CRLF if "\r\n" in text else "\n"


def _text_footer(segments: list[str | Hole], text: str) -> list[str | Hole]:
    nl = _line_break(text)
    lead = "" if text.endswith("\n") or not text else nl
    return [*segments, f"{lead}{nl}To unsubscribe: ", Hole.UNSUBSCRIBE_URL, nl]


def _html_footer(
    segments: list[str | Hole], text: str, decorations: Decorations
) -> list[str | Hole]:
    insert_at = _last_body_close(text)
    addition: list[str | Hole] = []
    if decorations.unsubscribe and PLACEHOLDER not in text:
        addition += [
            '<div style="margin:16px 0;font:12px/1.5 Arial,sans-serif;color:#666666;'
            'text-align:center"><a href="',
            Hole.UNSUBSCRIBE_URL,
            '" style="color:#666666;text-decoration:underline">Unsubscribe</a></div>',
        ]
    if decorations.pixel:
        addition += [
            '<img src="',
            Hole.PIXEL_URL,
            '" width="1" height="1" alt="" style="display:block;border:0;width:1px;height:1px">',
        ]
    if not addition:
        return segments
    # Cut the segment holding the insertion point. Offsets are in the original text, where
    # every hole so far was a placeholder.
    out: list[str | Hole] = []
    offset = 0
    for index, segment in enumerate(segments):
        if isinstance(segment, Hole):
            out.append(segment)
            offset += len(PLACEHOLDER)
            continue
        if offset + len(segment) >= insert_at:
            cut = max(insert_at - offset, 0)
            return [*out, segment[:cut], *addition, segment[cut:], *segments[index + 1 :]]
        out.append(segment)
        offset += len(segment)
    return [*out, *addition]


class _BodyCloseFinder(html.parser.HTMLParser):
    """Finds the last real `</body>`: not one inside a comment, script or conditional comment."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.last: tuple[int, int] | None = None

    def handle_endtag(self, tag: str) -> None:
        if tag == "body":
            self.last = self.getpos()


def _last_body_close(text: str) -> int:
    finder = _BodyCloseFinder()
    finder.feed(text)
    finder.close()
    if finder.last is None:
        return len(text.rstrip())
    line, column = finder.last
    # HTMLParser counts lines from 1 by "\n" and columns in characters.
    offset = 0
    for _ in range(line - 1):
        offset = text.index("\n", offset) + 1
    return offset + column
