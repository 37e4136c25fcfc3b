"""The MIME tree of a message as byte ranges: its leaves, and the subtrees never to be opened."""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message
from email.utils import collapse_rfc2231_value
from typing import TypeAlias

from ..mime import MimeError, entity_bounds, header_fields, parse_headers, split_multipart

# A parameter's value as the email package gives it: RFC 2231 ones as (charset, language, text).
ParamValue: TypeAlias = str | tuple[str | None, str | None, str]

# Subtrees whose bytes are a signature or ciphertext, or a whole other message: any change
# breaks a signature or alters what someone else wrote.
UNTOUCHABLE_TYPES = frozenset(
    {
        "multipart/signed",
        "multipart/encrypted",
        "application/pkcs7-mime",
        "application/x-pkcs7-mime",
    }
)
DECORATED_TYPES = frozenset({"text/plain", "text/html"})
MAX_DEPTH = 40


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
    decorable: bool  # inline text/plain or text/html, not an attachment


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


def walk(raw: bytes, headers: Message | None = None) -> Tree:
    """Every leaf and sealed subtree of `raw`, in order; MimeError if the structure is broken.
    `headers`: the message's own header block, parsed already."""
    header_end, body_start = entity_bounds(raw)
    tree = Tree([], [])
    if headers is None:
        headers = parse_headers(raw[:header_end])
    _entity(raw, tree, 0, body_start, len(raw), headers, 0)
    return tree


def _entity(
    raw: bytes, tree: Tree, start: int, body_start: int, end: int, headers: Message, depth: int
) -> None:
    if depth > MAX_DEPTH:
        raise MimeError(f"MIME parts nested deeper than {MAX_DEPTH}")
    ctype = headers.get_content_type()
    maintype = ctype.partition("/")[0]
    if ctype in UNTOUCHABLE_TYPES or maintype == "message":
        tree.sealed.append(Sealed(ctype, body_start, end))
        return
    # The parameters parsed once: the email package parses them anew for every question.
    params = _parameters(headers)
    if maintype == "multipart":
        boundary = params.get("boundary")
        if boundary is None:
            raise MimeError(f"{ctype} without a boundary parameter")
        boundary = collapse_rfc2231_value(boundary).rstrip()  # as Message.get_boundary
        for part in split_multipart(raw[body_start:end], boundary):
            part_start = body_start + part.start
            part_end = body_start + max(part.end, part.start)
            header_end, part_body = entity_bounds(raw, part_start, part_end)
            child = parse_headers(raw[part_start:header_end])
            if ctype == "multipart/digest" and "content-type" not in child:
                child.set_default_type("message/rfc822")  # RFC 2046 5.1.5
            _entity(raw, tree, part_start, part_body, part_end, child, depth + 1)
        return
    tree.leaves.append(
        Leaf(
            headers,
            ctype,
            str(headers.get("Content-Transfer-Encoding") or "7bit").strip().lower(),
            start,
            body_start,
            end,
            _cte_field(raw[start:body_start], start),
            ctype in DECORATED_TYPES and not _attached(headers, params),
        )
    )


def _parameters(headers: Message) -> dict[str, ParamValue]:
    """Content-Type's parameters by lowercased name; the first of a repeated name counts,
    as with Message.get_param."""
    params: dict[str, ParamValue] = {}
    for name, value in headers.get_params([]):
        params.setdefault(name.lower(), value)
    return params


def _attached(headers: Message, params: dict[str, ParamValue]) -> bool:
    """An attachment, or a file shown inline (a file name in Content-Disposition or, as
    Message.get_filename falls back to, in Content-Type): not the message's own text."""
    return (
        headers.get_content_disposition() == "attachment"
        or headers.get_param("filename", None, "content-disposition") is not None
        or "name" in params
    )


def _cte_field(block: bytes, offset: int) -> tuple[int, int] | None:
    for field_ in header_fields(block):
        if field_.lname == "content-transfer-encoding":
            return offset, offset + len(field_.raw)
        offset += len(field_.raw)
    return None
