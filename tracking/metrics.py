"""Prometheus metrics of one tracking app, in a registry of its own (no global state: two
apps in one process, as in tests, count separately)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .listener import ListenerStats


class Tally(Protocol):
    """What resolving and writing open and click events counts: the app's `Metrics` when that
    happens in the app's process; in the event process, deltas the app adds to its own."""

    def open(self, machine: bool, reason: str, count: int = 1) -> None: ...

    def bad_token(self, route: str, count: int = 1) -> None: ...

    def error(self, where: str, count: int = 1) -> None: ...

    def limited(self, route: str, count: int = 1) -> None: ...


class _PlainCounter(Collector):
    """A counter family kept in a plain dict, label values -> count, and read by Prometheus
    at scrape time. What the hot paths count (every request, every batch of opens) costs
    one dict update this way, where a prometheus Counter takes a lock and several Python
    calls per increment. Counted on the event loop only, so no lock is needed."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.counts: dict[tuple[object, ...], int] = {}
        if not labels:
            self.counts[()] = 0  # shown from the start, as a prometheus Counter is

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for values, count in list(self.counts.items()):
            family.add_metric([_label(value) for value in values], count)
        yield family

    def describe(self) -> Iterable[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labels)


class _ListenerCollector(Collector):
    """The HTTP listener's connections, read from its stats at scrape time."""

    def __init__(self, stats: ListenerStats) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        stats = self.stats
        yield GaugeMetricFamily(
            "optout_http_connections", "HTTP connections open", value=stats.open
        )
        refused = CounterMetricFamily(
            "optout_http_connections_refused",
            "HTTP connections refused at once (a client over its share)",
            labels=("reason",),
        )
        for reason, count in sorted(stats.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        yield CounterMetricFamily(
            "optout_http_header_timeouts",
            "HTTP connections closed for not sending their request headers in time",
            value=stats.header_timeouts,
        )
        yield CounterMetricFamily(
            "optout_http_accept_failures",
            "Failed accepts on the HTTP listener (out of descriptors or memory)",
            value=stats.accept_failures,
        )

    def describe(self) -> Iterable[Metric]:
        return []


# One process's counts for another to add to its own (tracking.hub): by family name, family
# type, sample name and labels.
SampleKey = tuple[str, str, str, tuple[tuple[str, str], ...]]
Snapshot = dict[SampleKey, float]


class _Summed(Collector):
    """A registry's families with other processes' counts added, sample by sample."""

    def __init__(self, registry: CollectorRegistry, others: list[Snapshot]) -> None:
        self.registry = registry
        self.others = others

    def collect(self) -> Iterable[Metric]:
        extra: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for snapshot in self.others:
            for (family_name, _, sample_name, labels), value in snapshot.items():
                by_sample = extra.setdefault(family_name, {})
                key = (sample_name, labels)
                by_sample[key] = by_sample.get(key, 0.0) + value
        for family in self.registry.collect():
            summed = Metric(family.name, family.documentation, family.type, family.unit)
            added = extra.pop(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                value = sample.value + added.pop(key, 0.0)
                summed.add_sample(sample.name, sample.labels, value, sample.timestamp)
            for (name, labels), value in added.items():
                summed.add_sample(name, dict(labels), value)
            yield summed


def _label(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        requests = _PlainCounter(
            "optout_http_requests",
            "HTTP requests answered, by route and status",
            ("route", "method", "status"),
        )
        opens = _PlainCounter("optout_opens", "Opens recorded, by verdict", ("machine", "reason"))
        written = _PlainCounter(
            "optout_events_written", "Open and click events committed to the database"
        )
        for family in (requests, opens, written):
            r.register(family)
        self._request_counts = requests.counts
        self._open_counts = opens.counts
        self._written_counts = written.counts
        self._clicks = Counter(
            "optout_clicks", "Clicks redirected, by verdict", ["machine", "reason"], registry=r
        )
        self.unsubscribes = Counter(
            "optout_unsubscribes",
            "Recipients newly suppressed, by method and scope kind",
            ["method", "scope"],
            registry=r,
        )
        self.withdrawals = Counter(
            "optout_tracking_withdrawals",
            "Recipients who stopped individual open and click tracking, by page",
            ["method"],
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
            "optout_rate_limited",
            "Requests refused with 429; for the pixel and clicks, answered but not recorded",
            ["route"],
            registry=r,
        )
        self.errors = Counter(
            "optout_errors",
            "Failures: handler exceptions and event writes",
            ["where"],
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
        self._others: dict[int, Snapshot] = {}
        self._retired: Snapshot = {}

    def request(self, route: str, method: str, status: int) -> None:
        """`route` is the route's name (a fixed set), never a path: paths hold tokens."""
        counts = self._request_counts
        key = (route, method, status)
        counts[key] = counts.get(key, 0) + 1

    def open(self, machine: bool, reason: str, count: int = 1) -> None:
        counts = self._open_counts
        key = (machine, reason)
        counts[key] = counts.get(key, 0) + count

    def written(self, count: int) -> None:
        """Open and click events committed."""
        self._written_counts[()] += count

    def click(self, machine: bool, reason: str) -> None:
        self._verdict(self._clicks, "c", machine, reason, 1)

    def bad_token(self, route: str, count: int = 1) -> None:
        self.bad_tokens.labels(route).inc(count)

    def error(self, where: str, count: int = 1) -> None:
        self.errors.labels(where).inc(count)

    def limited(self, route: str, count: int = 1) -> None:
        self.rate_limited.labels(route).inc(count)

    def _verdict(self, counter: Counter, kind: str, machine: bool, reason: str, count: int) -> None:
        key = (kind, machine, reason)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(str(machine).lower(), reason)
        child.inc(count)

    def watch_buffer(self, size: Callable[[], int]) -> None:
        self.buffered.set_function(lambda: float(size()))

    def watch_listener(self, stats: ListenerStats) -> None:
        """Show an HTTP listener's connection counts (`tracking.listener`)."""
        self.registry.register(_ListenerCollector(stats))

    def render(self) -> bytes:
        """The text /metrics answers: this process's counts, and the other HTTP processes'
        (`include`) added."""
        if not (self._others or self._retired):
            return _generate_latest(self.registry)
        summed = CollectorRegistry(auto_describe=False)
        summed.register(_Summed(self.registry, [*self._others.values(), self._retired]))
        return _generate_latest(summed)

    def snapshot(self) -> Snapshot:
        """This process's counts, for the main HTTP process to add to its own."""
        return {
            (family.name, family.type, sample.name, tuple(sorted(sample.labels.items()))): (
                sample.value
            )
            for family in self.registry.collect()
            for sample in family.samples
            if not sample.name.endswith("_created")  # a time, not a count
        }

    def include(self, process: int, snapshot: Snapshot) -> None:
        """Another HTTP process's latest counts (replacing its last)."""
        self._others[process] = snapshot

    def retire(self, process: int) -> None:
        """That process is gone: its counters stay in the sums (a Prometheus counter never
        goes down), its gauges leave them."""
        for key, value in self._others.pop(process, {}).items():
            if key[1] == "counter":
                self._retired[key] = self._retired.get(key, 0.0) + value
