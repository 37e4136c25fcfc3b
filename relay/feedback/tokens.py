"""Compact signed addresses naming one copy of one message, for the feedback domain.

A full itsdangerous token naming a copy (recipient hash, queue id, campaign, scope, the
time) is over 100 characters; an address's local part has at most 64 octets (RFC 5321
§4.5.3.1.1), and mailbox providers fold its case. So an address carries only

    KIND "-" COPY-ID "-" MAC        e.g. b-mfrggzdfmztwq2l-k5xgs4dfnzsxg5dbmrqwczlz

- KIND: `b` for the envelope sender (a bounce comes back to it), `u` for the
  List-Unsubscribe mailto: address, `r` for the CFBL-Feedback-ID reference header;
- COPY-ID: 8 octets naming the copy, whose details live in the `feedback_copies` table;
- MAC: the first 10 octets of the signing keys' HMAC of the copy id, in the namespace of
  that kind (tracking.signing: itsdangerous' key derivation, newest key signs, every listed
  key verifies), so a bounce address never passes as an unsubscribe address, nor the reverse.

Both parts are base32 in lower case (RFC 4648 without padding): case-insensitive, as a
local part must be in practice, 32 characters in all. A copy id is derived from the queue id
and the recipient's hash, so a retried copy keeps its address.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum

from tracking.signing import Namespace, Signer

COPY_ID_SIZE = 8
MAC_SIZE = 10
_TOKEN = re.compile(r"^([bur])-([a-z2-7]{13})-([a-z2-7]{16})$")


class TokenKind(StrEnum):
    RETURN_PATH = "b"
    MAILTO = "u"
    REFERENCE = "r"


_NAMESPACES = {
    TokenKind.RETURN_PATH: Namespace.RETURN_PATH,
    TokenKind.MAILTO: Namespace.MAILTO,
    TokenKind.REFERENCE: Namespace.FEEDBACK_REF,
}


def copy_id(queue_id: str, address_hash: str) -> bytes:
    """The id of the copy of message `queue_id` for the recipient with this keyed hash."""
    return hashlib.blake2b(
        f"{queue_id}\0{address_hash}".encode(), digest_size=COPY_ID_SIZE, person=b"optout-copy"
    ).digest()


def copy_id_text(copy: bytes) -> str:
    return _b32(copy)


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _unb32(text: str) -> bytes:
    padded = text.upper() + "=" * (-len(text) % 8)
    return base64.b32decode(padded)


@dataclass(frozen=True, slots=True)
class CopyToken:
    """A verified token: which kind, which copy, which key signed it."""

    kind: TokenKind
    copy_id: bytes
    key_id: str


class CopyTokens:
    """Makes and checks the local parts of the copy addresses."""

    def __init__(self, signer: Signer) -> None:
        self._signer = signer

    def make(self, kind: TokenKind, copy: bytes) -> str:
        mac = self._signer.short_mac(_NAMESPACES[kind], copy, MAC_SIZE)
        return f"{kind.value}-{_b32(copy)}-{_b32(mac)}"

    def address(self, kind: TokenKind, copy: bytes, domain: str) -> str:
        return f"{self.make(kind, copy)}@{domain}"

    def check(self, token: str, kind: TokenKind | None = None) -> CopyToken | None:
        """The copy a genuine token names (of `kind`, if given); None for anything else."""
        match = _TOKEN.match(token.strip().lower())
        if match is None:
            return None
        found = TokenKind(match.group(1))
        if kind is not None and found is not kind:
            return None
        try:
            copy, mac = _unb32(match.group(2)), _unb32(match.group(3))
        except (binascii.Error, ValueError):
            return None
        # Only the one canonical spelling: spare bits in the last character make others.
        if _b32(copy) != match.group(2) or _b32(mac) != match.group(3):
            return None
        key = self._signer.check_short_mac(_NAMESPACES[found], copy, mac)
        return None if key is None else CopyToken(found, copy, key)

    def find(self, text: str, kind: TokenKind | None = None) -> CopyToken | None:
        """The first genuine token anywhere in `text` (a header returned in a report)."""
        for candidate in _ANYWHERE.findall(text.lower()):
            token = self.check(candidate, kind)
            if token is not None:
                return token
        return None


_ANYWHERE = re.compile(r"(?<![a-z0-9])[bur]-[a-z2-7]{13}-[a-z2-7]{16}(?![a-z0-9])")
