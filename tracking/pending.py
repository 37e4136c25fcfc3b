"""Opens and clicks kept on the node's own disk while the shared store cannot be reached.

The pixel answers its image whatever happens; with a shared store (PostgreSQL) away, the
events it records wait here, in a small SQLite file in the data dir (durable: committed
before the batch is acknowledged), and go to the store when it is back, oldest first. A
batch written to the store whose deletion from here was lost is written again: its fetches
then add to their event's count (they carry their repeat key), never a second row.

Bounded: past MAX_WAITING events, more are refused (and counted lost by the caller), so a
long outage cannot fill the disk.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from suppression import Connection, Database, Migration, StorageUnavailable

from .aggregate import AggregateHit, Counting
from .errors import EventWriteError
from .events import Event, EventStore, EventType

log = logging.getLogger("optout.http")

MAX_WAITING = 200_000
DRAIN_BATCH = 1000
RETRY_EVERY = 1.0

_TABLE = """CREATE TABLE pending_events (
    id INTEGER PRIMARY KEY,
    event TEXT NOT NULL          -- the Event as JSON
)"""


def _create(db: Connection) -> None:
    db.execute(_TABLE)


MIGRATIONS = (Migration("pending/0001-events", _create),)


def _dumps(event: Event | AggregateHit) -> str:
    if isinstance(event, AggregateHit):
        # A count to add: no recipient, and the time only to the day it counts on.
        day = event.at - event.at % 86400
        hit = [event.kind, event.campaign, event.domain, event.machine, day]
        return json.dumps({"aggregate": hit}, separators=(",", ":"))
    return json.dumps(
        {
            "type": str(event.type),
            "address_hash": event.address_hash,
            "campaign": event.campaign,
            "queue_id": event.queue_id,
            "machine": event.machine,
            "detail": dict(event.detail),
            "at": event.at,
            "message_id": event.message_id,
            "repeat_key": event.repeat_key,
        },
        separators=(",", ":"),
    )


def _loads(text: str) -> Event | AggregateHit:
    fields: dict[str, Any] = json.loads(text)
    if "aggregate" in fields:
        return AggregateHit(*fields["aggregate"])
    return Event(**{**fields, "type": EventType(fields["type"])})


class PendingEvents:
    """The local file of events waiting for the store."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: Path) -> PendingEvents:
        return cls(await Database.open(path, MIGRATIONS, cache_kib=2048))

    async def close(self) -> None:
        await self._db.close()

    async def add(self, events: Sequence[Event | AggregateHit]) -> None:
        rows = [(_dumps(event),) for event in events]

        def insert(db: Connection) -> None:
            waiting = int(db.execute("SELECT count(*) FROM pending_events").fetchone()[0])
            if waiting + len(rows) > MAX_WAITING:
                raise EventWriteError(
                    f"the store is unreachable and {waiting} events already wait on disk"
                )
            db.executemany("INSERT INTO pending_events (event) VALUES (?)", rows)

        await self._db.write(insert)

    async def oldest(self, limit: int) -> list[tuple[int, Event | AggregateHit]]:
        rows = await self._db.read(
            lambda db: db.execute(
                "SELECT id, event FROM pending_events ORDER BY id LIMIT ?", [limit]
            ).fetchall()
        )
        return [(row_id, _loads(text)) for row_id, text in rows]

    async def forget(self, up_to: int) -> None:
        await self._db.write(
            lambda db: db.execute("DELETE FROM pending_events WHERE id <= ?", [up_to])
        )

    async def count(self) -> int:
        return int(
            await self._db.read(
                lambda db: db.execute("SELECT count(*) FROM pending_events").fetchone()[0]
            )
        )


class BufferedFetches:
    """`record_fetches` to the store, or to the local file while the store is away; and
    the task that moves what waits to the store when it comes back (`drain`)."""

    def __init__(self, store: EventStore, pending: PendingEvents) -> None:
        self._store = store
        self._pending = pending
        self._waiting = asyncio.Event()
        self._counting: Counting | None = None

    async def record_fetches(
        self,
        events: Sequence[Event | AggregateHit],
        window: timedelta,
        counting: Counting | None = None,
    ) -> None:
        self._counting = counting
        try:
            await self._store.record_fetches(events, window, counting)
        except StorageUnavailable:
            sort = counting or Counting(window)
            await self._pending.add(sort.unseen(events))
            self._waiting.set()

    async def drain(self, window: timedelta) -> None:
        """Runs until cancelled: writes what waits, oldest first, once the store answers."""
        if await self._pending.count():
            self._waiting.set()
        while True:
            await self._waiting.wait()
            batch = await self._pending.oldest(DRAIN_BATCH)
            if not batch:
                self._waiting.clear()
                continue
            try:
                await self._store.record_fetches(
                    [event for _, event in batch], window, self._counting
                )
            except StorageUnavailable:
                await asyncio.sleep(RETRY_EVERY)
                continue
            except Exception:
                log.exception("cannot move %d waiting open/click events to the store", len(batch))
                await asyncio.sleep(RETRY_EVERY)
                continue
            await self._pending.forget(batch[-1][0])
            log.info("%d open/click events kept on disk written to the store", len(batch))
