"""Open and click events resolved and written in a child process, so that the app's event
loop only answers requests while a second core checks tokens, gives verdicts and writes.

The app's side, `EventProcess` (a `Recorder`), appends what each request saw to a list;
at the end of that turn of the event loop, whatever gathered goes as one numbered batch over
a socket pair (a plain callback writing to the transport, no task), and each batch is kept
until the child acknowledges it; acknowledgements are read in the transport's callback.
The child (`_serve`) reads batches as they come; in each round it resolves every batch that
has arrived (token check, verdict, event: the app's own `resolve_fetch`) and writes them all
in one transaction, then acknowledges them together with the counts the app adds to its
metrics. A round holds whatever arrived while the previous one was being committed, so
commits grow with the load. The child runs at a lower priority: when cores are short,
answering requests comes first.

At least once: a child that dies is started again after a short delay and gets every batch
not yet acknowledged (a batch committed whose acknowledgement was lost is written twice).
A clean stop waits until everything is acknowledged, then closes the socket; the child
leaves once it has read the end. Nothing that cannot be pickled crosses: the child gets an
`EventProcessSpec` when it is spawned, then only batches of plain tuples and events.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import multiprocessing
import os
import pickle
import signal
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from suppression.engine import EngineSpec

from .aggregate import AggregateHit
from .beacons import Beacons, BeaconSpec, resolve_fetch
from .errors import EventProcessError, EventWriteError
from .events import MIGRATIONS, Event, EventStore
from .frames import LENGTH, Frames, frame
from .metrics import Metrics
from .pending import BufferedFetches, PendingEvents
from .recorder import (
    MAX_BATCH,
    Forwarding,
    Pending,
    Resolver,
    add_batch,
    resolve_items,
)

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

log = logging.getLogger("optout.http")

# Batches sent and not yet acknowledged, at most: while the child commits one round, the next
# batch is already there, and requests gather into the one after. So a batch (a pickle and a
# write to the socket) costs this loop once per commit, not once per turn of the loop.
SEND_WINDOW = 2
# When the cores are all busy, the scheduler favours answering requests (about 9:1) over
# writing their events: the event process has slack (a slower round is a bigger one, and
# cheaper per event), while a preempted HTTP process answers late.
NICENESS = 10
RESTART_DELAY = 0.5
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class EventProcessSpec:
    """All the event process needs, picklable: where the events go, and how they are made."""

    database: EngineSpec
    beacons: BeaconSpec
    # How the child logs (the app's format); None: plain text to stderr.
    setup_logging: Callable[[], object] | None = None
    # With a shared store: the local file where events wait while it is unreachable
    # (tracking/pending.py); None: a write that fails loses its events, as before.
    pending: Path | None = None


@dataclass(slots=True)
class Counts:
    """What one round counted in the child (a `Tally`), for the app to add to its metrics."""

    opens: dict[tuple[bool, str], int] = field(default_factory=dict)
    bad_tokens: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    written: int = 0
    limited_: dict[str, int] = field(default_factory=dict)  # by route (`limited` counts)

    def open(self, machine: bool, reason: str, count: int = 1) -> None:
        key = (machine, reason)
        self.opens[key] = self.opens.get(key, 0) + count

    def bad_token(self, route: str, count: int = 1) -> None:
        self.bad_tokens[route] = self.bad_tokens.get(route, 0) + count

    def error(self, where: str, count: int = 1) -> None:
        self.errors[where] = self.errors.get(where, 0) + count

    def limited(self, route: str, count: int = 1) -> None:
        self.limited_[route] = self.limited_.get(route, 0) + count

    def add_to(self, metrics: Metrics) -> None:
        for (machine, reason), count in self.opens.items():
            metrics.open(machine, reason, count)
        for route, count in self.bad_tokens.items():
            metrics.bad_token(route, count)
        for where, count in self.errors.items():
            metrics.error(where, count)
        for route, count in self.limited_.items():
            metrics.limited(route, count)
        if self.written:
            metrics.written(self.written)

    def wire(self) -> _WireCounts:
        return (self.opens, self.bad_tokens, self.errors, self.written, self.limited_)

    @classmethod
    def unwire(cls, wire: _WireCounts) -> Counts:
        return cls(*wire)


@dataclass(frozen=True, slots=True)
class _Ready:
    """The child's first message: its database is open (error: why it is not)."""

    error: str | None = None


# Batches done: their ids, what the round counted (`Counts.wire`), and None if committed, else
# why they were lost (as a failed in-process write is). A plain tuple of builtins: one comes
# per round, and pickle reads it in C, where a dataclass costs Python calls to rebuild.
_WireCounts = tuple[
    dict[tuple[bool, str], int], dict[str, int], dict[str, int], int, dict[str, int]
]
_Ack = tuple[tuple[int, ...], _WireCounts, str | None]


# --- frames (tracking.frames) --------------------------------------------------------------


async def _read_message(reader: asyncio.StreamReader) -> Any:
    """The next message, or None once the other side has closed its end (or died)."""
    try:
        head = await reader.readexactly(LENGTH.size)
        data = await reader.readexactly(LENGTH.unpack(head)[0])
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    # Only our own parent or child holds the other end of this socket pair.
    return pickle.loads(data)  # noqa: S301


# --- the app's side --------------------------------------------------------------------------


@dataclass(slots=True)
class _Sent:
    """A batch sent and not yet acknowledged: resent as it is to a restarted child."""

    frame: bytes
    size: int
    done: asyncio.Future[None]


class _Channel(asyncio.Protocol):
    """The app's end of the socket pair. Frames are read as they arrive, in the transport's
    callback, and handed to `on_message`: no reader task to wake and no stream coroutines
    per acknowledgement (a round trip costs this loop once per batch, so it is kept lean)."""

    def __init__(self, on_message: Callable[[Any], None]) -> None:
        loop = asyncio.get_running_loop()
        self.on_message = on_message
        self.first: asyncio.Future[Any] = loop.create_future()  # the child's `_Ready`
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.WriteTransport | None = None
        self._frames = Frames()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for message in self._frames.feed(data):
            if not self.first.done():
                self.first.set_result(message)
            else:
                self.on_message(message)

    def eof_received(self) -> bool:
        return False  # the child has left: close our end too

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.first.done():
            self.first.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)


@dataclass(slots=True)
class _Child:
    process: BaseProcess
    channel: _Channel
    transport: asyncio.WriteTransport


class EventProcess(Forwarding):
    """Records open and click events through a child process (see the module's doc)."""

    def __init__(self, spec: EventProcessSpec, metrics: Metrics) -> None:
        super().__init__(metrics, SEND_WINDOW)
        self._spec = spec
        self._context = multiprocessing.get_context("spawn")
        self._sent: dict[int, _Sent] = {}  # by batch id, oldest first
        self._next_id = 0
        self._eof_sent = False
        self._child: _Child | None = None  # while one is running and ready
        self._writes_ok = True
        self._stopping = False  # the child is told to leave and not restarted
        self._stop_expected = False  # the relay is stopping (`expect_stop`)
        self._task: asyncio.Task[None] | None = None
        metrics.watch_buffer(lambda: self.waiting)

    @property
    def healthy(self) -> bool:
        """False while the child is down or its last write failed."""
        return self._child is not None and self._writes_ok

    @property
    def pid(self) -> int | None:
        return self._child.process.pid if self._child is not None else None

    async def start(self) -> None:
        """Spawn the child and wait until its database is open (EventProcessError if not)."""
        self._child = await self._spawn()
        self._task = asyncio.create_task(self._supervise(), name="tracking-event-process")

    def add_batch(self, items: Sequence[Pending]) -> asyncio.Future[None]:
        return add_batch(self, self._gathering, items)

    async def flush(self) -> None:
        waiting = [sent.done for sent in self._sent.values()]
        if self._gathering.items:
            waiting.append(self._gathering.committed())
        for future in waiting:
            with contextlib.suppress(Exception):
                await asyncio.shield(future)

    def expect_stop(self) -> None:
        """The relay is stopping: a stop sent to every process at once (systemd, Ctrl-C)
        may end the child before `close`, and that is no failure."""
        self._stop_expected = True

    async def close(self) -> None:
        """Have everything queued written, then let the child go (killed if it will not)."""
        if self._task is None:
            return
        self._closing = True
        try:
            await asyncio.wait_for(self.flush(), STOP_TIMEOUT)
        except TimeoutError:
            log.error("open/click events still unwritten after %.0f s", STOP_TIMEOUT)
        self._stopping = True
        self._send()  # with nothing left to send, it closes our end: the child leaves
        try:
            await asyncio.wait_for(asyncio.shield(self._task), STOP_TIMEOUT)
        except TimeoutError:
            log.error("the event process did not stop in %.0f s; killing it", STOP_TIMEOUT)
            if self._child is not None:
                self._child.process.kill()
            await self._task
        self._task = None
        self._abandon()

    async def _spawn(self) -> _Child:
        ours, theirs = socket.socketpair()
        process = self._context.Process(
            target=_child_main,
            args=(self._spec, theirs),
            name="optout-relay-events",
            daemon=True,  # at exit, multiprocessing stops it (SIGTERM: it writes what it has)
        )
        try:
            # A fork and exec and a small write to the new process: a few milliseconds, and
            # a thread could not be cancelled half-way through handing over `theirs`.
            process.start()
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        loop = asyncio.get_running_loop()
        try:
            transport, channel = await loop.create_unix_connection(
                lambda: _Channel(self._acknowledged), sock=ours
            )
        except BaseException:
            ours.close()
            await _reaped(process, kill=True)
            raise
        try:
            ready = await asyncio.wait_for(asyncio.shield(channel.first), START_TIMEOUT)
        except BaseException:
            transport.close()
            await _reaped(process, kill=True)
            raise
        if not isinstance(ready, _Ready) or ready.error is not None:
            transport.close()
            await _reaped(process, kill=True)
            why = ready.error if isinstance(ready, _Ready) else "it exited"
            raise EventProcessError(f"the event process did not start: {why}")
        return _Child(process, channel, transport)

    async def _supervise(self) -> None:
        """Run the child; restart it when it dies, until the recorder stops."""
        while True:
            if self._child is not None:
                try:
                    exitcode = await self._session(self._child)
                except Exception:  # a bug here must not leave the events without a writer
                    log.exception("event process session failed")
                    exitcode = None
                # A stop signalled to the whole process group (systemd) reaches the child
                # first: wait before calling its exit a failure.
                await asyncio.sleep(RESTART_DELAY)
                if self._stopping:
                    return
                waiting = len(self._gathering) + self._sent_items
                if self._stop_expected:
                    # The relay is stopping (its HTTP workers still hand over what they
                    # hold): a new child only writes what comes, and is no failure.
                    log.info("the event process left during the stop; starting it again")
                else:
                    log.error(
                        "the event process exited with %s; restarting it (%d events waiting)",
                        exitcode,
                        waiting,
                    )
            else:
                await asyncio.sleep(RESTART_DELAY)
            if self._stopping:
                return
            try:
                self._child = await self._spawn()
            except Exception as exc:  # out of processes or descriptors: try again
                log.error("cannot start the event process: %s", exc)

    async def _session(self, child: _Child) -> int | None:
        """One child's life: resend what the last one left unacknowledged, then send (as
        requests add events and acknowledgements open the window) until it closes its end.
        Its exit code."""
        self._writes_ok = True  # until this child says otherwise
        for sent in self._sent.values():
            child.transport.write(sent.frame)
        self._eof_sent = False
        self._send()
        try:
            await child.channel.closed
        finally:
            self._child = None
            child.transport.close()
            exitcode = await _reaped(child.process, kill=False, seconds=STOP_TIMEOUT)
        return exitcode

    def _send(self) -> None:
        """Send what has gathered, as batches, while the window has room; once stopping and
        with nothing left, close our end. No wait for the socket to drain: the window bounds
        what can be in flight to SEND_WINDOW batches."""
        self._send_due = False
        child = self._child
        if child is None or self._eof_sent:
            return  # the next child's session sends it
        transport = child.transport
        if transport.is_closing():
            return
        while self._gathering.items and len(self._sent) < SEND_WINDOW:
            sent = self._cut_batch()
            if sent is not None:
                transport.write(sent.frame)
        if self._stopping and not self._gathering.items:
            self._eof_sent = True
            transport.write_eof()

    def _cut_batch(self) -> _Sent | None:
        """The next batch from the pending events, numbered and pickled (None if it could
        not be)."""
        items, done = self._gathering.take(MAX_BATCH)
        batch_id, self._next_id = self._next_id, self._next_id + 1
        try:
            data = frame((batch_id, items))
        except Exception as exc:  # an item that cannot be pickled: a bug, not the child's
            log.exception("cannot send %d open/click events", len(items))
            self._metrics.error("event-send")
            self._metrics.events_dropped.inc(len(items))
            _settle(done, EventWriteError(f"cannot send: {exc}"))
            return None
        sent = _Sent(data, len(items), done)
        self._sent[batch_id] = sent
        self._sent_items += sent.size
        return sent

    def _acknowledged(self, ack: _Ack) -> None:
        batches, counts, error = ack
        Counts.unwire(counts).add_to(self._metrics)
        self._writes_ok = error is None
        lost = 0
        for batch_id in batches:
            sent = self._sent.pop(batch_id, None)
            if sent is None:
                continue
            self._sent_items -= sent.size
            if error is None:
                _settle(sent.done, None)
            else:
                lost += sent.size
                _settle(sent.done, EventWriteError(error))
        if error is not None:
            # The events are lost; the pixels were answered. Say so, loudly and countably.
            self._metrics.events_dropped.inc(lost)
            log.error("cannot record %d open/click events: %s", lost, error)
        if self._gathering.items or self._stopping:
            self._send()  # the window has room again

    def _abandon(self) -> None:
        """After the stop: whatever is still unwritten is lost, and counted."""
        if not (self._gathering.items or self._sent):
            return
        error = EventWriteError("the event process stopped before writing the event")
        for sent in self._sent.values():
            _settle(sent.done, error)
        gathered, waiting = self._gathering.abandon()
        if waiting is not None:
            _settle(waiting, error)
        lost = gathered + self._sent_items
        self._sent, self._sent_items = {}, 0
        self._metrics.events_dropped.inc(lost)
        log.error("%d open/click events were not written before the stop", lost)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
        future.exception()  # marked retrieved: its waiters may all be gone


async def _reaped(
    process: BaseProcess, *, kill: bool, seconds: float = START_TIMEOUT
) -> int | None:
    """Wait for the child to exit (killed if told to, or after `seconds`) and release it;
    its exit code. Joined in a thread: the loop goes on meanwhile."""
    if kill:
        process.kill()
    await asyncio.to_thread(process.join, seconds)
    if process.exitcode is None:
        log.error("the event process did not exit in %.0f s; killing it", seconds)
        process.kill()
        await asyncio.to_thread(process.join)
    exitcode = process.exitcode
    process.close()
    return exitcode


# --- the child's side ------------------------------------------------------------------------


def _child_main(spec: EventProcessSpec, sock: socket.socket) -> None:
    # Ctrl-C reaches the whole process group: the app decides when this process stops (it
    # closes the socket). SIGTERM, from an operator or multiprocessing at exit, is obeyed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(NICENESS)
    if spec.setup_logging is not None:
        spec.setup_logging()
    else:
        logging.basicConfig(
            format="%(asctime)s %(levelname)s optout-relay event process: %(message)s"
        )
    asyncio.run(_serve(spec, sock))


async def _serve(spec: EventProcessSpec, sock: socket.socket) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    try:
        database = await spec.database.open(MIGRATIONS)
    except Exception as exc:
        where = spec.database.path or "the store database"
        writer.write(frame(_Ready(f"cannot open {where}: {exc}")))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
        return
    pending: PendingEvents | None = None
    drain: asyncio.Task[None] | None = None
    try:
        beacons = spec.beacons.build()
        store: EventStore | BufferedFetches = EventStore(database)
        if spec.pending is not None:
            pending = await PendingEvents.open(spec.pending)
            buffered = BufferedFetches(EventStore(database), pending)
            drain = asyncio.create_task(buffered.drain(beacons.repeat_window))
            store = buffered
        writer.write(frame(_Ready()))
        inbox = _Inbox(reader)
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, inbox.stop)
        await _write_rounds(inbox, store, writer, beacons)
    finally:
        writer.close()
        if drain is not None:
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)
        if pending is not None:
            await pending.close()
        await database.close()


class _Inbox:
    """Batches as they arrive, read while the previous round is being written."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._batches: list[tuple[int, list[Any]]] = []
        self._ended = False
        self._arrived = asyncio.Event()
        self._reading = asyncio.create_task(self._read(reader), name="event-process-reader")

    def stop(self) -> None:
        """Read no more: what was read is still written (the rest is resent to the next)."""
        self._reading.cancel()

    async def take(self) -> list[tuple[int, list[Any]]] | None:
        """Every batch that arrived since the last call (waiting for one); None at the end."""
        while not self._batches:
            if self._ended:
                return None
            await self._arrived.wait()
            self._arrived.clear()
        taken, self._batches = self._batches, []
        return taken

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while (message := await _read_message(reader)) is not None:
                self._batches.append(message)
                self._arrived.set()
        finally:
            self._ended = True
            self._arrived.set()


async def _write_rounds(
    inbox: _Inbox,
    store: EventStore | BufferedFetches,
    writer: asyncio.StreamWriter,
    beacons: Beacons,
) -> None:
    """Resolve and write, in one transaction, every batch that arrived during the last
    round; then acknowledge them."""
    while (batches := await inbox.take()) is not None:
        counts = Counts()
        resolve: Resolver = functools.partial(resolve_fetch, beacons, counts)
        items = [item for _, batch in batches for item in batch]
        error: str | None = None
        try:
            events = resolve_items(items, resolve, counts)
            await _write(store, events, beacons)
        except Exception as exc:
            counts.error("event-write")
            error = str(exc) or type(exc).__name__
        else:
            counts.written = len(events)
        ack: _Ack = (tuple(batch_id for batch_id, _ in batches), counts.wire(), error)
        writer.write(frame(ack))
        try:
            await writer.drain()
        except ConnectionError:
            return  # the app is gone; what it did not hear of, it cannot resend either


async def _write(
    store: EventStore | BufferedFetches,
    events: Sequence[Event | AggregateHit],
    beacons: Beacons,
) -> None:
    if events:
        await store.record_fetches(events, beacons.repeat_window, beacons.counting)
