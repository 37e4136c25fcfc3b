"""The HTTP side on more than one process. Worker processes answer requests on the same
port as the main HTTP process (SO_REUSEPORT: the kernel spreads connections over them) and
lean on it, the hub, for everything that must be one across them:

- open and click events go to the hub's recorder, so that one event process checks, counts
  and writes them all (repeat windows and aggregate counts whole; the per-client limit on
  recorded opens too, while a click's is checked where it is answered, in each process);
- a new connection is admitted against the per-client caps the hub keeps for every process;
- a state-changing POST takes from the hub's per-client token bucket;
- /healthz and /metrics are answered by the hub, /metrics with every process's counts
  (a worker sends its own every second, and when it stops).

Each worker has a line to the hub: a socket pair made when the hub spawned it, carrying
`tracking.frames` messages (plain tuples). A worker asks (`Line.ask`, answered by id) or
tells (no answer). A worker whose hub is gone stops; the hub forgets what a dead worker
held (its connections' counts) and keeps its counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import EventWriteError, TrackingError
from .frames import Frames, frame
from .listener import ClientCounts
from .metrics import Metrics
from .ratelimit import RateLimiter
from .recorder import MAX_BATCH, MAX_PENDING, Forwarding, Pending, Recorder

log = logging.getLogger("optout.http")

METRICS_EVERY = 1.0  # seconds between a worker's reports of its counts

# What a worker asks (answered) or tells (not).
EVENTS = "events"  # ask: (items,) -> None, or why they were not written
ADMIT = "admit"  # ask: (client key,) -> bool
RELEASE = "release"  # tell: (client key,)
TAKE = "take"  # ask: (client key,) -> seconds to wait (0: go ahead)
HEALTH = "health"  # ask: () -> (status, text)
RENDER = "render"  # ask: () -> /metrics' body
COUNTS = "counts"  # tell: (Snapshot,)
LISTENING = "listening"  # tell: ()

HealthReport = Callable[[], Awaitable[tuple[int, str]]]


class HubGone(TrackingError):
    """The main HTTP process is gone (this worker is about to stop)."""


# --- the worker's side -----------------------------------------------------------------------


class Line(asyncio.Protocol):
    """A worker's end of its line to the hub."""

    def __init__(self) -> None:
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.WriteTransport | None = None
        self._frames = Frames()
        self._asked: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        for asked_id, answer in self._frames.feed(data):
            waiter = self._asked.pop(asked_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(answer)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        asked, self._asked = self._asked, {}
        for waiter in asked.values():
            if not waiter.done():
                waiter.set_exception(HubGone("the main HTTP process is gone"))
                waiter.exception()  # marked retrieved: its asker may be gone too
        if not self.closed.done():
            self.closed.set_result(None)

    def ask(self, kind: str, *args: object) -> asyncio.Future[Any]:
        """The hub's answer, to come (HubGone if the line is down)."""
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._transport is None or self._transport.is_closing():
            waiter.set_exception(HubGone("the main HTTP process is gone"))
            return waiter
        asked_id, self._next_id = self._next_id, self._next_id + 1
        self._asked[asked_id] = waiter
        self._transport.write(frame((kind, asked_id, *args)))
        return waiter

    def tell(self, kind: str, *args: object) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(frame((kind, None, *args)))

    # What the worker's app and listener use (each a thin shell over `ask` or `tell`).

    async def admit(self, key: str) -> bool:
        answer: bool = await self.ask(ADMIT, key)
        return answer

    def release(self, key: str) -> None:
        self.tell(RELEASE, key)

    async def take(self, key: str) -> float:
        answer: float = await self.ask(TAKE, key)
        return answer

    async def health(self) -> tuple[int, str]:
        answer: tuple[int, str] = await self.ask(HEALTH)
        return answer

    async def render(self) -> bytes:
        answer: bytes = await self.ask(RENDER)
        return answer


class HubRecorder(Forwarding):
    """A worker's `Recorder`: what its requests hand over goes to the hub as one batch per
    turn of the event loop (no window: the hub batches for its writer), and is committed
    when the hub says so."""

    def __init__(self, line: Line, metrics: Metrics) -> None:
        super().__init__(metrics, window=MAX_PENDING)
        self._line = line
        self._sent: set[asyncio.Future[Any]] = set()
        self.healthy = True
        # What is sent waits at the hub too, and is shown there: only what is not yet sent.
        metrics.watch_buffer(lambda: len(self._gathering))

    async def start(self) -> None:
        pass

    def add_batch(self, items: Sequence[Pending]) -> asyncio.Future[None]:
        raise TypeError("a worker's recorder takes no other process's events")

    async def flush(self) -> None:
        self._send()
        for waiter in list(self._sent):
            with contextlib.suppress(Exception):
                await asyncio.shield(waiter)

    async def close(self) -> None:
        self._closing = True
        await self.flush()

    def expect_stop(self) -> None:
        pass  # the hub's recorder writes; this one only hands over

    def _send(self) -> None:
        self._send_due = False
        while self._gathering.items:
            items, done = self._gathering.take(MAX_BATCH)
            answer = self._line.ask(EVENTS, items)
            self._sent.add(answer)
            self._sent_items += len(items)
            answer.add_done_callback(functools.partial(self._answered, len(items), done))

    def _answered(self, size: int, done: asyncio.Future[None], answer: asyncio.Future[Any]) -> None:
        self._sent.discard(answer)
        self._sent_items -= size
        error = answer.exception()
        why = str(error) if error is not None else answer.result()
        self.healthy = why is None
        if done.done():
            return
        if why is None:
            done.set_result(None)
        else:
            # The hub counted and logged what its recorder lost; a lost line is counted here.
            if error is not None:
                self._metrics.events_dropped.inc(size)
                log.error("cannot hand %d open/click events to the main process: %s", size, why)
            done.set_exception(EventWriteError(why))
            done.exception()  # marked retrieved: waiters may all be gone


async def report_counts(line: Line, metrics: Metrics) -> None:
    """Send this worker's counts to the hub every `METRICS_EVERY` seconds (a task)."""
    while True:
        line.tell(COUNTS, metrics.snapshot())
        await asyncio.sleep(METRICS_EVERY)


# --- the hub's side --------------------------------------------------------------------------


@dataclass(slots=True)
class Hub:
    """What the main HTTP process answers its workers from."""

    recorder: Recorder
    limiter: RateLimiter
    counts: ClientCounts
    metrics: Metrics
    health: HealthReport

    def end(self, worker: int) -> HubEnd:
        """The protocol for the hub's end of `worker`'s line."""
        return HubEnd(self, worker)

    def gone(self, worker: int) -> None:
        """`worker`'s process is gone: its connections are closed, its counts kept."""
        self.counts.forget(worker)
        self.metrics.retire(worker)


class HubEnd(asyncio.Protocol):
    """The hub's end of one worker's line."""

    def __init__(self, hub: Hub, worker: int) -> None:
        self._hub = hub
        self._worker = worker
        self._frames = Frames()
        self._transport: asyncio.WriteTransport | None = None
        self._checks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        # True once the worker listens; False if its line closed before.
        self.listening: asyncio.Future[bool] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self._transport = transport

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        for task in self._checks:
            task.cancel()
        if not self.listening.done():
            self.listening.set_result(False)
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        hub, worker = self._hub, self._worker
        for kind, asked_id, *args in self._frames.feed(data):
            if kind == EVENTS:
                committed = hub.recorder.add_batch(args[0])
                committed.add_done_callback(functools.partial(self._committed, asked_id))
            elif kind == ADMIT:
                self._answer(asked_id, hub.counts.admit(args[0], worker))
            elif kind == RELEASE:
                hub.counts.release(args[0], worker)
            elif kind == TAKE:
                self._answer(asked_id, hub.limiter.take(args[0]))
            elif kind == COUNTS:
                hub.metrics.include(worker, args[0])
            elif kind == RENDER:
                self._answer(asked_id, hub.metrics.render())
            elif kind == LISTENING:
                if not self.listening.done():
                    self.listening.set_result(True)
            elif kind == HEALTH:
                task = asyncio.create_task(self._health(asked_id))
                self._checks.add(task)
                task.add_done_callback(self._checks.discard)
            else:
                log.error("HTTP worker %d asked for %r: not a thing it asks", worker, kind)

    def _answer(self, asked_id: int, answer: object) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(frame((asked_id, answer)))

    def _committed(self, asked_id: int, done: asyncio.Future[None]) -> None:
        error = EventWriteError("cancelled") if done.cancelled() else done.exception()
        self._answer(asked_id, None if error is None else str(error) or type(error).__name__)

    async def _health(self, asked_id: int) -> None:
        try:
            report = await self._hub.health()
        except Exception as exc:
            log.exception("health check for an HTTP worker failed")
            report = (503, f"health check failed: {type(exc).__name__}\n")
        self._answer(asked_id, report)
