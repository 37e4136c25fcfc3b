"""Who may use the dashboard: password login, server-side sessions, CSRF tokens.

Sessions live in this process's memory, keyed by a random token in an HttpOnly, SameSite
cookie: logging out ends a session for good (a signed cookie would stay valid until it
expired), and a restart logs everyone out, which an operator's page can afford. Every form
carries its session's CSRF token; the login form, before any session, a token matched
against a cookie of its own (double submit).
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from ..network import IPAddress, Ranges, client_address, forwarded_for, limiter_key
from ..ratelimit import RateLimit, RateLimiter

SESSION_COOKIE = "optout_admin"
LOGIN_COOKIE = "optout_admin_login"
CSRF_FIELD = "csrf"
MAX_SESSIONS = 10_000
# Login attempts: per client address, and per username (a guesser with many addresses).
LOGIN_LIMIT = RateLimit(per_minute=5, burst=5)

PasswordCheck = Callable[[bytes, str], bool]


@dataclass(frozen=True, slots=True)
class Session:
    token: str
    username: str
    csrf: str
    expires: float


class Sessions:
    def __init__(self, timeout: float, clock: Callable[[], float] = time.time) -> None:
        self._timeout = timeout
        self._clock = clock
        self._by_token: dict[str, Session] = {}

    def start(self, username: str) -> Session:
        now = self._clock()
        if len(self._by_token) >= MAX_SESSIONS:
            self._forget_expired(now)
        session = Session(
            secrets.token_urlsafe(32), username, secrets.token_urlsafe(32), now + self._timeout
        )
        self._by_token[session.token] = session
        return session

    def find(self, token: str | None) -> Session | None:
        if not token:
            return None
        session = self._by_token.get(token)
        if session is None:
            return None
        if session.expires <= self._clock():
            del self._by_token[token]
            return None
        return session

    def end(self, token: str) -> None:
        self._by_token.pop(token, None)

    def _forget_expired(self, now: float) -> None:
        for token in [t for t, s in self._by_token.items() if s.expires <= now]:
            del self._by_token[token]
        if len(self._by_token) >= MAX_SESSIONS:  # all live: the oldest half goes
            for token in list(self._by_token)[: MAX_SESSIONS // 2]:
                del self._by_token[token]


def same_token(given: str | None, expected: str | None) -> bool:
    """Constant-time, and never true for a missing token."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


class Gate:
    """The dashboard's users, their sessions, and the login rate limits."""

    def __init__(
        self,
        users: Mapping[str, str],
        check_password: PasswordCheck,
        *,
        session_timeout: float,
        trusted_proxies: Ranges,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._users = dict(users)
        self._check = check_password
        self.sessions = Sessions(session_timeout, clock)
        self._trusted = trusted_proxies
        self._by_client = RateLimiter(LOGIN_LIMIT)
        self._by_user = RateLimiter(LOGIN_LIMIT)
        # A user that does not exist still costs a full password check: the answer's timing
        # must not tell which usernames do.
        self._decoy = next(iter(self._users.values()))
        self.session_timeout = session_timeout

    def client(self, request: web.Request) -> IPAddress | None:
        return client_address(request.remote, forwarded_for(request.headers), self._trusted)

    def wait_before_login(self, request: web.Request, username: str) -> float:
        """0 when a login attempt may go ahead, else the seconds to wait."""
        by_client = self._by_client.take(limiter_key(self.client(request)))
        by_user = self._by_user.take(username.casefold())
        return max(by_client, by_user)

    async def authenticate(self, username: str, password: str) -> bool:
        stored = self._users.get(username)
        # scrypt takes tens of milliseconds and a lot of memory: not on the event loop.
        matched = await asyncio.to_thread(
            self._check, password.encode("utf-8"), stored or self._decoy
        )
        return stored is not None and matched

    def secure(self, request: web.Request) -> bool:
        """Served over TLS, directly or through a trusted proxy that says so: then the
        session cookie is Secure."""
        if request.secure:
            return True
        peer = client_address(request.remote, None, self._trusted)
        proto = request.headers.get("X-Forwarded-Proto", "")
        return peer in self._trusted and proto.strip().lower() == "https"

    def session_of(self, request: web.Request) -> Session | None:
        return self.sessions.find(request.cookies.get(SESSION_COOKIE))

    def set_session_cookie(
        self, request: web.Request, response: web.StreamResponse, session: Session
    ) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            session.token,
            max_age=int(self.session_timeout),
            path="/",
            httponly=True,
            samesite="Strict",
            secure=self.secure(request),
        )
        response.del_cookie(LOGIN_COOKIE, path="/")

    @staticmethod
    def login_token(request: web.Request) -> str:
        """The login form's CSRF token: the one its cookie holds, or a new one."""
        return request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(32)

    def set_login_cookie(
        self, request: web.Request, response: web.StreamResponse, token: str
    ) -> None:
        response.set_cookie(
            LOGIN_COOKIE,
            token,
            max_age=3600,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=self.secure(request),
        )
