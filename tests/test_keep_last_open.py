"""tracking.keep_last_open_only: per recipient and campaign, only the day of the last open is
kept (one event, no time, no count), as opens arrive and when purge (or serve's hourly task)
meets opens stored before; and an open of a recipient who withdrew, counted in aggregate.
On each engine (SQLite, PostgreSQL), through the real app."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from relay.settings import Settings, SigningSettings, StorageSettings
from relay.stores import Stores
from suppression import Purpose
from tests.helpers import Clock, cli
from tracking import Event, EventType, RecipientRef, Signer, TrackingUrls, create_app
from tracking.retention import Retention, purge
from tracking.state import TRACKING

KEYS = ("keep-last-test-key-0123456789",)
PUBLIC = "https://mail.shop.example"
IDA = "ida@example.org"
HUMAN = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Thunderbird/128.0"
DAY = 86400.0


@pytest.fixture
async def stores(tmp_path: Path, store_database: str | None) -> AsyncIterator[Stores]:
    storage = StorageSettings(tmp_path, database=store_database)
    async with Stores(Settings(storage=storage, signing=SigningSettings(KEYS))) as opened:
        await opened.suppressions.remember([IDA])
        yield opened


async def query(stores: Stores, sql: str) -> list[tuple[Any, ...]]:
    return await stores.suppressions.database.read(
        lambda db: [tuple(row) for row in db.execute(sql).fetchall()]
    )


def pixel(stores: Stores, queue_id: str) -> str:
    ref = RecipientRef(stores.suppressions.hasher.hash(IDA), "global", "spring", queue_id)
    return TrackingUrls(PUBLIC, Signer(KEYS)).pixel_url(ref).removeprefix(PUBLIC)


async def opened(client: TestClient[Any, Any], url: str) -> None:
    answer = await client.get(url, headers={"User-Agent": HUMAN})
    assert answer.status == 200
    await client.app[TRACKING].recorder.flush()


async def test_only_the_day_of_the_last_open_is_kept(aiohttp_client: Any, stores: Stores) -> None:
    clock = Clock()
    app = create_app(
        stores.suppressions,
        stores.events,
        TrackingUrls(PUBLIC, Signer(KEYS)),
        keep_last_open_only=True,
        clock=clock,
    )
    client: TestClient[Any, Any] = await aiohttp_client(app)
    opens = "SELECT at, count, last_at FROM events WHERE type = 'open'"
    await opened(client, pixel(stores, "Q1"))
    await opened(client, pixel(stores, "Q1"))  # read again the same day
    [(at, count, last_at)] = await query(stores, opens)
    first_day = time.strftime("%Y-%m-%d", time.gmtime(clock.now))
    assert (at, count, last_at) == (f"{first_day}T00:00:00.000Z", 1, None)

    clock.now += 2 * DAY
    await opened(client, pixel(stores, "Q2"))  # another message of the campaign, later
    last_day = time.strftime("%Y-%m-%d", time.gmtime(clock.now))
    assert await query(stores, opens) == [(f"{last_day}T00:00:00.000Z", 1, None)]
    reach = "SELECT at FROM stats_reach WHERE metric = 'open_human'"
    assert await query(stores, reach) == [(f"{last_day}T00:00:00.000Z",)]
    # The counts, which name nobody, still count every open that was an event.
    counted = "SELECT sum(n) FROM stats_counts WHERE metric = 'open_human'"
    assert await query(stores, counted) == [(2,)]


async def test_purge_brings_older_opens_down_to_the_last_day(stores: Stores) -> None:
    key = stores.suppressions.hasher.hash(IDA)
    times = ["2026-03-01T09:00:00.000Z", "2026-03-04T18:30:12.345Z", "2026-03-02T07:00:00.000Z"]
    await stores.events.record(
        *(
            Event(EventType.OPEN, key, "spring", f"Q{i}", False, at=at)
            for i, at in enumerate(times)
        ),
        Event(EventType.OPEN, key, "autumn", "Q9", False, at="2026-03-05T10:00:00.000Z"),
    )
    forever = Retention.parse({"open": "forever"})
    dry = await purge(
        stores.events, stores.suppressions, forever, dry_run=True, keep_last_open_only=True
    )
    assert dry.events["open"] == 2
    report = await purge(stores.events, stores.suppressions, forever, keep_last_open_only=True)
    assert report.events["open"] == 2
    kept = await query(stores, "SELECT campaign, at, count FROM events ORDER BY campaign")
    assert kept == [
        ("autumn", "2026-03-05T00:00:00.000Z", 1),
        ("spring", "2026-03-04T00:00:00.000Z", 1),
    ]
    reach = await query(stores, "SELECT campaign, at FROM stats_reach ORDER BY campaign")
    assert reach == [(campaign, at) for campaign, at, _ in kept]


async def test_an_open_of_a_recipient_who_withdrew_is_only_counted(
    aiohttp_client: Any, stores: Stores
) -> None:
    clock = Clock()
    app = create_app(
        stores.suppressions, stores.events, TrackingUrls(PUBLIC, Signer(KEYS)), clock=clock
    )
    client: TestClient[Any, Any] = await aiohttp_client(app)
    await stores.consents.withdraw(IDA, [Purpose.OPENS], source="test")
    await opened(client, pixel(stores, "Q1"))
    assert await query(stores, "SELECT count(*) FROM events") == [(0,)]
    counted = "SELECT campaign, metric, n FROM aggregate_counts"
    assert await query(stores, counted) == [("spring", "open_human", 1)]


def test_purge_command_keeps_to_the_setting(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[storage]\ndir = "{tmp_path / "data"}"\n[tracking]\nkeep_last_open_only = true\n'
    )

    async def two_opens() -> None:
        async with Stores(Settings(storage=StorageSettings(tmp_path / "data"))) as stores:
            key = stores.suppressions.hasher.hash(IDA)
            at = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
            await stores.events.record(
                Event(EventType.OPEN, key, "spring", "Q1", False, at=at),
                Event(EventType.OPEN, key, "spring", "Q2", False, at=at),
            )

    asyncio.run(two_opens())
    result = cli(config, "purge")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("purged 1 event (1 open), 0 contacts")
