"""Who may log in at the front door: the accounts, a throttle against password guessing,
and the password check, run in a thread since scrypt takes about 50 ms."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import time
from dataclasses import dataclass, field

from aiosmtpd.smtp import AuthResult, LoginPassword

from ..accounts import Account, hash_password, verify_password

log = logging.getLogger("optout.smtp")

AUTH_LOCKED = "454 4.7.0 Too many failed authentications from your address, try again later"
# Checked when the username is unknown, so that timing does not tell unknown from known.
_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


@dataclass(slots=True)
class _Attempts:
    count: int  # failed, or still being checked
    first: float


class AuthThrottle:
    """Slows, then refuses, a client network that keeps failing AUTH (password guessing).

    Counted per network, an IPv4 /24 or an IPv6 /64 (what one host or customer is
    usually given), so that rotating addresses within it buys no more guesses. An attempt
    is counted when it begins and uncounted only if it succeeds: attempts made in
    parallel are all counted before any password is checked. A success does not clear
    the count either: logging in to one account must not buy more guesses at another.
    The window forgets old failures instead."""

    def __init__(
        self,
        *,
        slow_after: int = 3,
        lock_after: int = 6,
        window: float = 900.0,
        delay: float = 1.0,
        ipv4_prefix: int = 24,
        ipv6_prefix: int = 64,
    ) -> None:
        self.slow_after = slow_after
        self.lock_after = lock_after
        self.window = window
        self.delay = delay
        self._prefixes = {4: ipv4_prefix, 6: ipv6_prefix}
        self._attempts: dict[str, _Attempts] = {}

    def network(self, client: str) -> str:
        """The key `client` (an IP address) is counted under."""
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return client
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        prefix = self._prefixes[address.version]
        return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))

    def _current(self, network: str, now: float) -> _Attempts | None:
        entry = self._attempts.get(network)
        if entry is not None and now - entry.first > self.window:
            del self._attempts[network]
            return None
        return entry

    def begin(self, client: str, now: float | None = None) -> float | None:
        """Count an attempt from `client` that is about to be checked. None: its network
        is locked out, refuse it unchecked (and uncounted); else the seconds to wait first."""
        moment = time.monotonic() if now is None else now
        network = self.network(client)
        entry = self._current(network, moment)
        if entry is None:
            self._attempts[network] = _Attempts(1, moment)
            if len(self._attempts) > 100_000:  # bound memory under a distributed attack
                del self._attempts[next(iter(self._attempts))]  # the oldest window
            return 0.0
        if entry.count >= self.lock_after:
            return None
        entry.count += 1
        return self.delay if entry.count > self.slow_after else 0.0

    def succeeded(self, client: str, now: float | None = None) -> None:
        """The attempt `begin` counted was no failure."""
        entry = self._current(self.network(client), time.monotonic() if now is None else now)
        if entry is not None and entry.count > 0:
            entry.count -= 1


@dataclass(slots=True)
class AuthPolicy:
    """The accounts that may log in, and one throttle for all of a process's listeners."""

    accounts: dict[str, Account]
    throttle: AuthThrottle = field(default_factory=AuthThrottle)

    async def check(self, client: str, credentials: LoginPassword) -> AuthResult:
        """aiosmtpd's verdict on `client` logging in with `credentials`; on success its
        `auth_data` is the username, which the front door reads as the session's account."""
        delay = self.throttle.begin(client)
        if delay is None:
            log.warning("AUTH refused from %s: too many failures from its network", client)
            return AuthResult(success=False, handled=False, message=AUTH_LOCKED)
        if delay:
            await asyncio.sleep(delay)  # slows guessing down; the session stays usable
        username = credentials.login.decode("utf-8", "replace")
        account = self.accounts.get(username)
        stored = account.password_hash if account is not None else _DUMMY_HASH
        matches = await asyncio.to_thread(verify_password, credentials.password, stored)
        if account is None or not matches:
            # An unknown username is often a password typed in the wrong field: never
            # logged as typed.
            shown = username if account is not None else "<unknown>"
            log.warning("AUTH failed for %s from %s", shown, client)
            return AuthResult(success=False, handled=False)
        self.throttle.succeeded(client)
        log.info("AUTH ok: %s from %s", username, client)
        return AuthResult(success=True, auth_data=username)
