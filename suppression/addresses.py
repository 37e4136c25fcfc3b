"""Address normalisation and keyed address hashes, used by every store and check."""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import unicodedata
from dataclasses import dataclass

from .errors import InvalidAddress

_SHA256_BLOCK = 64
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255

# ASCII whitespace and control characters; non-ASCII input takes the slower Unicode check.
_ASCII_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")
# How hashed lists exchanged by advertisers name an address, as keys in the suppressions table.
MD5_PREFIX = "md5:"
SHA256_PREFIX = "sha256:"


@dataclass(frozen=True, slots=True)
class NormalizationPolicy:
    """How far two spellings of an address are taken to be the same mailbox.

    Only case folding of the local part is on by default: receiving systems treat it
    case-insensitively in practice. Sub-address (+tag) and dot stripping are guesses about
    particular providers, so they happen only when configured.
    """

    fold_local_part: bool = True
    strip_subaddress: bool = False
    ignore_dots_domains: tuple[str, ...] = ()

    def describe(self) -> str:
        """A stable text naming the policy, pinned in the database (see `verify_normalization`)."""
        dots = ",".join(sorted(_dots_domains(self.ignore_dots_domains)))
        return (
            f"fold_local_part={int(self.fold_local_part)};"
            f"strip_subaddress={int(self.strip_subaddress)};ignore_dots_domains={dots}"
        )


DEFAULT_POLICY = NormalizationPolicy()


@functools.lru_cache(maxsize=65536)
def _domain_ascii(domain: str) -> str:
    """The IDNA ASCII form of a domain; cached because lists repeat a few domains a lot."""
    if not domain.isascii():
        domain = unicodedata.normalize("NFC", domain)
    domain = domain.rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise ValueError("domain is not a valid internationalised name") from exc


@functools.lru_cache(maxsize=64)
def _dots_domains(domains: tuple[str, ...]) -> frozenset[str]:
    return frozenset(_domain_ascii(d) for d in domains)


@functools.lru_cache(maxsize=65536)
def _domain_unicode(ascii_domain: str) -> str:
    if "xn--" not in ascii_domain:
        return ascii_domain
    try:
        return ascii_domain.encode("ascii").decode("idna").lower()
    except UnicodeError:
        return ascii_domain


def split_address(address: str) -> tuple[str, str]:
    """(NFC local part, IDNA ASCII domain) of a syntactically plausible address."""
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        raise InvalidAddress(address, "expected local-part@domain")
    if text.isascii():
        if _ASCII_FORBIDDEN.search(text):
            raise InvalidAddress(address, "contains whitespace or control characters")
    else:
        if any(ch.isspace() or unicodedata.category(ch) == "Cc" for ch in text):
            raise InvalidAddress(address, "contains whitespace or control characters")
        local = unicodedata.normalize("NFC", local)
    try:
        ascii_domain = _domain_ascii(domain)
    except ValueError as exc:
        raise InvalidAddress(address, str(exc)) from None
    if len(local.encode("utf-8")) > MAX_LOCAL_PART or len(ascii_domain) > MAX_DOMAIN:
        raise InvalidAddress(address, "local part or domain too long")
    if not ascii_domain or ascii_domain.startswith("."):
        raise InvalidAddress(address, "domain is empty")
    return local, ascii_domain


def normalize_address(
    address: str, *, fold_local_part: bool = True, policy: NormalizationPolicy | None = None
) -> str:
    """The one canonical spelling of an address, so that lookups cannot miss by case.

    The domain is case-insensitive (RFC 5321 §2.4) and compared in its IDNA ASCII form; the
    local part is NFC-normalised and, by default, case-folded. Nothing else (dots, +tags) is
    guessed unless `policy` says so.
    """
    if policy is None:
        policy = DEFAULT_POLICY if fold_local_part else NormalizationPolicy(False)
    local, domain = split_address(address)
    if policy.fold_local_part:
        local = local.casefold()
    if policy.strip_subaddress and "+" in local[1:]:
        local = local[: local.index("+", 1)]
    if policy.ignore_dots_domains and domain in _dots_domains(policy.ignore_dots_domains):
        local = local.replace(".", "") or local
    return f"{local}@{domain}"


def digest_texts(address: str) -> tuple[str, ...]:
    """The spellings advertisers hash: the whole address lowercased, domain ASCII or Unicode."""
    local, domain = split_address(address)
    local = local.lower()
    texts = [f"{local}@{domain}"]
    unicode_domain = _domain_unicode(domain)
    if unicode_domain != domain:
        texts.append(f"{local}@{unicode_domain}")
    return tuple(texts)


def digest_keys(address: str) -> tuple[str, ...]:
    """The md5:/sha256: keys under which a hashed list would have listed `address`."""
    keys: list[str] = []
    for text in digest_texts(address):
        data = text.encode("utf-8")
        keys.append(MD5_PREFIX + hashlib.md5(data, usedforsecurity=False).hexdigest())
        keys.append(SHA256_PREFIX + hashlib.sha256(data).hexdigest())
    return tuple(keys)


class AddressHasher:
    """HMAC of normalised addresses: the key that survives erasure of the address itself."""

    def __init__(
        self,
        key: bytes,
        *,
        fold_local_part: bool = True,
        policy: NormalizationPolicy | None = None,
    ) -> None:
        if len(key) < 16:
            raise ValueError("address hash key must be at least 16 bytes")
        # HMAC-SHA256 (RFC 2104) with the padded-key states hashed once: every address of
        # a million-row import is hashed, and hmac.digest() redoes this key setup each time.
        if len(key) > _SHA256_BLOCK:
            key = hashlib.sha256(key).digest()
        padded = key.ljust(_SHA256_BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))
        self.policy = policy or (DEFAULT_POLICY if fold_local_part else NormalizationPolicy(False))

    @property
    def fold_local_part(self) -> bool:
        return self.policy.fold_local_part

    def normalize(self, address: str) -> str:
        return normalize_address(address, policy=self.policy)

    def hash(self, address: str) -> str:
        """22 URL-safe characters (128 bits) naming `address` without revealing it."""
        return self.hash_normalized(self.normalize(address))

    def hash_normalized(self, normalized: str) -> str:
        inner = self._inner.copy()
        inner.update(normalized.encode("utf-8"))
        outer = self._outer.copy()
        outer.update(inner.digest())
        return base64.urlsafe_b64encode(outer.digest()[:16]).rstrip(b"=").decode("ascii")

    def lookup_keys(self, address: str) -> tuple[str, ...]:
        """Every key an entry for `address` may be stored under: the HMAC first, then digests."""
        return (self.hash(address), *digest_keys(address))


def is_keyed_hash(key: str) -> bool:
    """True for our own HMAC keys (as opposed to md5:/sha256: keys of hashed lists)."""
    return len(key) == 22 and not key.startswith((MD5_PREFIX, SHA256_PREFIX))
