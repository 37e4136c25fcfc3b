"""The recipient-facing HTTP endpoint: open pixel and RFC 8058 one-click unsubscribe."""

from __future__ import annotations

import logging

import jinja2
from aiohttp import web

from suppression import Reason, SuppressionStore

from .errors import BadToken
from .events import Event, EventStore, EventType
from .tokens import OPEN_PATH, PIXEL_SUFFIX, UNSUBSCRIBE_PATH, RecipientRef, TrackingUrls
from .verdict import is_machine

log = logging.getLogger("optout.http")

SUPPRESSIONS = web.AppKey("suppressions", SuppressionStore)
EVENTS = web.AppKey("events", EventStore)
URLS = web.AppKey("urls", TrackingUrls)
TEMPLATES = web.AppKey("templates", jinja2.Environment)

# The smallest transparent GIF: 1x1, one palette entry.
PIXEL_GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00"
    b"\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
MAX_REQUEST_BODY = 64 * 1024
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self';"
        " frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}
NO_STORE = "no-store, no-cache, must-revalidate, max-age=0"


def create_app(
    suppressions: SuppressionStore, events: EventStore, urls: TrackingUrls
) -> web.Application:
    app = web.Application(client_max_size=MAX_REQUEST_BODY)
    app.on_response_prepare.append(add_security_headers)
    app[SUPPRESSIONS] = suppressions
    app[EVENTS] = events
    app[URLS] = urls
    app[TEMPLATES] = jinja2.Environment(
        loader=jinja2.PackageLoader("tracking", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    app.router.add_get(OPEN_PATH + "{token}" + PIXEL_SUFFIX, pixel)
    app.router.add_get(UNSUBSCRIBE_PATH + "{token}", unsubscribe_page)
    app.router.add_post(UNSUBSCRIBE_PATH + "{token}", unsubscribe)
    app.router.add_get("/healthz", healthz)
    return app


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def pixel(request: web.Request) -> web.Response:
    """Always the image, so no client shows a broken picture; an open only for a valid token."""
    try:
        ref = request.app[URLS].read_open(request.match_info["token"])
    except BadToken:
        pass
    else:
        machine = is_machine(request.headers.get("User-Agent"))
        await request.app[EVENTS].record(
            Event(EventType.OPEN, ref.address_hash, ref.campaign, ref.message_id, machine)
        )
    return web.Response(
        body=PIXEL_GIF,
        content_type="image/gif",
        headers={"Cache-Control": NO_STORE, "Pragma": "no-cache"},
    )


def _page(
    request: web.Request, template: str, status: int = 200, **context: object
) -> web.Response:
    html = request.app[TEMPLATES].get_template(template).render(**context)
    return web.Response(
        text=html,
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": NO_STORE},
    )


def _read_token(request: web.Request) -> RecipientRef | None:
    try:
        return request.app[URLS].read_unsubscribe(request.match_info["token"])
    except BadToken:
        return None


async def unsubscribe_page(request: web.Request) -> web.Response:
    """GET and HEAD: a confirmation page. Never changes state: scanners and prefetchers GET."""
    ref = _read_token(request)
    if ref is None:
        return _page(request, "invalid.html", status=404)
    return _page(request, "confirm.html", scope=ref.scope)


async def unsubscribe(request: web.Request) -> web.Response:
    """POST: RFC 8058 one-click (no cookie, auth or CSRF token) or the page's confirm button."""
    ref = _read_token(request)
    if ref is None:
        return _page(request, "invalid.html", status=404)
    form = await request.post()
    if form.get("List-Unsubscribe") == "One-Click":
        method = "one-click"
    elif "confirm" in form:
        method = "page"
    else:
        return _page(request, "bad-request.html", status=400)
    added = await request.app[SUPPRESSIONS].add_hash(
        ref.address_hash, scope=ref.scope, reason=Reason.UNSUBSCRIBE, source=method
    )
    if added:
        await request.app[EVENTS].record(
            Event(
                EventType.UNSUBSCRIBE,
                ref.address_hash,
                ref.campaign,
                ref.message_id,
                detail={"method": method, "scope": ref.scope},
            )
        )
        log.info("unsubscribe recorded", extra={"queue_id": ref.message_id, "method": method})
    return _page(request, "done.html", scope=ref.scope)
