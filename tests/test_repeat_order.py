"""A copy's pixel fetched again within the repeat window is one event with a count (and an
aggregate pixel one count per reader), whatever order the fetches reach the writer in:
with several HTTP processes (http.processes) a fetch answered first by one process may be
written after a later one answered by another. On each engine, through the real app."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from relay.settings import Settings, SigningSettings, StorageSettings
from relay.stores import Stores
from tests.helpers import Clock
from tracking import RecipientRef, Signer, TrackingUrls, create_app
from tracking.state import TRACKING
from tracking.tokens import AggregateRef

KEYS = ("repeat-order-test-key-0123456789",)
PUBLIC = "https://mail.shop.example"
HUMAN = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Thunderbird/128.0"


@pytest.fixture
async def stores(tmp_path: Path, store_database: str | None) -> AsyncIterator[Stores]:
    storage = StorageSettings(tmp_path, database=store_database)
    async with Stores(Settings(storage=storage, signing=SigningSettings(KEYS))) as opened:
        yield opened


async def query(stores: Stores, sql: str) -> list[tuple[Any, ...]]:
    return await stores.suppressions.database.read(
        lambda db: [tuple(row) for row in db.execute(sql).fetchall()]
    )


async def app(
    aiohttp_client: Any, stores: Stores
) -> tuple[TestClient[Any, Any], Clock, TrackingUrls]:
    clock = Clock()
    urls = TrackingUrls(PUBLIC, Signer(KEYS))
    client = await aiohttp_client(create_app(stores.suppressions, stores.events, urls, clock=clock))
    return client, clock, urls


async def fetched_at(
    client: TestClient[Any, Any], clock: Clock, url: str, moment: float, reader: str
) -> None:
    """One fetch answered at `moment`, written (a round of its own) before the next."""
    clock.now = moment
    answer = await client.get(url, headers={"User-Agent": HUMAN, "X-Forwarded-For": reader})
    assert answer.status == 200
    await client.app[TRACKING].recorder.flush()


async def test_an_earlier_fetch_written_after_a_later_one_is_counted_on_its_event(
    aiohttp_client: Any, stores: Stores
) -> None:
    client, clock, urls = await app(aiohttp_client, stores)
    ref = RecipientRef(stores.suppressions.hasher.hash("ida@example.org"), "global", "spring", "Q1")
    pixel = urls.pixel_url(ref).removeprefix(PUBLIC)
    first = clock.now
    await fetched_at(client, clock, pixel, first + 2.0, "192.0.2.1")  # written first
    await fetched_at(client, clock, pixel, first, "192.0.2.1")  # answered 2 s before it
    await fetched_at(client, clock, pixel, first + 1.0, "192.0.2.1")
    opens = await query(stores, "SELECT count FROM events WHERE type = 'open'")
    assert opens == [(3,)]
    # A fetch a window (an hour) before is another event.
    await fetched_at(client, clock, pixel, first - 3600.0, "192.0.2.1")
    assert len(await query(stores, "SELECT id FROM events WHERE type = 'open'")) == 2


async def test_an_aggregate_reader_counted_later_is_not_counted_again_for_an_earlier_fetch(
    aiohttp_client: Any, stores: Stores
) -> None:
    client, clock, urls = await app(aiohttp_client, stores)
    pixel = urls.aggregate_pixel_url(AggregateRef("spring", "shop.example"), int(time.time()))
    pixel = pixel.removeprefix(PUBLIC)
    first = clock.now
    await fetched_at(client, clock, pixel, first + 2.0, "192.0.2.1")
    await fetched_at(client, clock, pixel, first, "192.0.2.1")  # the same reader, earlier
    await fetched_at(client, clock, pixel, first + 1.0, "192.0.2.2")  # another reader
    counts = await query(stores, "SELECT metric, n FROM aggregate_counts")
    assert counts == [("open_human", 2)]
