"""The unsubscribe URL: RFC 8058 one-click, the body link's page, and its undo.

GET and HEAD only ever show a page: link scanners and prefetchers fetch URLs, and must never
unsubscribe anyone. A POST changes state: the one-click body `List-Unsubscribe=One-Click` (as
mail clients send it, with no cookie, login, Origin check or CSRF token, and answered 2xx
without a redirect) or the page's confirm button.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from suppression import GLOBAL, Reason

from .events import Event, EventType
from .network import limiter_key, truncated
from .pages import guarded, page, recipient_token, too_many
from .preferences import SOURCE_PAGE, STOP_TRACKING, stop_tracking
from .state import TRACKING, client_of
from .tokens import Reading

log = logging.getLogger("optout.http")

ONE_CLICK = "One-Click"
ONE_CLICK_BODY = b"List-Unsubscribe=One-Click"
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
# Where a mail client POSTs the header's URL; "page" is the body link's confirm button;
# "mailto" is reserved for unsubscribe requests by mail.
METHOD_ONE_CLICK = "one-click"
METHOD_PAGE = "page"
UNDO_SOURCE = "page-undo"
EVERYTHING = "all"  # the page's "everything from this sender" choice


def tracking_offered(request: web.Request) -> bool:
    """Whether the pages offer to stop individual tracking (some mail may track so)."""
    return request.app[TRACKING].options.tracking_withdrawal


def topic_of(scope: str) -> str | None:
    return scope.partition(":")[2] if scope.startswith("topic:") else None


@guarded("unsubscribe-page")
async def confirmation_page(request: web.Request) -> web.Response:
    """GET and HEAD: a page with one button. Reads nothing from, writes nothing to, the store."""
    reading = recipient_token(request, "unsubscribe")
    if reading is None:
        return page(request, "invalid.html", status=404, kind="unsubscribe")
    scope = reading.ref.scope
    withdrawal = tracking_offered(request)
    return page(request, "confirm.html", scope=scope, topic=topic_of(scope), withdrawal=withdrawal)


@guarded("unsubscribe")
async def unsubscribe(request: web.Request) -> web.Response:
    """POST: one-click, the page's confirm, or the done page's undo.

    Rate limits: per client address, except for a genuine one-click, which is limited per
    recipient instead. Mail providers send one-click POSTs for all their users from a few
    shared addresses; a 429 there could lose someone's opt-out, while a replayed token can
    still not hammer the database.
    """
    tracking = request.app[TRACKING]
    reading = recipient_token(request, "unsubscribe")
    try:
        async with asyncio.timeout(tracking.options.body_timeout):
            form = await _form(request) if reading is not None else None
    except TimeoutError:  # a body sent a byte at a time holds a connection: not for long
        response = page(request, "bad-request.html", status=408)
        response.force_close()
        return response
    one_click = form is not None and form.get("List-Unsubscribe") == ONE_CLICK
    if reading is not None and one_click:
        key = f"recipient:{reading.ref.address_hash}:{reading.ref.scope}"
    else:
        key = limiter_key(client_of(request, tracking))
    wait = await tracking.take(key)
    if wait:
        return too_many(request, wait, "unsubscribe")
    if reading is None or form is None:
        return page(request, "invalid.html", status=404, kind="unsubscribe")
    if one_click:
        return await _suppress(request, reading, METHOD_ONE_CLICK, reading.ref.scope)
    if "confirm" in form:
        scope = GLOBAL if form.get("scope") == EVERYTHING else reading.ref.scope
        return await _suppress(request, reading, METHOD_PAGE, scope)
    if "undo" in form:
        scope = GLOBAL if form.get("scope") == EVERYTHING else reading.ref.scope
        return await _undo(request, reading, scope)
    if STOP_TRACKING in form and tracking_offered(request):
        return await stop_tracking(request, reading, SOURCE_PAGE)
    return page(request, "bad-request.html", status=400)


async def _form(request: web.Request) -> MultiDictProxy[Any]:
    """The posted fields. A body that is exactly the one-click line counts as that field
    whatever its declared type: some clients send it as text/plain or with no type."""
    if request.content_type in FORM_TYPES:
        try:
            return await request.post()
        except (ValueError, UnicodeDecodeError, LookupError):
            return MultiDictProxy(MultiDict())  # malformed: nothing understood, 400 follows
    body = await request.read()
    fields: MultiDict[str] = MultiDict()
    if body.strip() == ONE_CLICK_BODY:
        fields["List-Unsubscribe"] = ONE_CLICK
    return MultiDictProxy(fields)


async def _suppress(
    request: web.Request, reading: Reading, method: str, scope: str
) -> web.Response:
    tracking = request.app[TRACKING]
    ref = reading.ref
    proof: dict[str, Any] = {"method": method, "scope": scope, "key_id": reading.key_id}
    if scope != ref.scope:
        proof["token_scope"] = ref.scope
    address = client_of(request, tracking)
    if tracking.options.store_ip and address is not None:
        proof["ip"] = truncated(address)
    added = await tracking.suppressions.add_hash(
        ref.address_hash, scope=scope, reason=Reason.UNSUBSCRIBE, source=method, detail=proof
    )
    if added:
        # Idempotent: a repeated POST finds the entry in place and records nothing new.
        await tracking.events.record(
            Event(EventType.UNSUBSCRIBE, ref.address_hash, ref.campaign, ref.queue_id, None, proof)
        )
        tracking.metrics.unsubscribes.labels(method, scope.partition(":")[0]).inc()
        log.info("unsubscribe recorded", extra={"queue_id": ref.queue_id, "method": method})
    return page(
        request,
        "done.html",
        scope=scope,
        topic=topic_of(scope),
        undo_scope=EVERYTHING if scope == GLOBAL and ref.scope != GLOBAL else "",
        withdrawal=tracking_offered(request),
    )


async def _undo(request: web.Request, reading: Reading, scope: str) -> web.Response:
    """Lift the opt-out this token's page just made, and only that: not a complaint, a
    bounce or an operator's entry, and not one older than the undo window (a forwarded
    message must not let someone else re-subscribe the recipient later)."""
    tracking = request.app[TRACKING]
    ref = reading.ref
    found = await tracking.suppressions.check_hash(ref.address_hash, [scope])
    if found is not None and found.scope == scope:
        created = datetime.fromisoformat(found.created_at.replace("Z", "+00:00"))
        age = datetime.fromtimestamp(tracking.options.clock(), UTC) - created
        if found.reason != Reason.UNSUBSCRIBE or age > tracking.options.undo_window:
            return page(request, "undo-refused.html", status=409)
    removed = await tracking.suppressions.remove_hash(
        ref.address_hash, scope=scope, source=UNDO_SOURCE
    )
    if removed:
        tracking.metrics.undos.inc()
        log.info("unsubscribe undone", extra={"queue_id": ref.queue_id})
    return page(request, "undone.html", scope=scope, topic=topic_of(scope))
