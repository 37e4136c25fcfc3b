"""The delivery worker in a child process, so the second core rewrites and sends while the
first receives. The parent wakes it through a pipe after each accepted message; the child
stops when told to (SIGTERM/SIGINT) or when the pipe closes because the parent is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from .logs import LogFormat, setup_logging

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from .config import Settings

log = logging.getLogger("optout.serve")

RESTART_DELAY = 1.0
STOP_TIMEOUT = 60.0


def _child_main(settings: Settings, log_format: LogFormat, wakeups: Connection) -> None:
    setup_logging(log_format)
    asyncio.run(_run_child(settings, wakeups))


async def _run_child(settings: Settings, wakeups: Connection) -> None:
    from .app import DeliveryRuntime  # here: the child imports the wiring, not the reverse

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with DeliveryRuntime(settings) as runtime:

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


class DeliveryProcess:
    """Supervises the child: starts it, wakes it, restarts it if it dies, stops it."""

    def __init__(self, settings: Settings, log_format: LogFormat) -> None:
        self._settings = settings
        self._log_format = log_format
        self._context = multiprocessing.get_context("spawn")
        self._process: BaseProcess | None = None
        self._send_fd = -1
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._spawn()
        self._watch = asyncio.create_task(self._supervise(), name="delivery-supervisor")

    def _spawn(self) -> None:
        receive, send = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_child_main,
            args=(self._settings, self._log_format, receive),
            name="optout-relay-delivery",
        )
        process.start()
        receive.close()
        self._send = send
        self._send_fd = send.fileno()
        os.set_blocking(self._send_fd, False)
        self._process = process

    def notify(self) -> None:
        # A full pipe already holds a wake-up; the child drains it all at once.
        with contextlib.suppress(BlockingIOError, BrokenPipeError, OSError):
            os.write(self._send_fd, b"\x01")

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            process = self._process
            assert process is not None
            ended: asyncio.Future[None] = loop.create_future()
            loop.add_reader(process.sentinel, _resolve, ended)
            try:
                await ended
            finally:
                loop.remove_reader(process.sentinel)
            if self._stopping:
                return
            log.error("delivery process exited with %s; restarting", process.exitcode)
            self._send.close()
            await asyncio.sleep(RESTART_DELAY)
            if not self._stopping:
                self._spawn()

    async def stop(self) -> None:
        """Ask the child to finish in-flight copies and wait for it."""
        self._stopping = True
        process = self._process
        if process is not None and process.is_alive():
            process.terminate()
            await asyncio.to_thread(process.join, STOP_TIMEOUT)
            if process.is_alive():
                log.error("delivery process did not stop in %.0f s; killing it", STOP_TIMEOUT)
                process.kill()
                await asyncio.to_thread(process.join)
        self._send.close()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
