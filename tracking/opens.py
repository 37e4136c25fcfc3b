"""The open pixel, and the verdict and detail every open and click event carries."""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

from aiohttp import web

from .errors import BadToken
from .events import Event, EventType
from .network import IPAddress, client_address, truncated
from .state import TRACKING, Tracking
from .tokens import Reading
from .verdict import Verdict

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
MAX_STORED_AGENT = 256


class Fetch(NamedTuple):
    """What a beacon request brought: all the handler keeps before it answers (a few
    strings, not the request). For the pixel, the token is checked and the verdict given in
    the recorder's batch (`resolve_fetch`)."""

    token: str
    user_agent: str | None
    forwarded_for: str | None
    purpose: str | None  # a prefetch says so in Sec-Purpose or one of its older names
    remote: str | None
    head: bool
    at: float

    @classmethod
    def of(cls, request: web.Request, token: str) -> Fetch:
        headers = request.headers
        return cls(
            token,
            headers.get("User-Agent"),
            headers.get("X-Forwarded-For"),
            headers.get("Sec-Purpose")
            or headers.get("Purpose")
            or headers.get("X-Purpose")
            or headers.get("X-Moz"),
            request.remote,
            request.method == "HEAD",
            time.time(),
        )


async def pixel(request: web.Request) -> web.Response:
    """Always the image, so no client shows a broken picture; an open only for a valid token."""
    tracking = request.app[TRACKING]
    try:
        fetch = Fetch.of(request, request.match_info["token"])
        if tracking.options.durable_events:
            await tracking.recorder.add_and_wait(fetch)
        else:
            tracking.recorder.add(fetch)
    except Exception:
        tracking.metrics.errors.labels("pixel").inc()
        log.exception("open not recorded")
    return web.Response(body=PIXEL_GIF, content_type="image/gif", headers=PIXEL_HEADERS)


def resolve_fetch(tracking: Tracking, fetch: Fetch) -> Event | None:
    """The open event of a pixel fetch, or None for a token that is not genuine."""
    try:
        reading = tracking.urls.check_open(fetch.token)
    except BadToken:
        tracking.metrics.bad_tokens.labels("pixel").inc()
        return None
    verdict, address = judge(tracking, reading, fetch)
    tracking.metrics.open(verdict.machine, verdict.reason)
    return beacon_event(tracking, EventType.OPEN, reading, verdict, fetch, address)


def judge(tracking: Tracking, reading: Reading, fetch: Fetch) -> tuple[Verdict, IPAddress | None]:
    """The verdict, and the client address it was given on."""
    address = client_address(fetch.remote, fetch.forwarded_for, tracking.options.trusted_proxies)
    verdict = tracking.judge.judge(
        fetch.user_agent,
        address,
        tracking.options.clock() - reading.signed_at,
        head=fetch.head,
        prefetch=fetch.purpose is not None and "prefetch" in fetch.purpose.lower(),
    )
    return verdict, address


def beacon_event(
    tracking: Tracking,
    kind: EventType,
    reading: Reading,
    verdict: Verdict,
    fetch: Fetch,
    address: IPAddress | None,
    **extra: Any,
) -> Event:
    """The event, with the verdict's reason; an address or agent only if configured."""
    options = tracking.options
    detail: dict[str, Any] = {"reason": verdict.reason, **extra}
    if options.store_ip and address is not None:
        detail["ip"] = truncated(address)
    if options.store_user_agent and fetch.user_agent:
        detail["user_agent"] = fetch.user_agent[:MAX_STORED_AGENT]
    ref = reading.ref
    return Event(
        kind,
        ref.address_hash,
        ref.campaign,
        ref.message_id,
        verdict.machine,
        detail,
        event_time(fetch.at),
    )


class _EventClock:
    """A time in the events' format (`suppression.utc_now`), at a fraction of its cost: the
    date and time of a second are formatted once, not per open."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, moment: float) -> str:
        second = int(moment)
        if second != self._second:
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._text}.{int((moment - second) * 1000):03d}Z"


event_time = _EventClock()
