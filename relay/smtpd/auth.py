"""Who may log in at the front door: the accounts, a throttle against password guessing,
and the password check, run in a thread since scrypt takes about 50 ms."""

from __future__ import annotations

import asyncio
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
class _Failures:
    count: int
    first: float


class AuthThrottle:
    """Slows, then refuses, a client address that keeps failing AUTH (password guessing).

    A success does not clear the count: logging in to one account must not buy more
    guesses at another. The window forgets old failures instead."""

    def __init__(
        self,
        *,
        slow_after: int = 3,
        lock_after: int = 6,
        window: float = 900.0,
        delay: float = 1.0,
    ) -> None:
        self.slow_after = slow_after
        self.lock_after = lock_after
        self.window = window
        self.delay = delay
        self._failures: dict[str, _Failures] = {}

    def _current(self, client: str, now: float) -> _Failures | None:
        entry = self._failures.get(client)
        if entry is not None and now - entry.first > self.window:
            del self._failures[client]
            return None
        return entry

    def locked(self, client: str, now: float | None = None) -> bool:
        entry = self._current(client, time.monotonic() if now is None else now)
        return entry is not None and entry.count >= self.lock_after

    def penalty(self, client: str, now: float | None = None) -> float:
        """Seconds to wait before answering this client's next AUTH."""
        entry = self._current(client, time.monotonic() if now is None else now)
        return self.delay if entry is not None and entry.count >= self.slow_after else 0.0

    def failed(self, client: str, now: float | None = None) -> None:
        moment = time.monotonic() if now is None else now
        entry = self._current(client, moment)
        if entry is None:
            self._failures[client] = _Failures(1, moment)
        else:
            entry.count += 1
        if len(self._failures) > 100_000:  # bound memory under a distributed attack
            oldest = min(self._failures, key=lambda c: self._failures[c].first)
            del self._failures[oldest]


@dataclass(slots=True)
class AuthPolicy:
    """The accounts that may log in, and one throttle for all of a process's listeners."""

    accounts: dict[str, Account]
    throttle: AuthThrottle = field(default_factory=AuthThrottle)

    async def check(self, client: str, credentials: LoginPassword) -> AuthResult:
        """aiosmtpd's verdict on `client` logging in with `credentials`; on success its
        `auth_data` is the username, which the front door reads as the session's account."""
        if self.throttle.locked(client):
            return AuthResult(success=False, handled=False, message=AUTH_LOCKED)
        delay = self.throttle.penalty(client)
        if delay:
            await asyncio.sleep(delay)  # slows guessing down; the session stays usable
        username = credentials.login.decode("utf-8", "replace")
        account = self.accounts.get(username)
        stored = account.password_hash if account is not None else _DUMMY_HASH
        matches = await asyncio.to_thread(verify_password, credentials.password, stored)
        if account is None or not matches:
            self.throttle.failed(client)
            log.warning("AUTH failed for %r from %s", username, client)
            return AuthResult(success=False, handled=False)
        log.info("AUTH ok: %s from %s", username, client)
        return AuthResult(success=True, auth_data=username)
