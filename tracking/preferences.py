"""The recipient's tracking preferences: stop individual open and click tracking without
unsubscribing (CNIL deliberation 2026-042: every email carries a way to withdraw, and the
withdrawal applies to mail already sent).

`/p/TOKEN` (the footer's "Tracking preferences" link; TOKEN is the copy's unsubscribe token)
shows the page; the unsubscribe confirmation and done pages carry the same one-button form.
GET and HEAD never change anything (link scanners fetch URLs); a POST of the form, with the
signed token in its URL and no login, cookie or JavaScript, withdraws both purposes at once.
From then on the recorder counts that recipient's opens and clicks in aggregate only, those
of copies already delivered included (tracking.aggregate), and the withdrawal is an event
(`tracking.withdrawn`, queued as a webhook in the same transaction) and an audited change of
the consent table (suppression.consent).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from suppression import ALL_PURPOSES
from suppression.consent import State, consent_of, record_consent
from suppression.engine import Connection

from .events import Event, EventType, insert_events
from .network import limiter_key, truncated
from .pages import guarded, page, recipient_token, too_many
from .state import TRACKING, client_of
from .tokens import Reading

log = logging.getLogger("optout.http")

STOP_TRACKING = "stop_tracking"  # the forms' field
SOURCE_PREFERENCES = "preferences"  # the preference page's form
SOURCE_PAGE = "page"  # the unsubscribe confirmation or done page's form


@guarded("preferences-page")
async def preferences_page(request: web.Request) -> web.Response:
    """GET and HEAD: the recipient's tracking state and one button. Reads, never writes."""
    reading = recipient_token(request, "preferences")
    if reading is None:
        return page(request, "invalid.html", status=404, kind="preferences")
    tracking = request.app[TRACKING]
    consent = await tracking.suppressions.database.read(
        lambda db: consent_of(db, reading.ref.address_hash)
    )
    return page(request, "preferences.html", stopped=consent.withdrawn >= ALL_PURPOSES)


@guarded("preferences")
async def preferences_post(request: web.Request) -> web.Response:
    """POST: the preference page's button (rate limited per client, as the page's other
    forms are)."""
    tracking = request.app[TRACKING]
    reading = recipient_token(request, "preferences")
    wait = await tracking.take(limiter_key(client_of(request, tracking)))
    if wait:
        return too_many(request, wait, "preferences")
    if reading is None:
        return page(request, "invalid.html", status=404, kind="preferences")
    try:
        async with asyncio.timeout(tracking.options.body_timeout):
            form = await request.post()
    except TimeoutError:
        response = page(request, "bad-request.html", status=408)
        response.force_close()
        return response
    except (ValueError, UnicodeDecodeError, LookupError):
        return page(request, "bad-request.html", status=400)
    if STOP_TRACKING not in form:
        return page(request, "bad-request.html", status=400)
    return await stop_tracking(request, reading, SOURCE_PREFERENCES)


async def stop_tracking(request: web.Request, reading: Reading, source: str) -> web.Response:
    """Withdraw the recipient from individual open and click tracking: the consent change
    (audited), the `tracking.withdrawn` event and its webhook, in one transaction.
    Idempotent: once withdrawn, another POST changes and records nothing."""
    tracking = request.app[TRACKING]
    ref = reading.ref
    proof: dict[str, Any] = {"key_id": reading.key_id}
    address = client_of(request, tracking)
    if tracking.options.store_ip and address is not None:
        proof["ip"] = truncated(address)

    def write(db: Connection) -> list[str]:
        changed = record_consent(
            db, ref.address_hash, ALL_PURPOSES, State.WITHDRAWN, source=source, detail=proof
        )
        if changed:
            purposes = sorted(purpose.value for purpose in changed)
            detail = {"purposes": purposes, "method": source, **proof}
            insert_events(
                db,
                [
                    Event(
                        EventType.TRACKING_WITHDRAWN,
                        ref.address_hash,
                        ref.campaign,
                        ref.queue_id,
                        None,
                        detail,
                    )
                ],
            )
        return [purpose.value for purpose in changed]

    changed = await tracking.suppressions.database.write(write)
    if changed:
        tracking.metrics.withdrawals.labels(source).inc()
        log.info("tracking withdrawn", extra={"queue_id": ref.queue_id, "method": source})
    return page(request, "tracking-stopped.html")
