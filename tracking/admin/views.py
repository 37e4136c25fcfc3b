"""The dashboard's pages: thin handlers over the statistics, the suppression store, the
webhook outbox and the relay's queue."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import jinja2
from aiohttp import web

from suppression import GLOBAL, InvalidAddress, Reason, SuppressionStore

from ..statistics import Selection, Statistics, totals
from ..webhooks import FAILED, PENDING, WebhookOutbox, describe_health, iso_time, url_label
from .auth import CSRF_FIELD, LOGIN_COOKIE, SESSION_COOKIE, Gate, Session, same_token
from .charts import line_chart

NO_STORE = "no-store"
MAX_FIELD = 1000
HOURLY_UP_TO = 4  # days: a campaign shorter than this is charted by the hour


class QueueView(Protocol):
    """A waiting message as the relay's spool describes it (relay.spool.QueueEntry)."""

    @property
    def queue_id(self) -> str: ...
    @property
    def mail_from(self) -> str: ...
    @property
    def received_at(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def recipients(self) -> Sequence[str]: ...
    @property
    def attempts(self) -> int: ...
    @property
    def next_attempt_at(self) -> float: ...
    @property
    def last_reply(self) -> str | None: ...


QueueReader = Callable[[], Awaitable[Sequence[QueueView]]]


@dataclass(slots=True)
class Admin:
    gate: Gate
    templates: jinja2.Environment
    suppressions: SuppressionStore
    statistics: Statistics
    webhooks: WebhookOutbox
    queue: QueueReader
    # Endpoints failing for an hour or more, one line each (the running dispatcher's).
    webhook_alerts: Callable[[], Sequence[str]]
    give_up_after: float


ADMIN = web.AppKey("optout.admin", Admin)
SESSION = web.RequestKey("optout.admin.session", Session)


def render(
    request: web.Request, template: str, *, status: int = 200, **context: Any
) -> web.Response:
    admin = request.app[ADMIN]
    session = request.get(SESSION)
    html = admin.templates.get_template(template).render(
        user=session.username if session else None,
        csrf=session.csrf if session else "",
        alerts=admin.webhook_alerts() if session else (),
        path=request.path,
        **context,
    )
    return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")


def _local_path(target: str | None) -> str:
    """Where to go after login: a path on this site only, never elsewhere."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    return target


# --------------------------------------------------------------------------- login


async def login_page(request: web.Request) -> web.Response:
    if request.app[ADMIN].gate.session_of(request) is not None:
        raise web.HTTPSeeOther(_local_path(request.query.get("next")))
    return _login(request, next_path=_local_path(request.query.get("next")))


def _login(
    request: web.Request, *, next_path: str, error: str | None = None, status: int = 200
) -> web.Response:
    gate = request.app[ADMIN].gate
    token = gate.login_token(request)
    response = render(
        request,
        "login.html",
        status=status,
        title="Log in",
        login_token=token,
        next=next_path,
        error=error,
    )
    gate.set_login_cookie(request, response, token)
    return response


async def login(request: web.Request) -> web.StreamResponse:
    admin = request.app[ADMIN]
    form = await request.post()
    username = str(form.get("username", ""))[:MAX_FIELD]
    password = str(form.get("password", ""))[:MAX_FIELD]
    next_path = _local_path(str(form.get("next", "/")))
    if not same_token(str(form.get(CSRF_FIELD, "")), request.cookies.get(LOGIN_COOKIE)):
        return _login(
            request, next_path=next_path, status=403, error="The form expired. Please try again."
        )
    wait = admin.gate.wait_before_login(request, username)
    if wait:
        response = _login(
            request, next_path=next_path, status=429, error="Too many attempts. Wait a minute."
        )
        response.headers["Retry-After"] = str(max(1, round(wait)))
        return response
    if not await admin.gate.authenticate(username, password):
        return _login(request, next_path=next_path, status=401, error="Wrong username or password.")
    session = admin.gate.sessions.start(username)
    response = _see_other(next_path)
    admin.gate.set_session_cookie(request, response, session)
    return response


def _see_other(location: str) -> web.Response:
    """A 303 that carries cookies (a raised HTTPException would drop them)."""
    return web.Response(status=303, headers={"Location": location})


async def logout(request: web.Request) -> web.StreamResponse:
    request.app[ADMIN].gate.sessions.end(request[SESSION].token)
    response = _see_other("/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


# --------------------------------------------------------------------------- statistics


async def campaigns(request: web.Request) -> web.Response:
    statistics = request.app[ADMIN].statistics
    report = await statistics.report()
    series = await statistics.series()
    return render(
        request,
        "campaigns.html",
        title="Campaigns",
        total=totals(report).as_dict(),
        rows=[(one.as_dict(), _campaign_url(one.campaign)) for one in report],
        chart=line_chart(series, "All campaigns, per day"),
    )


def _campaign_url(name: str | None) -> str:
    return f"/campaign?name={quote(name or '', safe='')}"


async def campaign(request: web.Request) -> web.Response:
    statistics = request.app[ADMIN].statistics
    name = request.query.get("name", "")
    selection = Selection(campaign=name)
    found = await statistics.report(selection)
    if not found:
        return render(request, "missing.html", status=404, title="No such campaign", name=name)
    daily = await statistics.series(selection)
    hourly = len(daily.buckets) <= HOURLY_UP_TO
    series = await statistics.series(selection, hourly=True) if hourly else daily
    per_domain = await statistics.report(Selection("domain", campaign=name))
    return render(
        request,
        "campaign.html",
        title=name or "(no campaign)",
        stats=found[0].as_dict(),
        domains=[one.as_dict() for one in per_domain],
        chart=line_chart(series, "per hour" if hourly else "per day"),
    )


# --------------------------------------------------------------------------- lookup


async def lookup_page(request: web.Request) -> web.Response:
    return render(request, "lookup.html", title="Address lookup", address="", record=None)


async def lookup(request: web.Request) -> web.Response:
    form = await request.post()
    return await _show(request, str(form.get("address", ""))[:MAX_FIELD].strip())


async def _show(request: web.Request, address: str, note: str | None = None) -> web.Response:
    store = request.app[ADMIN].suppressions
    try:
        record = await store.show(address)
    except InvalidAddress as exc:
        return render(
            request,
            "lookup.html",
            status=400,
            title="Address lookup",
            address=address,
            record=None,
            error=str(exc),
        )
    globally = any(entry.scope == GLOBAL for entry in record.suppressions)
    return render(
        request,
        "lookup.html",
        title="Address lookup",
        address=address,
        record=record,
        suppressed_globally=globally,
        note=note,
    )


async def suppress(request: web.Request) -> web.Response:
    """Suppress an address for everything, as the operator who is logged in."""
    admin = request.app[ADMIN]
    form = await request.post()
    address = str(form.get("address", ""))[:MAX_FIELD].strip()
    try:
        added = await admin.suppressions.add(
            address,
            scope=GLOBAL,
            reason=Reason.MANUAL,
            source="dashboard",
            actor=request[SESSION].username,
        )
    except InvalidAddress:
        return await _show(request, address)
    return await _show(request, address, "Suppressed." if added else "Already suppressed.")


# --------------------------------------------------------------------------- queue, webhooks


async def queue(request: web.Request) -> web.Response:
    entries = await request.app[ADMIN].queue()
    return render(
        request,
        "queue.html",
        title="Queue",
        entries=[(entry, iso_time(entry.next_attempt_at)) for entry in entries],
        recipients=sum(len(entry.recipients) for entry in entries),
    )


async def webhooks(request: web.Request) -> web.Response:
    outbox = request.app[ADMIN].webhooks
    now = time.time()
    endpoints = [(url_label(h.url), describe_health(h, now)) for h in await outbox.health()]
    rows = await outbox.rows((PENDING, FAILED), limit=200)
    return render(
        request,
        "webhooks.html",
        title="Webhooks",
        endpoints=endpoints,
        rows=[(row, url_label(row.url), iso_time(row.next_attempt_at)) for row in rows],
        counts=await outbox.counts(),
    )


async def retry_webhook(request: web.Request) -> web.StreamResponse:
    admin = request.app[ADMIN]
    form = await request.post()
    webhook_id = str(form.get("webhook_id", ""))[:MAX_FIELD] or None
    await admin.webhooks.retry(webhook_id, time.time(), admin.give_up_after)
    raise web.HTTPSeeOther("/webhooks")
