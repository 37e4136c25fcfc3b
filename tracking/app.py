"""The recipient-facing HTTP endpoint: pixel, clicks, unsubscribe pages and RFC 8058 one-click,
plus /healthz and /metrics for the operator."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path

from aiohttp import web
from multidict import istr

from suppression import StorageUnavailable, SuppressionStore

from .beacons import DEFAULT_FETCH_LIMIT, DEFAULT_REPEAT_WINDOW, BeaconSpec, resolve_fetch
from .clicks import click
from .event_process import EventProcess, EventProcessSpec
from .events import EventStore
from .hub import HubRecorder, Line
from .metrics import Metrics
from .network import LOOPBACK, networks
from .opens import PIXEL_GIF, PixelAnswer, pixel_handler
from .pages import environment
from .preferences import preferences_page, preferences_post
from .ratelimit import RateLimit, RateLimiter
from .recorder import EventRecorder, Recorder
from .state import SECURITY_HEADERS, TRACKING, Options, Tracking, client_of
from .tokens import (
    CLICK_PATH,
    OPEN_PATH,
    PIXEL_SUFFIX,
    PREFERENCES_PATH,
    UNSUBSCRIBE_PATH,
    TrackingUrls,
)
from .unsubscribe import confirmation_page, unsubscribe
from .verdict import DEFAULT_FAST_SECONDS

__all__ = [
    "HEALTH_CHECKS",
    "MAX_REQUEST_BODY",
    "PIXEL_GIF",
    "SECURITY_HEADERS",
    "HealthCheck",
    "create_app",
    "health_report",
]

# What else /healthz asks (the stores, the spool): each returns its problems, [] if none.
HealthCheck = Callable[[], Awaitable[list[str]]]
HEALTH_CHECKS: web.AppKey[list[HealthCheck]] = web.AppKey("health_checks")

# A one-click POST is 26 bytes; the page's form a few dozen. Anything large is not ours.
MAX_REQUEST_BODY = 16 * 1024
_METHODS = frozenset({"GET", "HEAD", "POST"})
_CSP = istr("Content-Security-Policy")
HealthDetails = Callable[[], Sequence[str]]
HEALTH_DETAILS: web.AppKey[HealthDetails] = web.AppKey("optout.health_details")
HUB_LINE = web.AppKey("optout.hub_line", Line)


def create_app(
    suppressions: SuppressionStore,
    events: EventStore,
    urls: TrackingUrls,
    *,
    template_dir: Path | None = None,
    brand: str | None = None,
    store_ip: bool = False,
    store_user_agent: bool = False,
    durable_events: bool = False,
    event_process: bool = False,
    event_process_logging: Callable[[], object] | None = None,
    pending_events: Path | None = None,
    rate_limit: RateLimit = RateLimit(),  # noqa: B008 - frozen, shared safely
    fetch_limit: RateLimit | None = DEFAULT_FETCH_LIMIT,
    repeat_window: timedelta = DEFAULT_REPEAT_WINDOW,
    body_timeout: float = 30.0,
    trusted_proxies: Sequence[str] = LOOPBACK,
    metrics_from: Sequence[str] = LOOPBACK,
    undo_window: timedelta = timedelta(hours=1),
    machine_seconds: float = DEFAULT_FAST_SECONDS,
    machine_agents: Mapping[str, str] | None = None,
    machine_networks: Mapping[str, Sequence[str]] | None = None,
    clock: Callable[[], float] = time.time,
    health_details: HealthDetails | None = None,
    tracking_withdrawal: bool = False,
    keep_last_open_only: bool = False,
    hub: Line | None = None,
) -> web.Application:
    """The app. Every keyword has a safe default:

    - `template_dir`: the operator's templates; a file there replaces ours of the same name.
    - `brand`: the sender's name, shown on the pages.
    - `store_ip` / `store_user_agent`: keep the client's /24 (IPv4) or /48 (IPv6) network /
      its User-Agent in open and click events (and the IP network in unsubscribe proofs).
    - `durable_events`: answer a pixel or click only once its event is committed.
    - `event_process`: check, judge and write opens and clicks in a child process (another
      core), not on this event loop; `event_process_logging` sets up that process's logs;
      `pending_events`: a local file where its events wait while a shared store is away
      (picklable, e.g. a functools.partial of a module's function; default: plain text).
    - `rate_limit`: on the state-changing POSTs, per client address (a genuine one-click:
      per recipient, so a mail provider's shared addresses never have an opt-out refused).
    - `fetch_limit`: opens and clicks recorded per client address; past it the image or
      redirect is still answered, unrecorded (None: no limit). Known proxy networks are
      not limited.
    - `body_timeout`: seconds a POST's body may take to arrive (then 408, and the
      connection closes).
    - `repeat_window`: fetches of one copy's pixel (or one of its links), with one verdict,
      within this long of the first are one event with a count, not a row each.
    - `trusted_proxies`: peers whose X-Forwarded-For is believed (a local reverse proxy).
    - `metrics_from`: client networks that may read /metrics.
    - `undo_window`: how long the done page's undo works after an opt-out.
    - `machine_*`: when an open or click counts as a machine's, beyond the built-in lists.
    - `health_details`: lines /healthz adds below "ok" (a webhook endpoint failing for an
      hour, say); they do not make it fail.
    - `tracking_withdrawal`: the unsubscribe pages also offer to stop individual open and
      click tracking without unsubscribing (where some mail may track individually; the
      preference page, /p/TOKEN, always does).
    - `keep_last_open_only`: a recipient's opens of a campaign are one event holding only
      the day of the last one.
    - `hub`: this app runs in a worker HTTP process, and its line to the main one takes its
      events, its POSTs' rate limit, /healthz and /metrics (tracking.hub); `event_process`
      and `pending_events` are then the main process's business.
    """
    app = web.Application(client_max_size=MAX_REQUEST_BODY)
    metrics = Metrics()
    spec = BeaconSpec.of(
        urls,
        trusted_proxies=trusted_proxies,
        store_ip=store_ip,
        store_user_agent=store_user_agent,
        machine_seconds=machine_seconds,
        machine_agents=machine_agents,
        machine_networks=machine_networks,
        repeat_window=repeat_window,
        fetch_limit=fetch_limit,
        keep_last_open_only=keep_last_open_only,
    )
    beacons = spec.build()
    recorder: Recorder
    if hub is not None:
        recorder = HubRecorder(hub, metrics)
    elif event_process:
        recorder = EventProcess(
            EventProcessSpec(
                events.spec, spec, setup_logging=event_process_logging, pending=pending_events
            ),
            metrics,
        )
    else:
        recorder = EventRecorder(
            events,
            metrics,
            resolve=functools.partial(resolve_fetch, beacons, metrics),
            repeat_window=repeat_window,
            counting=beacons.counting,
        )
    tracking = app[TRACKING] = Tracking(
        suppressions=suppressions,
        events=events,
        urls=urls,
        templates=environment(template_dir),
        options=Options(
            brand=brand,
            store_ip=store_ip,
            durable_events=durable_events,
            undo_window=undo_window,
            trusted_proxies=beacons.trusted_proxies,
            metrics_from=networks(metrics_from),
            clock=clock,
            body_timeout=body_timeout,
            tracking_withdrawal=tracking_withdrawal,
        ),
        metrics=metrics,
        beacons=beacons,
        limiter=(limiter := RateLimiter(rate_limit)),
        recorder=recorder,
        take=hub.take if hub is not None else _taking(limiter),
    )
    app[HEALTH_DETAILS] = health_details or _no_details
    if hub is not None:
        app[HUB_LINE] = hub
    app.on_startup.append(_start_recorder)
    app.on_cleanup.append(_stop_recorder)
    app.on_response_prepare.append(functools.partial(_on_response, metrics))

    router = app.router
    router.add_get(OPEN_PATH + "{token}" + PIXEL_SUFFIX, pixel_handler(tracking), name="pixel")
    router.add_get(CLICK_PATH + "{recipient}/{link}", click, name="click")
    unsubscribe_route = router.add_resource(UNSUBSCRIBE_PATH + "{token}", name="unsubscribe")
    unsubscribe_route.add_route("GET", confirmation_page)
    unsubscribe_route.add_route("HEAD", confirmation_page)
    unsubscribe_route.add_route("POST", unsubscribe)
    preferences_route = router.add_resource(PREFERENCES_PATH + "{token}", name="preferences")
    preferences_route.add_route("GET", preferences_page)
    preferences_route.add_route("HEAD", preferences_page)
    preferences_route.add_route("POST", preferences_post)
    router.add_get("/healthz", healthz, name="healthz")
    router.add_get("/metrics", metrics_page, name="metrics")
    return app


async def _start_recorder(app: web.Application) -> None:
    await app[TRACKING].recorder.start()


async def _stop_recorder(app: web.Application) -> None:
    await app[TRACKING].recorder.close()


async def _on_response(
    metrics: Metrics, request: web.Request, response: web.StreamResponse
) -> None:
    """Security headers on every answer, and the request counted by route (never by path)."""
    if type(response) is PixelAnswer:
        return  # made with every header, and counted by the pixel's handler
    headers = response.headers
    if _CSP not in headers:
        headers.update(SECURITY_HEADERS)
    route = request.match_info.route.name or "other"
    method = request.method if request.method in _METHODS else "OTHER"
    metrics.request(route, method, response.status)


def _no_details() -> Sequence[str]:
    return ()


def _taking(limiter: RateLimiter) -> Callable[[str], Awaitable[float]]:
    async def take(key: str) -> float:
        return limiter.take(key)

    return take


async def healthz(request: web.Request) -> web.Response:
    hub = request.app.get(HUB_LINE)
    status, text = await (hub.health() if hub is not None else health_report(request.app))
    return web.Response(status=status, text=text)


async def health_report(app: web.Application) -> tuple[int, str]:
    """What /healthz answers for the relay: its status and text."""
    details = "".join(f"{line}\n" for line in app[HEALTH_DETAILS]())
    try:
        # A real read: a shared store's server that went away shows here at once.
        await app[TRACKING].suppressions.database.read(lambda db: db.execute("SELECT 1").fetchone())
    except StorageUnavailable as exc:
        return 503, f"store unreachable: {exc}\n{details}"
    problems = [] if app[TRACKING].recorder.healthy else ["event writes failing"]
    for check in app.get(HEALTH_CHECKS, ()):
        problems += await check()
    if problems:
        return 503, "".join(f"{p}\n" for p in problems) + details
    return 200, f"ok\n{details}"


async def metrics_page(request: web.Request) -> web.Response:
    """Prometheus text format, to the configured networks only: the counts are the
    operator's business, and this listener faces the internet."""
    tracking = request.app[TRACKING]
    if client_of(request, tracking) not in tracking.options.metrics_from:
        raise web.HTTPNotFound()
    metrics = tracking.metrics
    hub = request.app.get(HUB_LINE)
    body = await hub.render() if hub is not None else metrics.render()
    return web.Response(body=body, headers={"Content-Type": metrics.content_type})
