"""Whether the relay's stores can be trusted and written: checked at start, asked by
/healthz. A store that cannot take a write (a full disk, a damaged file) makes /healthz
answer 503 with the reason, so a load balancer or a monitor learns it before senders do."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from .spool import Spool
from .spool.state import clear_damage, reported_damage
from .stores import STORE_FILE, Stores

log = logging.getLogger("optout.serve")

# A probe writes (and fsyncs) each store: at most this often, however often /healthz is asked.
PROBE_EVERY = 5.0
# Less free space than this under the data dir: full, for every purpose the relay has.
FULL_BELOW = 1024 * 1024


async def startup_checks(stores: Stores, spool: Spool, data_dir: Path) -> list[str]:
    """SQLite's quick_check of both files, said clearly in the log; the problems found
    (the spool's own start-up findings, lost frames, included)."""
    problems = list(spool.problems)
    store = store_name(stores)
    for name, check in ((store, stores.quick_check), (spool.path.name, spool.quick_check)):
        started = time.monotonic()
        try:
            found = await check()
        except Exception as exc:
            found = [f"cannot be checked: {exc}"]
        took = time.monotonic() - started
        if not found:
            log.info("%s: integrity check ok (%.2f s)", name, took)
            continue
        log.error(
            "%s: integrity check found %d problem%s; repair it (sqlite3 %s '.recover') while"
            " the relay is stopped: %s",
            name,
            len(found),
            "s" if len(found) > 1 else "",
            name,
            "; ".join(found),
        )
        problems.append(f"{name} is damaged: {found[0]}")
    if not problems:
        await asyncio.to_thread(clear_damage, data_dir)  # repaired since it was reported
    return problems


def store_name(stores: Stores) -> str:
    """optout.db, or the shared store's place (its URL without the password)."""
    return STORE_FILE if stores.settings.storage.database is None else stores.database.location


class Health:
    """/healthz's view of the stores: what start-up found, and live write probes."""

    def __init__(self, stores: Stores, spool: Spool, data_dir: Path, found: list[str]) -> None:
        self._found = found
        self._data_dir = data_dir
        self._probes: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            (store_name(stores), stores.probe_write),
            (spool.path.name, spool.probe_write),
        ]
        self._spool = spool
        self._lock = asyncio.Lock()
        self._probed_at = -PROBE_EVERY
        self._probed: list[str] = []

    async def problems(self) -> list[str]:
        async with self._lock:
            if time.monotonic() - self._probed_at >= PROBE_EVERY:
                self._probed = await self._probe()
                self._probed_at = time.monotonic()
            found = list(self._found) + self._probed
        damage = await asyncio.to_thread(reported_damage, self._data_dir)
        if damage:
            found.append(damage)
        return found

    async def _probe(self) -> list[str]:
        problems = []
        for name, probe in self._probes:
            try:
                await probe()
            except Exception as exc:
                problems.append(f"{name} cannot be written: {exc}")
        free = await asyncio.to_thread(_free_bytes, self._data_dir)
        if free is not None and free < FULL_BELOW:
            problems.append(f"disk full under {self._data_dir}: {free} bytes free")
        if not await asyncio.to_thread(self._spool.reserve_in_place):
            problems.append(
                f"the spool's disk reserve under {self._data_dir} is in use: new mail gets 451"
            )
        return problems


def _free_bytes(directory: Path) -> int | None:
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize
