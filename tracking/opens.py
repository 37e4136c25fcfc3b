"""The open pixel: always the image; its open is recorded through the app's recorder.

The pixel is the route mail clients load by the million, so its handler does as little per
request as it can: it is made once per app (`pixel_handler`) with everything it needs bound,
hands the recorder a plain tuple (`raw_fetch`; the token is checked and the verdict given in
the recorder's batch), counts itself in the request metrics, and answers with headers made
once, security headers included, so that the app's response hook has nothing to do for it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from multidict import CIMultiDict, istr

from .beacons import raw_fetch
from .recorder import HIGH_WATER, add_paced
from .state import SECURITY_HEADERS, Tracking

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
# Every header of the pixel's answer, the security headers included: made once with keys
# multidict need not convert, copied per answer.
_PIXEL_ANSWER = {"Content-Type": "image/gif", **PIXEL_HEADERS, **SECURITY_HEADERS}
_PIXEL_ANSWER_HEADERS = CIMultiDict({istr(name): value for name, value in _PIXEL_ANSWER.items()})


class PixelAnswer(web.Response):
    """The pixel's image. Its class tells the app's response hook that the answer already
    has every header and that the pixel handler has counted the request."""


def pixel_handler(tracking: Tracking) -> Callable[[web.Request], Awaitable[PixelAnswer]]:
    """The pixel's handler for one app: always the image, so no client shows a broken
    picture; an open (in the recorder's batch) only for a valid token."""
    recorder = tracking.recorder
    add = recorder.add
    clock = tracking.options.clock
    durable = tracking.options.durable_events
    metrics = tracking.metrics

    async def pixel(request: web.Request) -> PixelAnswer:
        method = request.method  # GET or HEAD: the route takes no other
        try:
            fetch = raw_fetch(request, request.match_info["token"], clock())
            if durable:
                await recorder.add_and_wait(fetch)
            elif recorder.waiting < HIGH_WATER:  # `add_paced`'s own test, made here: no
                add(fetch)  # coroutine per request on the path that nearly always runs
            else:
                await add_paced(recorder, fetch)
        except Exception:
            metrics.error("pixel")
            log.exception("open not recorded")
        # Counted here, as the hook counts every other answer (see `app._on_response`).
        metrics.request("pixel", method, 200)
        return PixelAnswer(body=PIXEL_GIF, headers=_PIXEL_ANSWER_HEADERS)

    return pixel
