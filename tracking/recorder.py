"""Open and click events, batched into one database write per round.

A pixel request only appends what it saw to a list and answers. One background task takes
whatever has gathered, works out the events (token check and verdict: `resolve`, in one
tight loop, off the request's path) and writes them in one transaction
(`EventStore.record(*batch)`, one `Database.write`, one fsync), then the next. No timer:
under light load a batch is one event written at once; under heavy load the batch is
whatever arrived while the previous commit was being made, so the cost of a commit is
shared by many opens and the request path never waits for the disk.

Durability: an event is on disk one commit after it was answered (a few milliseconds; more
while the database is slow, up to MAX_PENDING events, past which they are counted as
dropped). A crash or power cut can lose the events answered in that window; a clean stop
writes them all (`close`). With `add_and_wait` a request is answered only after its event
is committed: nothing answered is ever lost, at the price of waiting for the next commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence, Sized
from datetime import timedelta
from typing import Any, Protocol

from .aggregate import AggregateHit, Counting
from .beacons import DEFAULT_REPEAT_WINDOW
from .errors import EventWriteError
from .events import Event, EventStore
from .metrics import Metrics, Tally

log = logging.getLogger("optout.http")

MAX_BATCH = 5000
RESOLVE_CHUNK = 500  # items resolved between two turns of the event loop (~10 ms)
MAX_PENDING = 100_000  # held while the database is slow; beyond that, counted and lost
# Waiting events past which a request is answered only once its event is written (for at
# most PACE_WAIT seconds): when requests come faster than they can be written (more HTTP
# processes than the writer keeps up with), the writer sets the pace and nothing answered
# is lost; a database that does not answer at all still cannot hold the pixel for long.
HIGH_WATER = 20_000
PACE_WAIT = 1.0

# What a request hands over: an event (or an aggregate hit), or the raw facts `resolve`
# turns into one (or None).
Pending = Any
Resolver = Callable[[Pending], Event | AggregateHit | None]


class Recorder(Protocol):
    """Where handlers hand their open and click events: an `EventRecorder` on the app's event
    loop, or an `EventProcess` (event_process.py) resolving and writing in a child process."""

    @property
    def healthy(self) -> bool:
        """False while events cannot be written (shown by /healthz)."""
        ...

    @property
    def waiting(self) -> int:
        """Events handed over and not yet written."""
        ...

    async def start(self) -> None: ...

    def add(self, item: Pending) -> bool:
        """Queue an event (or the facts of one); False if it had to be dropped."""
        ...

    async def add_and_wait(self, item: Pending) -> None:
        """Queue an event and return once it is committed (raises if it was not)."""
        ...

    def add_batch(self, items: Sequence[Pending]) -> asyncio.Future[None]:
        """Queue events (another HTTP process's: tracking.hub); the future settles once
        they are committed, or fails if they were not (or were dropped)."""
        ...

    async def flush(self) -> None:
        """Return once everything queued before the call is committed (or has failed)."""
        ...

    async def close(self) -> None:
        """Write what is queued, then stop (events offered after this are dropped)."""
        ...

    def expect_stop(self) -> None:
        """The relay is stopping; `close` follows once its other HTTP processes handed over
        what they hold."""
        ...


def _no_resolver(item: Pending) -> Event | AggregateHit | None:
    raise TypeError(f"cannot record {type(item).__name__}")


async def add_paced(recorder: Recorder, item: Pending) -> None:
    """Hand over an event; past HIGH_WATER waiting, return once it is written (or after
    PACE_WAIT seconds; it stays queued either way)."""
    if recorder.waiting < HIGH_WATER:
        recorder.add(item)
        return
    # A write that fails is counted and logged by the recorder, once for its batch.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(recorder.add_and_wait(item), PACE_WAIT)


def add_batch(
    recorder: Recorder, gathering: Gathering, items: Sequence[Pending]
) -> asyncio.Future[None]:
    """`Recorder.add_batch` for a recorder that gathers into `gathering`."""
    added = 0
    for item in items:
        added += recorder.add(item)
    if added:
        return gathering.committed()
    done = asyncio.get_running_loop().create_future()
    if items:
        done.set_exception(EventWriteError(f"{len(items)} open/click events dropped"))
        done.exception()  # marked retrieved: the caller may be gone
    else:
        done.set_result(None)
    return done


class Forwarding:
    """What a recorder that sends its events on in batches (to the event process, or to
    the main HTTP process) does per request: gather, and schedule one send per turn of the
    event loop while fewer than `_window` batches wait for their answer."""

    def __init__(self, metrics: Metrics, window: int) -> None:
        self._metrics = metrics
        self._window = window
        self._gathering = Gathering()
        self._sent: Sized = ()  # the batches sent and not yet answered (each subclass's own)
        self._sent_items = 0
        self._send_due = False  # `_send` is scheduled for this turn of the loop
        self._closing = False  # no new events taken

    @property
    def waiting(self) -> int:
        return len(self._gathering) + self._sent_items

    def add(self, item: Pending) -> bool:
        # Once per pixel request: plain attribute and list work only, no further calls.
        gathered = self._gathering.items
        if self._closing or len(gathered) + self._sent_items >= MAX_PENDING:
            self._metrics.events_dropped.inc()
            return False
        gathered.append(item)
        if not self._send_due and len(self._sent) < self._window:
            # Whatever the requests of this turn of the loop add goes as one batch.
            self._send_due = True
            asyncio.get_running_loop().call_soon(self._send)
        return True

    async def add_and_wait(self, item: Pending) -> None:
        if self.add(item):
            await asyncio.shield(self._gathering.committed())

    def _send(self) -> None:
        raise NotImplementedError


class Gathering:
    """Events handed over by requests and not yet in a batch, and the future that settles
    once all of them are committed (made only when a caller waits for it)."""

    __slots__ = ("_done", "items")

    def __init__(self) -> None:
        self.items: list[Pending] = []
        self._done: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def committed(self) -> asyncio.Future[None]:
        """Settles once everything gathered so far is committed (or has failed)."""
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
        return self._done

    def take(self, limit: int) -> tuple[list[Pending], asyncio.Future[None]]:
        """Up to `limit` items, oldest first, and the future to settle for them: the waiters'
        own when nothing is left behind, else a new one (the waiters wait for the rest)."""
        items, self.items = self.items[:limit], self.items[limit:]
        if self.items or self._done is None:
            return items, asyncio.get_running_loop().create_future()
        done, self._done = self._done, None
        return items, done

    def abandon(self) -> tuple[int, asyncio.Future[None] | None]:
        """Drop everything gathered: how many, and the waiters' future to settle, if any."""
        count, done = len(self.items), self._done
        self.items, self._done = [], None
        return count, done


def resolve_items(
    items: Sequence[Pending], resolve: Resolver, tally: Tally
) -> list[Event | AggregateHit]:
    """The events of `items`: an event (or hit) as it is, other facts through `resolve`
    (None: no event). A failure costs only its own item, counted and logged."""
    events: list[Event | AggregateHit] = []
    for item in items:
        if isinstance(item, Event | AggregateHit):
            events.append(item)
            continue
        try:
            event = resolve(item)
        except Exception:
            tally.error("event-resolve")
            log.exception("cannot make an event of %s", type(item).__name__)
            continue
        if event is not None:
            events.append(event)
    return events


class EventRecorder:
    def __init__(
        self,
        events: EventStore,
        metrics: Metrics,
        *,
        resolve: Resolver = _no_resolver,
        repeat_window: timedelta = DEFAULT_REPEAT_WINDOW,
        counting: Counting | None = None,
    ) -> None:
        """`counting`: how aggregate hits are counted (default: as a new `Counting`)."""
        self._events = events
        self._metrics = metrics
        self.resolve = resolve
        self._repeat_window = repeat_window
        self._counting = counting or Counting(repeat_window)
        self._gathering = Gathering()
        self._inflight: asyncio.Future[None] | None = None
        self._writing = 0  # events in the batch being written
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.healthy = True  # False while the last write failed (shown by /healthz)
        metrics.watch_buffer(lambda: self.waiting)

    @property
    def waiting(self) -> int:
        return len(self._gathering) + self._writing

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tracking-event-writer")

    def add(self, event: Pending) -> bool:
        """Queue an event, committed within one write round; False if it had to be dropped."""
        if len(self._gathering) >= MAX_PENDING or self._closing:
            self._metrics.events_dropped.inc()
            return False
        self._gathering.items.append(event)
        self._wake.set()
        return True

    async def add_and_wait(self, event: Pending) -> None:
        """Queue an event and return once it is committed (raises if the write failed)."""
        if self.add(event):
            await asyncio.shield(self._gathering.committed())

    def add_batch(self, items: Sequence[Pending]) -> asyncio.Future[None]:
        return add_batch(self, self._gathering, items)

    async def flush(self) -> None:
        """Return once everything queued before the call is committed (or has failed)."""
        waiting = [self._inflight] if self._inflight is not None else []
        if self._gathering.items:
            waiting.append(self._gathering.committed())
        for future in waiting:
            with contextlib.suppress(Exception):
                await asyncio.shield(future)

    def expect_stop(self) -> None:
        pass  # nothing runs apart that could end first

    async def close(self) -> None:
        """Write what is queued, then stop (events offered after this are dropped)."""
        self._closing = True
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._gathering.items:
                await self._write_one_batch()

    async def _write_one_batch(self) -> None:
        batch, done = self._gathering.take(MAX_BATCH)
        self._inflight = done
        self._writing = len(batch)
        try:
            events = await self._resolved(batch)
            if events:
                await self._events.record_fetches(events, self._repeat_window, self._counting)
        except Exception as exc:
            # The events are lost; the pixels were answered. Say so, loudly and countably.
            self.healthy = False
            self._metrics.errors.labels("event-write").inc()
            self._metrics.events_dropped.inc(len(batch))
            log.error("cannot record %d open/click events: %s", len(batch), exc)
            if not done.done():
                done.set_exception(exc)
                done.exception()  # marked retrieved: waiters may all be gone
        else:
            self.healthy = True
            self._metrics.written(len(events))
            if not done.done():
                done.set_result(None)
        finally:
            self._writing = 0
            if self._inflight is done:
                self._inflight = None

    async def _resolved(self, batch: list[Pending]) -> list[Event | AggregateHit]:
        events: list[Event | AggregateHit] = []
        for start in range(0, len(batch), RESOLVE_CHUNK):
            if start:
                await asyncio.sleep(0)  # let requests in between: no long stall of the loop
            chunk = batch[start : start + RESOLVE_CHUNK]
            events += resolve_items(chunk, self.resolve, self._metrics)
        return events
