"""Bounds on what one message may cost a delivery process, and who pays when it dies.

A message's rewrite and each of its copies' rendering run inside a *section*: its queue id
is written to a marker file before the work starts and taken out when it ends. A process
that dies inside a section (a MemoryError under its address-space limit, the kernel's or a
container's OOM killer, this module's own watchdog) leaves the id behind, and the next
delivery process charges that message with a crash (`recover`). A message charged once is
worked on alone, with no other section running, so that a second crash is surely its own;
the worker then holds it, and other mail flows on.

Python cannot interrupt a thread, so a section over its CPU budget is ended by ending the
process: the watchdog leaves only that section's id in the marker, with the reason, and
exits; the supervisor starts a new delivery process within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

log = logging.getLogger("optout.delivery")
T = TypeVar("T")

# The exit status of a delivery process that ended itself to stop a message's work.
EXIT_STOPPED_WORK = 75
WATCH_EVERY = 0.25
OUT_OF_MEMORY = "out of memory"
KILLED = "the process was killed (by an out-of-memory killer or a supervisor?)"


def memory_ceiling(memory_limit: int) -> int | None:
    """The address space at which the watchdog stops a delivery process's work: short of
    its limit by an eighth (at least 64 MiB), as the growth between two looks may be that
    much. None without a limit."""
    if not memory_limit:
        return None
    return memory_limit - max(64 * 1024 * 1024, memory_limit // 8)


@dataclass(frozen=True, slots=True)
class Casualty:
    """A message whose work a delivery process did not survive, and what is known of why."""

    queue_id: str
    cause: str


@dataclass(slots=True)
class _Section:
    queue_id: str
    clock: int | None  # the CPU-time clock of the thread doing the work
    cpu_at_start: float


def _thread_clock() -> tuple[int | None, float]:
    try:
        clock = time.pthread_getcpuclockid(threading.get_ident())
        return clock, time.clock_gettime(clock)
    except (AttributeError, OSError):  # no per-thread CPU clocks here: no CPU budget
        return None, 0.0


class _Gate:
    """Sections share the process, except a suspect's, which runs alone."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._shared = 0
        self._alone = False
        self._waiting_alone = 0
        self._telling: set[asyncio.Task[None]] = set()  # kept until done (asyncio's advice)

    def take_shared(self) -> bool:
        """The common case, every section but a suspect's: enter at once if nothing runs
        alone or waits to (no lock to take); False otherwise (then `enter`)."""
        if self._alone or self._waiting_alone:
            return False
        self._shared += 1
        return True

    def leave_shared(self) -> None:
        self._shared -= 1
        if self._waiting_alone and not self._shared:
            task = asyncio.get_running_loop().create_task(self._tell())
            self._telling.add(task)
            task.add_done_callback(self._telling.discard)

    async def _tell(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def enter(self, alone: bool) -> AsyncIterator[None]:
        async with self._changed:
            if alone:
                self._waiting_alone += 1
                try:
                    await self._changed.wait_for(lambda: not self._alone and not self._shared)
                finally:
                    self._waiting_alone -= 1
                self._alone = True
            else:
                await self._changed.wait_for(lambda: not self._alone and not self._waiting_alone)
                self._shared += 1
        try:
            yield
        finally:
            async with self._changed:
                if alone:
                    self._alone = False
                else:
                    self._shared -= 1
                self._changed.notify_all()


class WorkGuard:
    """The marker file of one delivery process, its sections and its watchdog.

    `marker`: None keeps no marker (a worker run on its own, in tests).
    `cpu_limit`: CPU seconds one section may take (None: no limit). `memory_ceiling`: the
    process's address space (bytes) above which the sections running are stopped; it comes
    before the address-space limit, whose MemoryError a broad `except` could swallow.
    `enforce`: a section over its budget ends the process (only where a supervisor restarts
    it); otherwise it is only reported.
    """

    def __init__(
        self,
        marker: Path | None,
        *,
        cpu_limit: float | None,
        enforce: bool,
        memory_ceiling: int | None = None,
    ) -> None:
        self.marker = marker
        self._cpu_limit = cpu_limit
        self._memory_ceiling = memory_ceiling
        self._enforce = enforce
        self._lock = threading.Lock()
        self._sections: dict[int, _Section] = {}
        self._active: Counter[str] = Counter()
        self._next = 0
        self._fd: int | None = None
        self._marker_size = 0  # bytes in the marker file, blank lines included
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._reported: set[int] = set()
        self._gate = _Gate()

    # ---- start and stop ----

    def recover(self) -> list[Casualty]:
        """What a process that died left in the marker (file I/O, at start); the file is
        then emptied and kept open for this process's sections."""
        if self.marker is None:
            return []
        try:
            text = self.marker.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            text = ""
        casualties: dict[str, str] = {}
        for line in text.splitlines():
            queue_id, _, cause = line.partition("\t")
            if queue_id.strip():
                casualties[queue_id.strip()] = cause.strip() or KILLED
        self.marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fd = os.open(self.marker, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(self._fd, 0)
        return [Casualty(q, cause) for q, cause in casualties.items()]

    def start_watchdog(self) -> None:
        if self._cpu_limit is None and self._memory_ceiling is None:
            return
        if self._watchdog is not None:
            return
        self._watchdog = threading.Thread(target=self._watch, name="work-watchdog", daemon=True)
        self._watchdog.start()

    def close(self) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # ---- sections ----

    async def run(
        self, queue_id: str, work: Callable[..., T], *args: Any, offload: bool, alone: bool
    ) -> T:
        """`work(*args)` inside a section for `queue_id`: in a thread when `offload` (or
        `alone`, which also keeps every other section out while it runs)."""
        if not alone and self._gate.take_shared():
            try:
                if offload:
                    return await asyncio.to_thread(self._guarded, queue_id, work, args)
                return self._guarded(queue_id, work, args)
            finally:
                self._gate.leave_shared()
        async with self._gate.enter(alone):
            if offload or alone:
                return await asyncio.to_thread(self._guarded, queue_id, work, args)
            return self._guarded(queue_id, work, args)

    def _guarded(self, queue_id: str, work: Callable[..., T], args: tuple[Any, ...]) -> T:
        """`work` as a section: in the marker while it runs, watched for its CPU time."""
        clock, cpu = _thread_clock()
        with self._lock:
            key = self._next
            self._next += 1
            self._sections[key] = _Section(queue_id, clock, cpu)
            self._active[queue_id] += 1
            if self._active[queue_id] == 1:
                self._write_marker()
        try:
            return work(*args)
        except MemoryError:
            self.die(OUT_OF_MEMORY)
        finally:
            with self._lock:
                del self._sections[key]
                self._active[queue_id] -= 1
                if not self._active[queue_id]:
                    del self._active[queue_id]
                    self._write_marker()

    def _write_marker(self) -> None:
        """With the lock held. The page cache suffices: the marker must outlive the
        process, not the machine. Blank lines fill the rest of what an earlier, longer
        list wrote, instead of a truncation (a second system call, and the costlier: two
        of these per copy sent)."""
        if self._fd is None:
            return
        data = "".join(f"{q}\n" for q in sorted(self._active)).encode()
        padded = data + b"\n" * (self._marker_size - len(data))
        with contextlib.suppress(OSError):
            os.pwrite(self._fd, padded, 0)
            self._marker_size = len(padded)

    def die(self, cause: str, queue_id: str | None = None) -> NoReturn:
        """End the process now, the marker naming what it was working on (only `queue_id`
        when that is known to be the cause) and why."""
        with self._lock:
            culprits = [queue_id] if queue_id is not None else sorted(self._active)
            if self._fd is not None:
                data = "".join(f"{q}\t{cause}\n" for q in culprits).encode()
                with contextlib.suppress(OSError):
                    os.pwrite(self._fd, data, 0)
                    os.ftruncate(self._fd, len(data))
        log.error(
            "stopping this delivery process (%s) while working on %s; a new one takes over",
            cause,
            ", ".join(culprits) or "no message",
        )
        for handler in logging.getLogger("optout").handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(EXIT_STOPPED_WORK)

    def abandon(self) -> None:
        """Stopping, with sections still running (a thread cannot be stopped): end the
        process now, the marker emptied, so no message is charged for an operator's stop.
        Only where a supervisor runs the process; otherwise nothing happens."""
        if not self._enforce:
            return
        with self._lock:
            busy = sorted(self._active)
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, 0)
        log.warning(
            "stopping with work unfinished on %s; it is done again at the next start",
            ", ".join(busy) or "no message",
        )
        for handler in logging.getLogger("optout").handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(0)

    # ---- the watchdog ----

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_EVERY):
            with self._lock:
                sections = list(self._sections.items())
            if not sections:
                continue
            self._check_memory()
            for key, section in sections:
                self._check_cpu(key, section)

    def _check_memory(self) -> None:
        if self._memory_ceiling is None:
            return
        size = _address_space()
        if size is None or size <= self._memory_ceiling:
            return
        cause = (
            f"over its memory budget ({size >> 20} MiB of address space,"
            f" {self._memory_ceiling >> 20} MiB allowed)"
        )
        if self._enforce:
            self.die(cause)
        log.error("delivery process %s", cause)

    def _check_cpu(self, key: int, section: _Section) -> None:
        limit = self._cpu_limit
        if limit is None or section.clock is None or key in self._reported:
            return
        try:
            used = time.clock_gettime(section.clock) - section.cpu_at_start
        except OSError:
            return  # the thread has just ended
        if used <= limit:
            return
        cause = f"over its budget of {limit:g} s of CPU"
        if self._enforce:
            self.die(cause, section.queue_id)
        self._reported.add(key)
        log.error(
            "message has taken %.0f s of CPU, %s",
            used,
            cause,
            extra={"queue_id": section.queue_id},
        )


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _address_space() -> int | None:
    """This process's address space (what RLIMIT_AS limits), from /proc (Linux); None
    elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[0]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None
