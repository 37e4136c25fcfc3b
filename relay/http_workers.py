"""More HTTP processes beside the main one (`http.processes`), so that a campaign's burst
of pixel fetches is answered on more than one core.

Each worker runs the tracking app behind its own listener on the main listener's addresses
(SO_REUSEPORT: the kernel spreads new connections over the processes) and leans on the main
HTTP process for what must be one across them (tracking.hub): the event recorder, the
per-client connection caps and POST rate limit, /healthz and /metrics. The main process
restarts a worker that dies, and stops them all, each writing what it holds, before its own
listener stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tracking.aggregate import use_digest_key
from tracking.hub import COUNTS, LISTENING, Hub, HubEnd, Line, report_counts
from tracking.listener import ConnectionCaps, HttpListener
from tracking.state import TRACKING

from .logs import LogFormat, setup_logging

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from .settings import Settings

log = logging.getLogger("optout.serve")

RESTART_DELAY = 1.0
START_TIMEOUT = 60.0
MAX_RESTART_DELAY = 60.0
STOP_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker process is given when it is spawned (picklable)."""

    settings: Settings
    log_format: LogFormat
    addresses: list[tuple[str, int]]
    caps: ConnectionCaps
    digest_key: bytes  # tracking.aggregate's, the main process's own (memory only)


class HttpWorkers:
    """The worker HTTP processes of one relay (see the module's doc)."""

    def __init__(self, spec: WorkerSpec, count: int, hub: Hub) -> None:
        self._spec = spec
        self._hub = hub
        self._context = multiprocessing.get_context("spawn")
        self._stopping = False
        self._stopped = asyncio.Event()
        self._running: dict[int, tuple[BaseProcess, HubEnd]] = {}
        loop = asyncio.get_running_loop()
        self._first_starts = [loop.create_future() for _ in range(1, count)]
        self._tasks = [
            asyncio.create_task(self._supervise(worker), name=f"http-worker-{worker}")
            for worker in range(1, count)
        ]

    @property
    def pids(self) -> list[int]:
        """The workers listening now."""
        return [
            process.pid
            for process, end in self._running.values()
            if process.pid is not None and end.listening.done() and end.listening.result()
        ]

    async def started(self) -> None:
        """Return once every worker listens, or its first start failed (which is logged),
        or START_TIMEOUT passed (a store that does not answer, say): the relay goes on."""
        try:
            await asyncio.wait_for(
                asyncio.gather(*(asyncio.shield(f) for f in self._first_starts)), START_TIMEOUT
            )
        except TimeoutError:
            log.error(
                "HTTP workers not listening after %.0f s; going on without them", START_TIMEOUT
            )

    def expect_stop(self) -> None:
        """The relay is stopping: a worker that leaves now (a stop sent to every process)
        is not restarted."""
        self._stopping = True
        self._stopped.set()

    async def stop(self) -> None:
        """Let each worker stop: it closes its listener, hands over the events it holds,
        and leaves (killed after STOP_TIMEOUT)."""
        self.expect_stop()
        for process, _ in self._running.values():
            if process.is_alive():
                process.terminate()
        _, late = await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT)
        if late:  # stuck (its loop blocked, say): it would hold the stop for ever
            for process, _ in self._running.values():
                if process.is_alive():
                    log.error("HTTP worker pid %s did not stop; killing it", process.pid)
                    process.kill()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _supervise(self, worker: int) -> None:
        delay = RESTART_DELAY
        while not self._stopping:
            try:
                process, end = await self._spawn(worker)
            except Exception as exc:  # out of processes or descriptors: try again
                log.error("cannot start HTTP worker %d: %s", worker, exc)
                first = self._first_starts[worker - 1]
                if not first.done():
                    first.set_result(None)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RESTART_DELAY)
                continue
            self._running[worker] = (process, end)
            if self._stopping:  # spawned as `stop` told the others to leave
                process.terminate()
            first = self._first_starts[worker - 1]
            if not first.done():
                listening = await end.listening
                first.set_result(None)
                if listening:
                    log.debug("HTTP worker %d (pid %s) listening", worker, process.pid)
            exitcode = await _reaped(process, end, lambda: self._stopping)
            del self._running[worker]
            self._hub.gone(worker)
            # A stop signalled to the whole process group (systemd) reaches the worker
            # first: wait before calling its exit a failure.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), RESTART_DELAY)
            if self._stopping:
                return
            # One that never listened (its store unreachable, say) is retried ever later.
            delay = RESTART_DELAY if end.listening.result() else min(delay * 2, MAX_RESTART_DELAY)
            log.error("HTTP worker %d exited with %s; restarting it", worker, exitcode)
            await asyncio.sleep(delay - RESTART_DELAY)

    async def _spawn(self, worker: int) -> tuple[BaseProcess, HubEnd]:
        ours, theirs = socket.socketpair()
        process = self._context.Process(
            target=_worker_main,
            args=(self._spec, theirs, worker),
            name=f"optout-relay-http-{worker}",
            daemon=True,
        )
        try:
            process.start()
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        _, end = await asyncio.get_running_loop().create_unix_connection(
            lambda: self._hub.end(worker), sock=ours
        )
        return process, end


async def _reaped(process: BaseProcess, end: HubEnd, stopping: Callable[[], bool]) -> int | None:
    """Wait until the worker's line closes (it left, or died), then for its exit code."""
    await end.closed
    await asyncio.to_thread(process.join, STOP_TIMEOUT if stopping() else 5.0)
    if process.exitcode is None:
        log.error("HTTP worker pid %s did not exit; killing it", process.pid)
        process.kill()
        await asyncio.to_thread(process.join)
    exitcode = process.exitcode
    process.close()
    return exitcode


# --- the worker process ----------------------------------------------------------------------


def _worker_main(spec: WorkerSpec, sock: socket.socket, worker: int) -> None:
    # Ctrl-C reaches the whole process group: the main process decides when this one stops;
    # SIGHUP is the main process's (it reloads certificates), never a reason to leave.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    setup_logging(spec.log_format)
    use_digest_key(spec.digest_key)
    try:
        asyncio.run(_serve(spec, sock))
    except Exception as exc:
        log.error("HTTP worker %d stopped: %s", worker, exc)
        log.debug("HTTP worker %d stopped", worker, exc_info=exc)
        raise SystemExit(1) from None


async def _serve(spec: WorkerSpec, sock: socket.socket) -> None:
    from aiohttp import web

    from .app import tracking_app  # here: the worker imports the wiring, not the reverse
    from .stores import Stores, tracking_urls

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    transport, line = await loop.create_unix_connection(Line, sock=sock)
    settings = spec.settings
    async with Stores(settings, create=False) as stores:
        app = tracking_app(
            settings, stores, tracking_urls(settings, stores.signer()), spec.log_format, hub=line
        )
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=spec.caps.header_timeout)
        await runner.setup()
        assert runner.server is not None
        listener = HttpListener(runner.server, spec.caps, admission=line)
        metrics = app[TRACKING].metrics
        metrics.watch_listener(listener.stats)
        reporting = asyncio.create_task(report_counts(line, metrics))
        try:
            await listener.start_on(spec.addresses)
            line.tell(LISTENING)
            gone = asyncio.ensure_future(line.closed)
            waiting = asyncio.ensure_future(stop.wait())
            await asyncio.wait((gone, waiting), return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            waiting.cancel()
        finally:
            listener.close()
            await runner.cleanup()  # its recorder hands over what it holds
            reporting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporting
            line.tell(COUNTS, metrics.snapshot())
            transport.close()
