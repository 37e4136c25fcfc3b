"""Aggregate hits while the shared store (PostgreSQL) is away: kept on the node's disk with
the day only and no repeat digest, a repeat not kept twice, and counted once the store is
back; the opens of a recipient who withdrew are still counted in aggregate when they arrive
there."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import timedelta
from pathlib import Path

from relay.settings import Settings, StorageSettings
from relay.stores import Stores
from suppression import Purpose, StorageUnavailable
from tests.postgres import PostgresServer
from tracking import Event, EventType
from tracking.aggregate import AggregateHit, Counting, repeat_digest
from tracking.pending import BufferedFetches, PendingEvents


async def test_hits_wait_on_disk_without_their_digest_and_count_once_back(
    tmp_path: Path, postgres_server: PostgresServer, postgres_url: str
) -> None:
    window = timedelta(hours=1)
    settings = Settings(storage=StorageSettings(tmp_path / "node", database=postgres_url))
    async with Stores(settings) as stores:
        withdrew = stores.suppressions.hasher.hash("jo@example.org")
        await stores.consents.withdraw("jo@example.org", [Purpose.OPENS], source="test")
        pending = await PendingEvents.open(tmp_path / "pending.db")
        buffered = BufferedFetches(stores.events, pending)
        counting = Counting(window)
        now = time.time()
        digest = repeat_digest("open", "token", "", "192.0.2.1", "agent", "human")
        hit = AggregateHit("open", "spring", "shop.example", False, now, digest)
        open_of_jo = Event(
            EventType.OPEN, withdrew, "spring", "Q1", False, {"reason": "human"}, repeat_key="k"
        )
        postgres_server.stop()
        try:
            await buffered.record_fetches([hit, hit, open_of_jo], window, counting)
        finally:
            postgres_server.start()
        with sqlite3.connect(tmp_path / "pending.db") as db:
            kept = [row[0] for row in db.execute("SELECT event FROM pending_events ORDER BY id")]
        assert len(kept) == 2  # the repeat was not kept
        assert digest.hex() not in kept[0] and '"aggregate"' in kept[0]
        drain = asyncio.create_task(buffered.drain(window))
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    counts = await stores.suppressions.database.read(
                        lambda db: db.execute(
                            "SELECT metric, sum(n) FROM aggregate_counts GROUP BY metric"
                        ).fetchall()
                    )
                except StorageUnavailable:
                    counts = []
                if (counts and counts[0][1] == 2) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
        finally:
            drain.cancel()
            await pending.close()
        assert [tuple(row) for row in counts] == [("open_human", 2)]  # the hit, and jo's open
        events = await stores.suppressions.database.read(
            lambda db: db.execute("SELECT count(*) FROM events").fetchone()[0]
        )
        assert events == 0
