"""Click redirects: only ever to the exact URL signed for the message, never anywhere else.

A click URL is `/c/RECIPIENT/LINK`: RECIPIENT is the recipient's signed reference (one per
copy), LINK a signed [message id, URL] (one per link of a message, made once). Both must be
genuine and name the same message. A link measured in aggregate is `/c/-/LINK`, LINK signing
the campaign, the sending domain and the URL: the same for every copy of the message.
Anything else is answered with a page, never a redirect: no one can use this endpoint to
send people to an address the relay did not sign.
"""

from __future__ import annotations

import logging

from aiohttp import web

from .beacons import Fetch, aggregate_hit, beacon_event, client_of_fetch, judge
from .errors import BadToken
from .events import EventType
from .pages import NO_STORE, guarded, page
from .recorder import add_paced
from .state import TRACKING
from .tokens import AggregateReading, is_redirectable

log = logging.getLogger("optout.http")

MAX_STORED_URL = 500


@guarded("click")
async def click(request: web.Request) -> web.Response:
    tracking = request.app[TRACKING]
    try:
        found = tracking.urls.check_click(
            request.match_info["recipient"], request.match_info["link"]
        )
    except BadToken:
        tracking.metrics.bad_tokens.labels("click").inc()
        return page(request, "invalid.html", status=404, kind="link")
    if not is_redirectable(found.url):  # signed, yet not safe to send a browser to
        tracking.metrics.bad_tokens.labels("click").inc()
        return page(request, "invalid.html", status=404, kind="link")
    redirect = web.Response(status=302, headers={"Location": found.url, "Cache-Control": NO_STORE})
    fetch = Fetch.of(request, request.match_info["recipient"], tracking.options.clock())
    address = client_of_fetch(tracking.beacons, fetch)
    if not tracking.beacons.admits(address):  # the reader still gets there, unrecorded
        tracking.metrics.limited("click")
        return redirect
    reading = found.reading
    verdict = judge(tracking.beacons, reading, fetch, address)
    tracking.metrics.click(verdict.machine, verdict.reason)
    event: object
    if isinstance(reading, AggregateReading):
        event = aggregate_hit(EventType.CLICK, reading, verdict, fetch, address, found.url)
    else:
        event = beacon_event(
            tracking.beacons,
            EventType.CLICK,
            reading,
            verdict,
            fetch,
            address,
            url=found.url[:MAX_STORED_URL],
        )
    try:
        if tracking.options.durable_events:
            await tracking.recorder.add_and_wait(event)
        else:
            await add_paced(tracking.recorder, event)
    except Exception:  # the reader still gets where the link goes
        tracking.metrics.errors.labels("click").inc()
        log.exception("click not recorded")
    return redirect
