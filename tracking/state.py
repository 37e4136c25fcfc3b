"""What the tracking app's handlers share: its options and its parts, under one app key
(one lookup per request on the hot path)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta

import jinja2
from aiohttp import web

from suppression import SuppressionStore

from .beacons import Beacons
from .events import EventStore
from .metrics import Metrics
from .network import IPAddress, Ranges, client_address, forwarded_for
from .ratelimit import RateLimiter
from .recorder import Recorder
from .tokens import TrackingUrls

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:;"
        " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


@dataclass(frozen=True, slots=True)
class Options:
    brand: str | None
    store_ip: bool
    durable_events: bool
    undo_window: timedelta
    trusted_proxies: Ranges
    metrics_from: Ranges
    clock: Callable[[], float] = time.time
    body_timeout: float = 30.0  # seconds to read a POST's body
    tracking_withdrawal: bool = False  # the unsubscribe pages offer to stop tracking


@dataclass(slots=True)
class Tracking:
    suppressions: SuppressionStore
    events: EventStore
    urls: TrackingUrls
    templates: jinja2.Environment
    options: Options
    metrics: Metrics
    beacons: Beacons
    limiter: RateLimiter
    recorder: Recorder
    # The per-client limit on state-changing POSTs: `limiter` here, or the main HTTP
    # process's in a worker (tracking.hub). Seconds to wait; 0: go ahead.
    take: Callable[[str], Awaitable[float]]
    pages: dict[tuple[object, ...], str] = field(default_factory=dict)  # rendered, by context


TRACKING = web.AppKey("optout.tracking", Tracking)


def client_of(request: web.Request, tracking: Tracking) -> IPAddress | None:
    """The client's address (behind a trusted proxy, the one it forwarded for)."""
    return client_address(
        request.remote,
        forwarded_for(request.headers),
        tracking.options.trusted_proxies,
    )
