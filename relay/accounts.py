"""Sender accounts: who may submit from outside the trusted networks, and as which domains."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal

from tracking.modes import Mode, Modes

from .errors import RelayError

# scrypt at N=2^14, r=8, p=1: about 50 ms and 16 MiB per check, RFC 7914's interactive choice.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_PREFIX = "scrypt"
# What an account sends: marketing mail, or transactional mail (receipts, password resets),
# which only hard bounces and complaints stop. Known from the login, so already at RCPT.
Category = Literal["marketing", "transactional"]
CATEGORIES: tuple[Category, ...] = ("marketing", "transactional")


class PasswordHashError(RelayError, ValueError):
    """A stored password hash that is not one this relay writes."""


def hash_password(password: str) -> str:
    """`scrypt$N$r$p$salt$hash`, the form `accounts[].password_hash` takes."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    return "$".join(
        [_PREFIX, str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(digest)]
    )


def check_password_hash(stored: str) -> None:
    """Raise PasswordHashError unless `stored` is a hash `verify_password` can check."""
    _parse(stored)


def verify_password(password: bytes, stored: str) -> bool:
    """Constant-time check of `password` against a `hash_password` result."""
    n, r, p, salt, expected = _parse(stored)
    digest = hashlib.scrypt(
        password, salt=salt, n=n, r=r, p=p, dklen=len(expected), maxmem=256 * 1024 * 1024
    )
    return hmac.compare_digest(digest, expected)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _parse(stored: str) -> tuple[int, int, int, bytes, bytes]:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != _PREFIX:
        raise PasswordHashError("expected scrypt$N$r$p$salt$hash (optout-relay account hash)")
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except ValueError as exc:
        raise PasswordHashError(f"malformed scrypt hash: {exc}") from None
    if n < 2**10 or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 16 or len(digest) < 16:
        raise PasswordHashError("scrypt parameters out of range")
    return n, r, p, salt, digest


@dataclass(frozen=True, slots=True)
class Account:
    username: str
    password_hash: str
    from_domains: tuple[str, ...]
    topic: str | None = None
    track_opens: bool = True
    feedback_domain: str | None = None  # this account's bounces and complaints come here
    category: Category = "marketing"
    # How this account's opens and clicks are measured; None: as [tracking] says.
    opens: Mode | None = None
    clicks: Mode | None = None
    # Whether its X-Optout-Consent header (consent the sender's tool holds) is believed.
    consent_header: bool = False

    def modes(self, relay: Modes) -> Modes:
        """The modes of this account's mail: its own, else the relay's; none at all with
        `tracking = false`."""
        if not self.track_opens:
            return Modes(Mode.OFF, Mode.OFF)
        return Modes(self.opens or relay.opens, self.clicks or relay.clicks)

    # The sender's physical postal address, in every footer (CAN-SPAM 15 USC 7704(a)(5));
    # None: the relay's own (rewrite.postal_address), if set.
    postal_address: str | None = None

    def may_send_as(self, domain: str) -> bool:
        domain = domain.lower().rstrip(".")
        return any(domain == d or domain.endswith("." + d) for d in self.from_domains)
