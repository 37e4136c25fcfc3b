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
import functools
import hashlib
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from ..mime import crlf_line_breaks, smtp_lines
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

    @property
    def private_keys(self) -> tuple[PrivateKey, ...]:
        return tuple(key for _, _, key in self._keys)

    def sign(
        self,
        message: bytes,
        *,
        timestamp: int | None = None,
        smtp_form: bool = False,
        memo: SigningMemo | None = None,
    ) -> bytes:
        """The DKIM-Signature field(s) to put in front of `message`, CRLF-terminated, the first
        key's signature first. `message` is signed as SMTP carries it: any CR, LF or CRLF line
        break as CRLF, ending in CRLF. `timestamp` (seconds since the epoch) defaults to now.
        `smtp_form`: `message` is in that form already (relay.mime.smtp_lines).
        `memo`: one per message whose copies differ only here and there (personalised
        copies): what they share is read and hashed once (`SigningMemo`)."""
        return self.prepare(message, timestamp=timestamp, smtp_form=smtp_form, memo=memo).finish()

    def prepare(
        self,
        message: bytes,
        *,
        timestamp: int | None = None,
        smtp_form: bool = False,
        memo: SigningMemo | None = None,
    ) -> UnsignedFields:
        """All of `sign` but the private-key operations, which `UnsignedFields.finish` does,
        or a signing helper in another process (relay.dkim.helper)."""
        when = int(time.time()) if timestamp is None else int(timestamp)
        if when < 0:
            raise DkimError("the DKIM timestamp cannot be before 1970")
        if not smtp_form:
            message = crlf_line_breaks(message)
        known: Mapping[int, bytes] = {}
        if memo is None:
            fields, body_start = _header_fields(message)
            body_digest = _body_hash(message, body_start)
        else:
            fields, body_digest, known = memo.read(message)
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
                line = known.get(id(pieces))
                canonical.append(_canonical_field(name, pieces) if line is None else line)
        signed_fields = b"".join(canonical)
        body_hash = base64.b64encode(body_digest)
        domain = self.domain.encode()
        unsigned = []
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
            data = signed_fields + b"dkim-signature:" + b"; ".join([*tags, b"b="])
            unsigned.append(UnsignedField(key, tags, data))
        return UnsignedFields(tuple(unsigned))


@dataclass(frozen=True, slots=True)
class UnsignedField:
    """One DKIM-Signature field of a copy, all but its signature."""

    key: PrivateKey
    tags: list[bytes]
    data: bytes  # what the signature covers: the signed fields and this field without b=

    def signature(self) -> bytes:
        """The key's signature of `data`. The RSA or Ed25519 operation lets go of the GIL."""
        if isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.sign(self.data, _PKCS1, _SHA256)
        return self.key.sign(hashlib.sha256(self.data).digest())


@dataclass(frozen=True, slots=True)
class UnsignedFields:
    """A copy's DKIM-Signature fields, all but their signatures (`DkimSigner.prepare`)."""

    fields: tuple[UnsignedField, ...]

    def finish(self) -> bytes:
        """The fields, signed, as `DkimSigner.sign` gives them."""
        return self.signed_with([field.signature() for field in self.fields])

    def signed_with(self, signatures: Sequence[bytes]) -> bytes:
        """The fields with these signatures, one per field, made elsewhere."""
        return b"".join(
            _fold(field.tags, base64.b64encode(signature))
            for field, signature in zip(self.fields, signatures, strict=True)
        )


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


Fields = dict[bytes, list[list[bytes]]]


def _header_fields(message: bytes, pos: int = 0, number: int = 0) -> tuple[Fields, int]:
    """Header fields of a CRLF-only message by lower-case name, each field as the pieces of its
    value (the text after the colon, then each continuation line, CRLFs removed: unfolded), in
    message order; and the offset where the body starts (past the empty line), or len(message).
    From `pos` on, the start of line `number` + 1, when a field starts there."""
    fields: Fields = {}
    current: list[bytes] | None = None
    size = len(message)
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


def _canonical_field(name: bytes, pieces: list[bytes]) -> bytes:
    """A field in relaxed header canonicalisation (RFC 6376 section 3.4.2), CRLF-terminated."""
    return b"%s:%s\r\n" % (name, _WSP.sub(b" ", b"".join(pieces)).strip(b" "))


def _body_hash(message: bytes, start: int) -> bytes:
    """SHA-256 of the relaxed canonical body (RFC 6376 section 3.4.4) of a CRLF-only message."""
    return hashlib.sha256(_canonical_body(message[start:])).digest()


def _relaxed_lines(body: bytes) -> bytes:
    """Complete CRLF-terminated lines with the relaxed body canonicalisation of each: WSP runs
    as one SP, none at a line's end. Line by line, so lines may be done in parts."""
    if b"\t" in body:
        body = body.replace(b"\t", b" ")
    if b"  " in body:
        body = _SPACES.sub(b" ", body)  # every run of WSP is now one SP
    if b" \r\n" in body:
        body = body.replace(b" \r\n", _CRLF)  # so this drops all trailing WSP
    return body


def _canonical_body(body: bytes) -> bytes | memoryview:
    """The relaxed canonical form of a CRLF-only body: `_relaxed_lines`, with the empty lines
    at its end dropped (only empty lines: the empty body)."""
    if not body:
        return b""
    if not body.endswith(_CRLF):
        body += _CRLF  # as SMTP sends it
    return _without_empty_end(_relaxed_lines(body))


def _without_empty_end(body: bytes) -> bytes | memoryview:
    """Relaxed CRLF-terminated lines less the empty lines at their end."""
    end = len(body)
    while body.endswith(_CRLF, 0, end):
        end -= 2
    if end == 0:
        return b""  # only empty lines: the empty body
    return memoryview(body)[: end + 2]


def _common_prefix(a: bytes, b: bytes) -> int:
    """How many bytes `a` and `b` have in common from their start (compared a half at a
    time: a few memcmp calls instead of a Python loop over every byte)."""
    low, high = 0, min(len(a), len(b))
    if a[:high] == b[:high]:
        return high
    while high - low > 1:  # a[:low] == b[:low], a[:high] != b[:high]
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True, slots=True)
class _SharedHead:
    prefix: bytes  # whole header lines, ending with a field's last line
    lines: int
    fields: Fields  # of the prefix
    canonical: dict[int, bytes]  # their canonical form, by the id of their pieces


@dataclass(frozen=True, slots=True)
class _SharedLines:
    lines: bytes  # whole lines of the body, the same in every copy
    anchor: bytes  # their start, to find them by
    canonical: bytes  # their relaxed form


class SigningMemo:
    """What the copies of one message have in common, read once for all of them.

    Personalised copies differ only in a few header fields and in the body lines that carry
    a recipient's URLs. The second copy signed is compared with the first; from then on the
    header lines before the first difference are parsed once, and the runs of body lines
    the two shared are canonicalised once: each copy canonicalises only its own lines in
    between. A shared part is used only where a copy has exactly those bytes (checked every
    time, at line starts), so the result is always that of reading the whole copy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._first: tuple[bytes, int] | None = None
        self._learnt = False
        self._head: _SharedHead | None = None
        self._body: tuple[_SharedLines, ...] = ()

    def read(self, message: bytes) -> tuple[Fields, bytes, Mapping[int, bytes]]:
        """The header fields of a CRLF-only `message`, its body's digest, and the canonical
        form of the fields read once (by the id of their pieces)."""
        head, body = self._head, self._body
        fields: Fields | None = None
        known: Mapping[int, bytes] = {}
        if head is not None and message.startswith(head.prefix):
            cut = len(head.prefix)
            if message[cut : cut + 1] not in (b" ", b"\t"):  # no field goes on over the cut
                rest, body_start = _header_fields(message, cut, head.lines)
                fields = dict(head.fields)
                for name, values in rest.items():
                    fields[name] = fields.get(name, []) + values
                known = head.canonical
        if fields is None:
            fields, body_start = _header_fields(message)
        canonical = _canonical_with(body, message, body_start) if body else None
        if canonical is None:
            digest = _body_hash(message, body_start)
        else:
            digest = hashlib.sha256(canonical).digest()
        if not self._learnt:
            self._learn(message, body_start)
        return fields, digest, known

    def smtp_lines(self, copy: bytes) -> bytes:
        """`relay.mime.smtp_lines(copy)`: the copy as SMTP carries it, and signed. The parts
        shared with the copies signed before are in that form already; only the rest of
        `copy` is looked at when it has them (a copy of one message rendered again)."""
        head, runs = self._head, self._body
        if head is None or not runs or not copy.startswith(head.prefix):
            return smtp_lines(copy)
        pos = len(head.prefix)
        for run in runs:
            at = copy.find(run.anchor, pos)
            if at < 0 or not copy.startswith(run.lines, at) or not _crlf_only(copy[pos:at]):
                return smtp_lines(copy)
            pos = at + len(run.lines)
        tail = copy[pos:]
        if not _crlf_only(tail):
            return smtp_lines(copy)
        return copy if not tail or tail.endswith(_CRLF) else copy + _CRLF

    def _learn(self, message: bytes, body_start: int) -> None:
        with self._lock:
            if self._learnt:
                return
            if len(message) > LEARN_UP_TO:
                # Not kept nor compared: a copy this big is read whole, as without a memo.
                self._first, self._learnt = None, True
                return
            if self._first is None:
                self._first = (message, body_start)
                return
            first, first_body = self._first
            self._first = None
            self._learnt = True
        self._head = _shared_head(first, first_body, message, body_start)
        self._body = _shared_lines(first[first_body:], message[body_start:])


#: Runs of shared body lines shorter than this are canonicalised with each copy's own.
MIN_SHARED = 256
ANCHOR = 64
#: Copies bigger than this teach a memo nothing (the first would be kept until the second).
LEARN_UP_TO = 2 * 1024 * 1024


def _crlf_only(data: bytes) -> bool:
    """No line break in `data` but CRLF (and no CR or LF of one cut off at either end)."""
    crlf = data.count(_CRLF)
    return data.count(b"\n") == crlf and data.count(b"\r") == crlf


def _canonical_with(
    shared: tuple[_SharedLines, ...], message: bytes, body_start: int
) -> bytes | memoryview | None:
    """The canonical body of `message`, the `shared` runs of lines taken as canonicalised
    already; None when the message lacks one of them (in order, each at a line start)."""
    pos, parts = body_start, []
    for run in shared:
        at = message.find(run.anchor, pos)
        if at < 0 or not message.startswith(run.lines, at):
            return None
        if at > pos:
            if not message.startswith(_CRLF, at - 2):
                return None
            parts.append(_relaxed_lines(message[pos:at]))
        parts.append(run.canonical)
        pos = at + len(run.lines)
    tail = message[pos:]
    if tail and not tail.endswith(_CRLF):
        tail += _CRLF  # as SMTP sends it
    parts.append(_relaxed_lines(tail))
    return _without_empty_end(b"".join(parts))


def _shared_lines(first: bytes, body: bytes) -> tuple[_SharedLines, ...]:
    """The runs of whole lines two bodies share (personalised copies: the same lines but
    around their recipient's URLs, which may take a line more or less in one than in the
    other, a quoted-printable line wrapped elsewhere)."""
    theirs = body.splitlines(keepends=True)
    runs: list[_SharedLines] = []
    run: list[bytes] = []
    previous = -1
    block_of = _aligned(first.splitlines(keepends=True), theirs)
    for line, block in [*zip(theirs, block_of, strict=True), (b"", -1)]:
        if block >= 0 and block == previous and line.endswith(_CRLF):
            run.append(line)
            continue
        lines = b"".join(run)
        if len(lines) >= MIN_SHARED:
            runs.append(_SharedLines(lines, lines[:ANCHOR], _relaxed_lines(lines)))
        run = [line] if block >= 0 and line.endswith(_CRLF) else []
        previous = block
    return tuple(runs)


#: How far apart (in lines) two copies may get their lines back in step after a difference,
#: and after how many differences they are not compared any further.
RESYNC_WINDOW = 8
RESYNC_LIMIT = 256


def _aligned(mine: list[bytes], theirs: list[bytes]) -> list[int]:
    """For each of `theirs`, the number of the block of lines it shares with `mine` (lines
    that follow one another in both), or -1: line for line, and after each difference the
    nearest pair of equal lines within RESYNC_WINDOW lines of it (a linear-time diff for
    copies that differ here and there; any pairing will do, as a copy's use of a run is
    checked byte for byte)."""
    block_of = [-1] * len(theirs)
    i = j = block = 0
    while i < len(mine) and j < len(theirs):
        if mine[i] == theirs[j]:
            block_of[j] = block
            i, j = i + 1, j + 1
            continue
        block += 1
        if block > RESYNC_LIMIT:
            break
        step = _resync(mine, theirs, i, j)
        if step is None:
            break
        i, j = i + step[0], j + step[1]
    return block_of


def _resync(mine: list[bytes], theirs: list[bytes], i: int, j: int) -> tuple[int, int] | None:
    for total in range(1, 2 * RESYNC_WINDOW + 1):
        for skip in range(max(0, total - RESYNC_WINDOW), min(total, RESYNC_WINDOW) + 1):
            a, b = i + skip, j + total - skip
            if a < len(mine) and b < len(theirs) and mine[a] == theirs[b]:
                return skip, total - skip
    return None


def _shared_head(
    first: bytes, first_body: int, message: bytes, body_start: int
) -> _SharedHead | None:
    """The header lines two copies share: up to the start of the field in which they
    first differ (the empty line that ends the header block is no field of it)."""
    if not (_ends_header(first, first_body) and _ends_header(message, body_start)):
        return None
    same = _common_prefix(first[: first_body - 2], message[: body_start - 2])
    cut = _line_start(message, same)  # of the line where they differ
    while cut > 0 and message[cut : cut + 1] in (b" ", b"\t"):
        cut = _line_start(message, cut - 2)  # a continuation: back to its field
    if cut <= 0:
        return None
    prefix = message[:cut]
    fields, _ = _header_fields(prefix)
    canonical = {
        id(pieces): _canonical_field(name, pieces)
        for name, values in fields.items()
        for pieces in values
    }
    return _SharedHead(prefix, prefix.count(_CRLF), fields, canonical)


def _line_start(data: bytes, pos: int) -> int:
    """Where the line that `data[pos]` belongs to starts (a CRLF belongs to its line)."""
    end = data.rfind(_CRLF, 0, pos)
    return 0 if end < 0 else end + 2


def _ends_header(message: bytes, body_start: int) -> bool:
    """The header block ends with an empty line at `body_start`."""
    return (
        body_start >= 2
        and message.startswith(_CRLF, body_start - 2)
        and (body_start == 2 or message.startswith(_CRLF, body_start - 4))
    )


def _fold(tags: list[bytes], signature: bytes) -> bytes:
    """`DKIM-Signature: tag; tag; ...; b=...` folded at the spaces between words into lines of at
    most MAX_LINE characters where a word allows it; `b=` starts its own line and its base64 is cut
    across lines (FWS is allowed there and the verifier drops the whole value)."""
    done, line = _folded_head(tuple(tags[:-1]))
    lines, line = _fold_words([*tags[-1].split(b" "), b";"], [*done], line)
    lines.append(line)
    text = b"b=" + signature
    first = MAX_LINE - 1
    lines += [b" " + text[i : i + first] for i in range(0, len(text), first)]
    return _CRLF.join(lines) + _CRLF


@functools.lru_cache(maxsize=64)
def _folded_head(tags: tuple[bytes, ...]) -> tuple[tuple[bytes, ...], bytes]:
    """The tags before `bh=` folded, the same for every copy signed in the same second."""
    lines, line = _fold_words((b"; ".join(tags) + b";").split(b" "), [], b"DKIM-Signature:")
    return tuple(lines), line


def _fold_words(words: list[bytes], lines: list[bytes], line: bytes) -> tuple[list[bytes], bytes]:
    """`words` added to `line`, each full line moved to `lines`."""
    for word in words:
        if word == b";":
            line += word
        elif len(line) + 1 + len(word) <= MAX_LINE:
            line += b" " + word
        else:
            lines.append(line)
            line = b" " + word
    return lines, line
