"""DKIM-Signature fields (RFC 6376) over relaxed/relaxed canonicalisation, RSA-SHA256 and
Ed25519-SHA256 (RFC 8463).

The signatures are the ones dkimpy makes for the same message, key, header list and timestamp
(same tags in the same order, same `b=` and `bh=`), made with OpenSSL's RSA through `cryptography`
instead of dkimpy's pure-Python arithmetic. A message is signed as SMTP carries it: the relay's
client (relay.smtp_client) sends every CR, LF or CRLF line break as CRLF and ends the data
with CRLF, so the signature is computed over that form. This is where dkimpy, which signs bare
CRs and an unterminated last line as they are, would make a signature that fails at the
receiver. Header values lose only SP and HTAB at their ends (RFC 6376 section 3.4.2).
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Iterable
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from ..mime import crlf_line_breaks
from ..names import domain_name, selector_name
from .errors import DkimError, DkimKeyError, DkimMessageError

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

#: Always in `h=`, each listed once more than the message has it (so once when absent): nobody can
#: add one later without breaking the signature.
SIGNED_HEADERS: Final = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-unsubscribe",
    "list-unsubscribe-post",
)
#: In `h=` only when the message has them, then over-signed the same way. The feedback
#: fields (relay.feedback.outgoing) must be signed by the domain they name (RFC 9477 §3.1).
#: List-Id: the relay adds it to campaign mail (RFC 2919); receivers group list mail by it.
SIGNED_IF_PRESENT: Final = (
    "reply-to",
    "sender",
    "in-reply-to",
    "references",
    "cfbl-address",
    "cfbl-feedback-id",
    "feedback-id",
    "list-id",
)

#: Fields a signer must not cover: they change in transit, or are the signature itself.
_NEVER_SIGNED: Final = frozenset(
    {"dkim-signature", "received", "return-path", "bcc", "resent-bcc", "arc-seal"}
)
MIN_RSA_BITS: Final = 1024  # RFC 8301: verifiers reject shorter keys
MAX_LINE: Final = 78  # RFC 5322 recommends lines of at most 78 characters

_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 ftext
_WSP = re.compile(rb"[ \t]+")
_SPACES = re.compile(rb"  +")
_PKCS1 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()
_CRLF = b"\r\n"


def check_domain(domain: str) -> str:
    """`domain` as DKIM writes it (d=): the relay's one rule for domain names, as a DkimError."""
    try:
        return domain_name(domain)
    except ValueError:
        raise DkimError(f"DKIM domain {domain!r} is not a valid domain name") from None


def check_selector(selector: str) -> str:
    """`selector` as DKIM writes it (s=), as a DkimError."""
    try:
        return selector_name(selector)
    except ValueError:
        raise DkimError(f"DKIM selector {selector!r} is not a valid selector") from None


def algorithm_of(key: PrivateKey) -> str:
    """The `a=` value a key signs with; DkimKeyError for key types or sizes DKIM does not allow."""
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise DkimKeyError(
                f"RSA key of {key.key_size} bits is too short for DKIM (at least {MIN_RSA_BITS})"
            )
        return "rsa-sha256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519-sha256"
    raise DkimKeyError(f"{type(key).__name__} keys cannot sign DKIM; use RSA or Ed25519")


class DkimSigner:
    """Signs messages for one domain with one key (and optionally a second key, typically Ed25519
    beside RSA, each under its own selector). Build once, call `sign` for every copy."""

    def __init__(
        self,
        domain: str,
        selector: str,
        private_key: PrivateKey,
        *,
        second: tuple[str, PrivateKey] | None = None,
        signed_headers: Iterable[str] = SIGNED_HEADERS,
    ) -> None:
        self.domain = check_domain(domain)
        keys = [(check_selector(selector), private_key)]
        if second is not None:
            keys.append((check_selector(second[0]), second[1]))
            if keys[0][0] == keys[1][0]:
                raise DkimError(f"the two DKIM keys of {self.domain} need different selectors")
        self._keys = [(sel.encode(), algorithm_of(key).encode(), key) for sel, key in keys]
        self.selectors = tuple(sel for sel, _ in keys)
        always = _header_names(signed_headers)
        if "from" not in always:
            raise DkimError("DKIM must sign the From header field (RFC 6376 section 5.4)")
        optional = [name for name in _header_names(SIGNED_IF_PRESENT) if name not in always]
        self._plan = [(name.encode(), True) for name in always]
        self._plan += [(name.encode(), False) for name in optional]

    def __repr__(self) -> str:
        return f"DkimSigner(domain={self.domain!r}, selectors={self.selectors!r})"

    def sign(
        self, message: bytes, *, timestamp: int | None = None, smtp_form: bool = False
    ) -> bytes:
        """The DKIM-Signature field(s) to put in front of `message`, CRLF-terminated, the first
        key's signature first. `message` is signed as SMTP carries it: any CR, LF or CRLF line
        break as CRLF, ending in CRLF. `timestamp` (seconds since the epoch) defaults to now.
        `smtp_form`: `message` is in that form already (relay.mime.smtp_lines)."""
        when = int(time.time()) if timestamp is None else int(timestamp)
        if when < 0:
            raise DkimError("the DKIM timestamp cannot be before 1970")
        if not smtp_form:
            message = crlf_line_breaks(message)
        fields, body_start = _header_fields(message)
        if b"from" not in fields:
            raise DkimMessageError("the message has no From header field, which DKIM must sign")
        names: list[bytes] = []
        canonical: list[bytes] = []
        for name, always in self._plan:
            values = fields.get(name)
            if values is None:
                if always:
                    names.append(name)
                continue
            names += [name] * (len(values) + 1)
            for pieces in reversed(values):  # the last instance is signed first (5.4.2)
                value = _WSP.sub(b" ", b"".join(pieces)).strip(b" ")
                canonical.append(b"%s:%s\r\n" % (name, value))
        signed_fields = b"".join(canonical)
        body_hash = base64.b64encode(_body_hash(message, body_start))
        domain = self.domain.encode()
        out = []
        for selector, algorithm, key in self._keys:
            tags = [
                b"v=1",
                b"a=" + algorithm,
                b"c=relaxed/relaxed",
                b"d=" + domain,
                b"i=@" + domain,
                b"q=dns/txt",
                b"s=" + selector,
                b"t=%d" % when,
                b"h=" + b" : ".join(names),
                b"bh=" + body_hash,
            ]
            unsigned = b"; ".join([*tags, b"b="])
            data = signed_fields + b"dkim-signature:" + unsigned
            if isinstance(key, rsa.RSAPrivateKey):
                signature = key.sign(data, _PKCS1, _SHA256)
            else:
                signature = key.sign(hashlib.sha256(data).digest())
            out.append(_fold(tags, base64.b64encode(signature)))
        return b"".join(out)


def signing_domains(message: bytes) -> list[str]:
    """The `d=` domains of the DKIM-Signature fields `message` already carries, top first."""
    fields, _ = _header_fields(crlf_line_breaks(message))
    domains = []
    for pieces in fields.get(b"dkim-signature", []):
        value = b"".join(pieces)
        match = re.search(rb"(?:^|;)[ \t]*d[ \t]*=[ \t]*([^; \t]+)", value)
        if match:
            domains.append(match.group(1).decode("ascii", "replace").lower())
    return domains


def _header_names(names: Iterable[str]) -> list[str]:
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if not name.isascii() or not _FIELD_NAME.fullmatch(name.encode()):
            raise DkimError(f"{raw!r} is not a header field name")
        if name in _NEVER_SIGNED:
            raise DkimError(f"the {raw} header field must not be signed")
        if name not in out:
            out.append(name)
    return out


def _header_fields(message: bytes) -> tuple[dict[bytes, list[list[bytes]]], int]:
    """Header fields of a CRLF-only message by lower-case name, each field as the pieces of its
    value (the text after the colon, then each continuation line, CRLFs removed: unfolded), in
    message order; and the offset where the body starts (past the empty line), or len(message)."""
    fields: dict[bytes, list[list[bytes]]] = {}
    current: list[bytes] | None = None
    pos, size, number = 0, len(message), 0
    while pos < size:
        end = message.find(_CRLF, pos)
        if end < 0:
            end = size
        following = min(end + 2, size)
        line = message[pos:end]
        number += 1
        if not line:
            return fields, following
        if line[0] in b" \t":
            if current is None:
                raise DkimMessageError(f"header line {number} continues no header field")
            current.append(line)
        else:
            colon = line.find(b":")
            name = line[:colon].rstrip(b" \t") if colon > 0 else b""
            if _FIELD_NAME.fullmatch(name):
                current = [line[colon + 1 :]]
                fields.setdefault(name.lower(), []).append(current)
            elif number == 1 and line.startswith(b"From "):
                current = None  # an mbox separator, not part of the message
            else:
                raise DkimMessageError(f"header line {number} is not a header field")
        pos = following
    return fields, size


def _body_hash(message: bytes, start: int) -> bytes:
    """SHA-256 of the relaxed canonical body (RFC 6376 section 3.4.4) of a CRLF-only message."""
    body = message[start:]
    if not body:
        return hashlib.sha256(b"").digest()
    if not body.endswith(_CRLF):
        body += _CRLF  # as SMTP sends it
    if b"\t" in body:
        body = body.replace(b"\t", b" ")
    if b"  " in body:
        body = _SPACES.sub(b" ", body)  # every run of WSP is now one SP
    if b" \r\n" in body:
        body = body.replace(b" \r\n", _CRLF)  # so this drops all trailing WSP
    end = len(body)
    while body.endswith(_CRLF, 0, end):
        end -= 2
    if end == 0:
        return hashlib.sha256(b"").digest()  # only empty lines: the empty body
    return hashlib.sha256(memoryview(body)[: end + 2]).digest()


def _fold(tags: list[bytes], signature: bytes) -> bytes:
    """`DKIM-Signature: tag; tag; ...; b=...` folded at the spaces between words into lines of at
    most MAX_LINE characters where a word allows it; `b=` starts its own line and its base64 is cut
    across lines (FWS is allowed there and the verifier drops the whole value)."""
    lines: list[bytes] = []
    line = b"DKIM-Signature:"
    for word in [*b"; ".join(tags).split(b" "), b";"]:
        if word == b";":
            line += word
        elif len(line) + 1 + len(word) <= MAX_LINE:
            line += b" " + word
        else:
            lines.append(line)
            line = b" " + word
    lines.append(line)
    text = b"b=" + signature
    first = MAX_LINE - 1
    lines += [b" " + text[i : i + first] for i in range(0, len(text), first)]
    return _CRLF.join(lines) + _CRLF
