"""Delivery in child processes, so other cores rewrite and send while this one receives.

Each child owns a share of the spool (a `Partition` by queue id), so no two send the same
message. The parent wakes the children through pipes after each accepted message; a child
stops when told to (SIGTERM/SIGINT) or when its pipe closes because the parent is gone, and
the parent restarts a child that dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import resource
import signal
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from .._malloc import limit_arenas, return_big_buffers
from ..logs import LogFormat, setup_logging
from ..spool import Partition
from ..spool.state import DirLock
from .guard import EXIT_STOPPED_WORK

if TYPE_CHECKING:
    from multiprocessing.context import SpawnContext
    from multiprocessing.process import BaseProcess

    from ..settings import Settings

log = logging.getLogger("optout.serve")

RESTART_DELAY = 1.0
STOP_TIMEOUT = 60.0


def _child_main(
    settings: Settings, log_format: LogFormat, wakeups: Connection, partition: Partition
) -> None:
    setup_logging(log_format)
    return_big_buffers()
    limit = settings.delivery.memory_limit
    if limit:
        # Few malloc arenas: each reserves 64 MiB of address space, which a limit counts.
        limit_arenas(2)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    asyncio.run(_run_child(settings, wakeups, partition))


async def _run_child(settings: Settings, wakeups: Connection, partition: Partition) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # Held while this process lives: a serve started after its parent died waits for it.
    lock = DirLock.delivery(settings.storage.dir, exclusive=False, within=STOP_TIMEOUT)
    try:
        await _deliver_until_stopped(settings, wakeups, partition, stop)
    finally:
        if lock is not None:
            lock.release()


async def _deliver_until_stopped(
    settings: Settings, wakeups: Connection, partition: Partition, stop: asyncio.Event
) -> None:
    from .runtime import DeliveryRuntime  # here: the child imports the wiring, not the reverse

    loop = asyncio.get_running_loop()
    async with DeliveryRuntime(settings, partition=partition) as runtime:

        def woken() -> None:
            try:
                data = os.read(wakeups.fileno(), 4096)
            except BlockingIOError:
                return
            if not data:  # the parent is gone: finish what is in flight and leave
                loop.remove_reader(wakeups.fileno())
                stop.set()
                return
            runtime.worker.notify()

        os.set_blocking(wakeups.fileno(), False)
        loop.add_reader(wakeups.fileno(), woken)
        await stop.wait()
        loop.remove_reader(wakeups.fileno())


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Child:
    """One delivery process and the pipe that wakes it."""

    def __init__(self, context: SpawnContext, partition: Partition) -> None:
        self.partition = partition
        self._context = context
        self.process: BaseProcess | None = None
        self._send: Connection | None = None

    def spawn(self, settings: Settings, log_format: LogFormat) -> None:
        receive, send = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_child_main,
            args=(settings, log_format, receive, self.partition),
            name=f"optout-relay-delivery-{self.partition.index}",
        )
        process.start()
        receive.close()
        os.set_blocking(send.fileno(), False)
        self._send, self.process = send, process

    def wake(self) -> None:
        # A full pipe already holds a wake-up; the child drains it all at once.
        if self._send is not None:
            with contextlib.suppress(BlockingIOError, BrokenPipeError, OSError):
                os.write(self._send.fileno(), b"\x01")

    def close_pipe(self) -> None:
        if self._send is not None:
            self._send.close()
            self._send = None


class DeliveryProcess:
    """Supervises the delivery children: starts, wakes, restarts and stops them."""

    def __init__(self, settings: Settings, log_format: LogFormat) -> None:
        self._settings = settings
        self._log_format = log_format
        context = multiprocessing.get_context("spawn")
        count = settings.delivery.processes
        self._children = [_Child(context, Partition(i, count)) for i in range(count)]
        self._stopping = False
        self._watches: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for child in self._children:
            child.spawn(self._settings, self._log_format)
            self._watches.append(
                asyncio.create_task(self._supervise(child), name="delivery-supervisor")
            )

    def notify(self) -> None:
        for child in self._children:
            child.wake()

    @property
    def pids(self) -> list[int]:
        """The delivery processes running now (for an operator's or a test's supervisor)."""
        return [
            c.process.pid
            for c in self._children
            if c.process is not None and c.process.pid is not None and c.process.is_alive()
        ]

    async def _supervise(self, child: _Child) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            process = child.process
            assert process is not None
            ended: asyncio.Future[None] = loop.create_future()
            loop.add_reader(process.sentinel, _resolve, ended)
            try:
                await ended
            finally:
                loop.remove_reader(process.sentinel)
            child.close_pipe()
            # A stop signalled to the whole process group (Ctrl-C, systemd) may reach a
            # child before the relay has begun to stop: give it a moment to say so. A child
            # that ended itself over a message, or was killed (out of memory), is replaced
            # at once: mail waits while there is none.
            if process.exitcode not in (EXIT_STOPPED_WORK, -signal.SIGKILL):
                await asyncio.sleep(RESTART_DELAY)
            if self._stopping:
                return
            log.error(
                "delivery process %d exited with %s; restarting",
                child.partition.index,
                process.exitcode,
            )
            while not self._stopping:
                try:
                    child.spawn(self._settings, self._log_format)
                    break
                except OSError as exc:  # out of processes or descriptors: try again
                    log.error("cannot start delivery process %d: %s", child.partition.index, exc)
                    await asyncio.sleep(RESTART_DELAY)

    def expect_stop(self) -> None:
        """The relay is stopping: a child that exits now is not restarted."""
        self._stopping = True

    async def stop(self) -> None:
        """Ask every child to finish its in-flight copies, and wait for them."""
        self._stopping = True
        running = [c.process for c in self._children if c.process and c.process.is_alive()]
        for process in running:
            process.terminate()
        for process in running:
            await asyncio.to_thread(process.join, STOP_TIMEOUT)
            if process.is_alive():
                log.error("delivery process did not stop in %.0f s; killing it", STOP_TIMEOUT)
                process.kill()
                await asyncio.to_thread(process.join)
        for child in self._children:
            child.close_pipe()
        for watch in self._watches:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
