"""Address normalisation and keyed address hashes, used by every store and check."""

from __future__ import annotations

import base64
import hashlib
import hmac
import unicodedata

from .errors import InvalidAddress

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255


def normalize_address(address: str, *, fold_local_part: bool = True) -> str:
    """The one canonical spelling of an address, so that lookups cannot miss by case.

    The domain is case-insensitive (RFC 5321 §2.4) and compared in its IDNA ASCII form; the
    local part is NFC-normalised and, by default, case-folded because receiving systems treat
    it case-insensitively in practice. Nothing else (dots, +tags) is guessed.
    """
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        raise InvalidAddress(address, "expected local-part@domain")
    if any(ch.isspace() or unicodedata.category(ch) == "Cc" for ch in text):
        raise InvalidAddress(address, "contains whitespace or control characters")
    local = unicodedata.normalize("NFC", local)
    if fold_local_part:
        local = local.casefold()
    domain = unicodedata.normalize("NFC", domain).rstrip(".").lower()
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise InvalidAddress(address, "domain is not a valid internationalised name") from exc
    if len(local.encode("utf-8")) > MAX_LOCAL_PART or len(domain) > MAX_DOMAIN or not domain:
        raise InvalidAddress(address, "local part or domain too long")
    return f"{local}@{domain}"


class AddressHasher:
    """HMAC of normalised addresses: the key that survives erasure of the address itself."""

    def __init__(self, key: bytes, *, fold_local_part: bool = True) -> None:
        if len(key) < 16:
            raise ValueError("address hash key must be at least 16 bytes")
        self._key = key
        self.fold_local_part = fold_local_part

    def normalize(self, address: str) -> str:
        return normalize_address(address, fold_local_part=self.fold_local_part)

    def hash(self, address: str) -> str:
        """22 URL-safe characters (128 bits) naming `address` without revealing it."""
        normalized = self.normalize(address)
        digest = hmac.new(self._key, normalized.encode("utf-8"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode("ascii")
