"""The open pixel: always the image; its open is recorded through the app's recorder."""

from __future__ import annotations

import logging

from aiohttp import web
from multidict import CIMultiDict, istr

from .beacons import Fetch
from .state import SECURITY_HEADERS, TRACKING

log = logging.getLogger("optout.http")

# The smallest transparent GIF: 1x1, one palette entry.
PIXEL_GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00"
    b"\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
PIXEL_HEADERS = {
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0",
    "Pragma": "no-cache",
}
# Every header of the pixel's answer, the security headers included (the app's hook then has
# nothing to add): made once with keys multidict need not convert, copied per answer.
_PIXEL_ANSWER = {"Content-Type": "image/gif", **PIXEL_HEADERS, **SECURITY_HEADERS}
_PIXEL_ANSWER_HEADERS = CIMultiDict({istr(name): value for name, value in _PIXEL_ANSWER.items()})


async def pixel(request: web.Request) -> web.Response:
    """Always the image, so no client shows a broken picture; an open only for a valid token."""
    tracking = request.app[TRACKING]
    try:
        fetch = Fetch.of(request, request.match_info["token"], tracking.options.clock())
        if tracking.options.durable_events:
            await tracking.recorder.add_and_wait(fetch)
        else:
            tracking.recorder.add(fetch)
    except Exception:
        tracking.metrics.errors.labels("pixel").inc()
        log.exception("open not recorded")
    return web.Response(body=PIXEL_GIF, headers=_PIXEL_ANSWER_HEADERS)
