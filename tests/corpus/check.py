"""The invariants of a rewrite, checked from the bytes alone.

Written apart from relay.mime on purpose: an independent reading of the MIME structure (split
at boundary lines, decoded with the stdlib) is the oracle the engine is held to.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import html
import re
from dataclasses import dataclass
from email.message import Message

from relay.rewrite import PLACEHOLDER, Hole

UNSUB = "https://mail.shop.example/u/AbC123-unsub.token_value"
PIXEL = "https://mail.shop.example/o/AbC123-open.token_value.gif"
MAILTO = "mailto:unsubscribe+AbC123@mail.shop.example"
VALUES = {Hole.UNSUBSCRIBE_URL: UNSUB, Hole.PIXEL_URL: PIXEL}
SEALED = frozenset(
    {
        "multipart/signed",
        "multipart/encrypted",
        "application/pkcs7-mime",
        "application/x-pkcs7-mime",
    }
)
_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)
# What the relay may add to a text part, apart from its URLs: pieces of its footer.
_ADDED_HTML = re.compile(
    r'<div style="[^"<>]*">|</div>|<a href="[^"]*" style="[^"<>]*">Unsubscribe</a>'
    r'|<img src="[^"]*" width="1" height="1" alt="" style="[^"<>]*">|\s+'
)
_ADDED_TEXT = re.compile(r"-- |Unsubscribe: \S+|\s+")


@dataclass
class Entity:
    path: str
    headers: Message
    header_block: bytes
    body: bytes
    separated: bool  # a blank line ends its headers (else it is all headers)

    @property
    def ctype(self) -> str:
        return self.headers.get_content_type()

    @property
    def cte(self) -> str:
        return str(self.headers.get("Content-Transfer-Encoding", "7bit")).strip().lower()

    @property
    def sealed(self) -> bool:
        return self.ctype in SEALED or self.headers.get_content_maintype() == "message"

    @property
    def decorable(self) -> bool:
        """Body text a reader sees: an inline text part (a file name does not make it an
        attachment, only Content-Disposition does) that has a blank line after its headers."""
        return (
            self.ctype in ("text/plain", "text/html")
            and self.headers.get_content_disposition() != "attachment"
            and (self.path == "0" or self.separated)
        )


def split(data: bytes) -> tuple[bytes, bytes]:
    match = re.search(rb"\r?\n\r?\n", data)
    if data.startswith((b"\r\n", b"\n")):
        return b"", data[2:] if data.startswith(b"\r\n") else data[1:]
    if match is None:
        return data, b""
    return data[: match.start() + (2 if data[match.start()] == 13 else 1)], data[match.end() :]


def data_separated(data: bytes) -> bool:
    return data.startswith((b"\r\n", b"\n")) or re.search(rb"\r?\n\r?\n", data) is not None


def entities(raw: bytes, path: str = "0", default: str | None = None) -> list[Entity]:
    block, body = split(raw)
    headers = _PARSER.parsebytes(block)
    if default and "content-type" not in headers:
        headers.set_default_type(default)
    separated = data_separated(raw)
    entity = Entity(path, headers, block, body, separated)
    out = [entity]
    if entity.sealed or headers.get_content_maintype() != "multipart":
        return out
    boundary = headers.get_boundary()
    assert boundary, f"{path}: multipart without boundary"
    line = re.compile(rb"^--" + re.escape(boundary.encode()) + rb"(--)?[ \t]*\r?$", re.MULTILINE)
    marks = list(line.finditer(body))
    child_default = "message/rfc822" if entity.ctype == "multipart/digest" else None
    for index, mark in enumerate(marks):
        if mark.group(1):
            break
        start = mark.end() + (2 if body[mark.end() : mark.end() + 2] == b"\r\n" else 1)
        end = marks[index + 1].start() if index + 1 < len(marks) else len(body)
        part = body[start:end]
        part = part[:-2] if part.endswith(b"\r\n") else part[:-1] if part.endswith(b"\n") else part
        out += entities(part, f"{path}.{index}", child_default)
    return out


def decoded_text(entity: Entity) -> str:
    body = entity.body
    if entity.cte == "base64":
        data = base64.b64decode(b"".join(body.split()))
    elif entity.cte == "quoted-printable":
        data = binascii.a2b_qp(body)
    else:
        data = body
    charset = entity.headers.get_content_charset()
    if charset is None and entity.ctype == "text/html":
        found = re.search(rb"<meta[^>]*charset=[\"']?([\w-]+)", data, re.IGNORECASE)
        charset = found.group(1).decode() if found else None
    return data.decode(charset or "ascii")


def header_fields(block: bytes) -> list[bytes]:
    fields: list[bytes] = []
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif line.strip():
            fields.append(line)
    return fields


def owned(field: bytes) -> bool:
    name = field.split(b":", 1)[0].strip().lower()
    return name in (b"list-unsubscribe", b"list-unsubscribe-post") or name.startswith(b"x-optout-")


def check_rewrite(original: bytes, rewritten: bytes, *, failed: bool = False) -> None:
    """Every invariant of the issue, for one message; AssertionError saying which broke."""
    _check_headers(original, rewritten)
    if failed:
        assert split(rewritten)[1] == split(original)[1], "a failed rewrite changed the body"
        return
    before, after = entities(original), entities(rewritten)
    html_linked = text_linked = False
    if len(after) == len(before) + 1:
        # No part of the sender's could take the footer: one text part joins the message's
        # own multipart/mixed at its end, and holds nothing but the footer.
        added = after.pop()
        assert before[0].ctype == "multipart/mixed", "a part added outside a multipart/mixed"
        assert added.path == f"0.{sum(e.path.count('.') == 1 for e in before)}", added.path
        assert added.ctype == "text/plain" and not any(e.decorable for e in before)
        assert _ADDED_TEXT.sub("", decoded_text(added)) == "", decoded_text(added)
        text_linked = UNSUB in decoded_text(added)
    assert [e.path for e in before] == [e.path for e in after], "the MIME tree changed shape"
    pixels = 0
    for old, new in zip(before, after, strict=True):
        assert new.ctype == old.ctype, f"{old.path}: content type changed"
        assert new.headers.get_content_charset() == old.headers.get_content_charset(), (
            f"{old.path}: charset changed"
        )
        assert new.cte == old.cte, f"{old.path}: transfer encoding changed"
        if old.headers.get_content_maintype() == "multipart" and not old.sealed:
            continue  # its parts are compared one by one
        if old.sealed or not old.decorable:
            assert new.body == old.body, f"{old.path} ({old.ctype}) was touched"
            continue
        if old.path != "0":
            assert new.header_block == old.header_block, f"{old.path}: part headers changed"
        is_html = old.ctype == "text/html"
        linked = _check_text(old.path, decoded_text(old), decoded_text(new), is_html)
        pixels += decoded_text(new).count(html.escape(PIXEL))
        html_linked |= linked and is_html
        text_linked |= linked and not is_html
    decorable = [e for e in before if e.decorable]
    if any(e.ctype == "text/html" for e in decorable):
        assert html_linked, "no HTML part carries the unsubscribe link"
        assert pixels == 1, f"{pixels} tracking pixels"
    if any(e.ctype == "text/plain" for e in decorable) or not decorable:
        assert text_linked or before[0].ctype != "multipart/mixed", (
            "no text part carries the unsubscribe link"
        )
    if max(map(len, original.splitlines())) <= 998:
        longest = max(map(len, rewritten.splitlines()))
        assert longest <= 998, f"a line of {longest} octets"


def _check_headers(original: bytes, rewritten: bytes) -> None:
    old_fields = header_fields(split(original)[0])
    new_fields = header_fields(split(rewritten)[0])
    kept = [f for f in old_fields if not owned(f)]
    ours = [f for f in new_fields if owned(f)]
    assert [f for f in new_fields if not owned(f)] == [
        f if f.endswith(b"\n") else f + b"\r\n" for f in kept
    ], "a header the relay does not own was changed, dropped or moved"
    names = sorted(f.split(b":", 1)[0].lower() for f in ours)
    assert names == [b"list-unsubscribe", b"list-unsubscribe-post"], names
    headers = _PARSER.parsebytes(split(rewritten)[0])
    assert headers["List-Unsubscribe"].split(",")[0].strip() == f"<{UNSUB}>"
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def _check_text(path: str, old: str, new: str, is_html: bool) -> bool:
    """`new` is `old` with placeholders filled and at most one footer inserted: nothing else."""
    url = html.escape(UNSUB) if is_html else UNSUB
    filled = old.replace(PLACEHOLDER, url)
    if is_html:
        filled = filled.replace("%25unsubscribe_url%25", url)
    prefix = 0
    limit = min(len(filled), len(new))
    while prefix < limit and filled[prefix] == new[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit and filled[-1 - suffix] == new[-1 - suffix]:
        suffix += 1
    assert prefix + suffix >= len(filled), (
        f"{path}: the sender's text changed near {filled[prefix : prefix + 60]!r}"
    )
    # The insertion is new[k : k + size] for any k where prefix and suffix overlap; markup that
    # starts with the same characters the sender's text resumes with can sit at several k.
    size = len(new) - len(filled)
    pattern = _ADDED_HTML if is_html else _ADDED_TEXT
    candidates = [new[k : k + size] for k in range(prefix, len(filled) - suffix - 1, -1)]
    leftovers = [pattern.sub("", added) for added in candidates]
    assert "" in leftovers, f"{path}: unexpected insertion {leftovers[0]!r}"
    added = candidates[leftovers.index("")]
    if PLACEHOLDER in old or "%25unsubscribe_url%25" in old:
        assert url not in added, f"{path}: footer added despite the placeholder"
    return url in new
