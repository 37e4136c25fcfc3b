"""Prometheus metrics of one tracking app, in a registry of its own (no global state: two
apps in one process, as in tests, count separately)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge
from prometheus_client import generate_latest as _generate_latest


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter(
            "optout_http_requests",
            "HTTP requests answered, by route and status",
            ["route", "method", "status"],
            registry=r,
        )
        self._opens = Counter(
            "optout_opens", "Opens recorded, by verdict", ["machine", "reason"], registry=r
        )
        self._clicks = Counter(
            "optout_clicks", "Clicks redirected, by verdict", ["machine", "reason"], registry=r
        )
        self.unsubscribes = Counter(
            "optout_unsubscribes",
            "Recipients newly suppressed, by method and scope kind",
            ["method", "scope"],
            registry=r,
        )
        self.undos = Counter(
            "optout_unsubscribe_undos", "Unsubscribes undone from the done page", registry=r
        )
        self.bad_tokens = Counter(
            "optout_bad_tokens",
            "Requests with a forged, tampered or expired token",
            ["route"],
            registry=r,
        )
        self.rate_limited = Counter(
            "optout_rate_limited", "Requests refused with 429", ["route"], registry=r
        )
        self.errors = Counter(
            "optout_errors",
            "Failures: handler exceptions and event writes",
            ["where"],
            registry=r,
        )
        self.events_written = Counter(
            "optout_events_written",
            "Open and click events committed to the database",
            registry=r,
        )
        self.events_dropped = Counter(
            "optout_events_dropped",
            "Open and click events lost (buffer full or database failing)",
            registry=r,
        )
        self.buffered = Gauge(
            "optout_events_buffered", "Open and click events waiting to be written", registry=r
        )
        # labels() costs a lookup under a lock; the hot paths keep their children here.
        self._children: dict[tuple[object, ...], Counter] = {}

    def request(self, route: str, method: str, status: int) -> None:
        """`route` is the route's name (a fixed set), never a path: paths hold tokens."""
        key = ("r", route, method, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._requests.labels(route, method, str(status))
        child.inc()

    def open(self, machine: bool, reason: str) -> None:
        self._verdict(self._opens, "o", machine, reason)

    def click(self, machine: bool, reason: str) -> None:
        self._verdict(self._clicks, "c", machine, reason)

    def _verdict(self, counter: Counter, kind: str, machine: bool, reason: str) -> None:
        key = (kind, machine, reason)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(str(machine).lower(), reason)
        child.inc()

    def watch_buffer(self, size: Callable[[], int]) -> None:
        self.buffered.set_function(lambda: float(size()))

    def render(self) -> bytes:
        return _generate_latest(self.registry)
