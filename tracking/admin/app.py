"""The admin dashboard's aiohttp app, for a listener of its own (never the public one).

Every page but the login needs a session: a GET without one is sent to the login page, any
other request gets 401. Every POST but the login's must carry its session's CSRF token, or
it changes nothing (403).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import jinja2
from aiohttp import web
from yarl import URL

from suppression import SuppressionStore

from ..network import LOOPBACK, networks
from ..statistics import Statistics
from ..webhooks import WebhookOutbox
from . import views
from .auth import CSRF_FIELD, Gate, PasswordCheck, same_token
from .views import ADMIN, SESSION, Admin, QueueReader

MAX_REQUEST_BODY = 16 * 1024
PUBLIC = frozenset({"/login"})
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:;"
        " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _no_alerts() -> Sequence[str]:
    return ()


def create_admin_app(
    *,
    users: Mapping[str, str],
    check_password: PasswordCheck,
    suppressions: SuppressionStore,
    statistics: Statistics,
    webhooks: WebhookOutbox,
    queue: QueueReader,
    webhook_alerts: Callable[[], Sequence[str]] = _no_alerts,
    give_up_after: float = 3 * 24 * 3600.0,
    session_timeout: float = 8 * 3600.0,
    trusted_proxies: Sequence[str] = LOOPBACK,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """`users`: username -> password hash, checked by `check_password(password, hash)` (the
    relay's scrypt). `queue` reads the relay's spool; `webhook_alerts` are the dispatcher's
    lines about endpoints failing for an hour."""
    if not users:
        raise ValueError("the dashboard needs at least one user")
    app = web.Application(client_max_size=MAX_REQUEST_BODY, middlewares=[_sessions])
    app[ADMIN] = Admin(
        gate=Gate(
            users,
            check_password,
            session_timeout=session_timeout,
            trusted_proxies=networks(trusted_proxies),
            clock=clock,
        ),
        templates=jinja2.Environment(
            loader=jinja2.PackageLoader("tracking", "templates/admin"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        ),
        suppressions=suppressions,
        statistics=statistics,
        webhooks=webhooks,
        queue=queue,
        webhook_alerts=webhook_alerts,
        give_up_after=give_up_after,
    )
    app.on_response_prepare.append(_headers)
    router = app.router
    router.add_get("/login", views.login_page, name="login")
    router.add_post("/login", views.login)
    router.add_post("/logout", views.logout, name="logout")
    router.add_get("/", views.campaigns, name="campaigns")
    router.add_get("/campaign", views.campaign, name="campaign")
    router.add_get("/lookup", views.lookup_page, name="lookup")
    router.add_post("/lookup", views.lookup)
    router.add_post("/suppress", views.suppress, name="suppress")
    router.add_get("/queue", views.queue, name="queue")
    router.add_get("/webhooks", views.webhooks, name="webhooks")
    router.add_post("/webhooks/retry", views.retry_webhook, name="retry-webhook")
    return app


@web.middleware
async def _sessions(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC:
        return await handler(request)
    session = request.app[ADMIN].gate.session_of(request)
    if session is None:
        if request.method in ("GET", "HEAD"):
            raise web.HTTPSeeOther(str(URL("/login").with_query(next=request.path_qs)))
        return views.render(
            request, "denied.html", status=401, title="Log in first", reason="login"
        )
    request[SESSION] = session
    if request.method not in ("GET", "HEAD"):
        form = await request.post()
        if not same_token(str(form.get(CSRF_FIELD, "")), session.csrf):
            return views.render(
                request, "denied.html", status=403, title="Form expired", reason="csrf"
            )
    return await handler(request)


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
