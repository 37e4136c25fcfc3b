"""Replayed pixel and click URLs: counted on one row per copy within the repeat window (in the
app's process and in the event process, across batches and restarts), and a per-client limit
past which fetches are answered but not recorded. Real HTTP, real SQLite."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from relay.settings import Settings, SigningSettings, StorageSettings
from relay.stores import Stores
from tests.helpers import Clock
from tracking import PIXEL_GIF, RateLimit, RecipientRef, Signer, TrackingUrls, create_app
from tracking.state import TRACKING

KEYS = ("replay-test-key-0123456789abcdef",)
PUBLIC = "https://mail.shop.example"
ADDRESS = "erin@example.org"
HUMAN = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Thunderbird/128.0"
SCANNER = "Mozilla/5.0 (compatible; Barracuda Sentinel)"
AN_HOUR = 3600.0

Client = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def stores(tmp_path: Path, store_database: str | None) -> AsyncIterator[Stores]:
    """On each engine (the conftest fixture `store_database`)."""
    storage = StorageSettings(tmp_path, database=store_database)
    settings = Settings(storage=storage, signing=SigningSettings(KEYS))
    async with Stores(settings) as opened:
        await opened.suppressions.remember([ADDRESS])
        yield opened


@pytest.fixture
def urls() -> TrackingUrls:
    return TrackingUrls(PUBLIC, Signer(KEYS))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_client(aiohttp_client: Any, stores: Stores, urls: TrackingUrls, clock: Clock) -> Client:
    async def make(**options: Any) -> TestClient[Any, Any]:
        app = create_app(stores.suppressions, stores.events, urls, clock=clock, **options)
        client: TestClient[Any, Any] = await aiohttp_client(app)
        return client

    return make


def copy_of(stores: Stores, queue_id: str = "Q1") -> RecipientRef:
    return RecipientRef(stores.suppressions.hasher.hash(ADDRESS), "global", "spring", queue_id)


def pixel(stores: Stores, urls: TrackingUrls, queue_id: str = "Q1") -> str:
    return urls.pixel_url(copy_of(stores, queue_id)).removeprefix(PUBLIC)


async def recorded(client: TestClient[Any, Any], stores: Stores) -> list[dict[str, Any]]:
    await client.app[TRACKING].recorder.flush()
    return [e async for e in stores.events.export()]


async def event_rows(stores: Stores) -> int:
    return int(
        await stores.database.read(
            lambda db: db.execute("SELECT count(*) FROM events").fetchone()[0]
        )
    )


async def replay(client: TestClient[Any, Any], path: str, times: int, **headers: str) -> None:
    """`times` fetches, a few at once, as a replaying client sends them; each one answered
    with the image."""
    headers = {"User-Agent": HUMAN, **headers}

    async def fetch() -> None:
        response = await client.get(path, headers=headers)
        assert response.status == 200 and await response.read() == PIXEL_GIF

    for start in range(0, times, 20):
        await asyncio.gather(*(fetch() for _ in range(min(20, times - start))))


@pytest.mark.parametrize("event_process", [False, True], ids=["in-process", "event-process"])
async def test_a_replayed_pixel_is_one_row_with_a_count(
    make_client: Client,
    stores: Stores,
    urls: TrackingUrls,
    tmp_path: Path,
    event_process: bool,
) -> None:
    client = await make_client(event_process=event_process, fetch_limit=None)
    url = pixel(stores, urls)
    await replay(client, url, 300)
    await client.app[TRACKING].recorder.flush()
    await replay(client, url, 200)  # later batches find the row the first one made
    [event] = await recorded(client, stores)
    assert (event["type"], event["machine"], event["count"]) == ("open", False, 500)
    assert event["last_at"] >= event["at"]
    assert await event_rows(stores) == 1


async def test_a_copy_opened_again_after_the_window_is_a_new_row(
    make_client: Client, stores: Stores, urls: TrackingUrls, clock: Clock
) -> None:
    client = await make_client(repeat_window=timedelta(minutes=30))
    url = pixel(stores, urls)
    await replay(client, url, 3)
    clock.now += 29 * 60
    await replay(client, url, 1)
    clock.now += 2 * 60  # 31 minutes after the first: a new event, which opens a new window
    await replay(client, url, 2)
    opens = await recorded(client, stores)
    assert [e["count"] for e in opens] == [4, 2]
    assert opens[0]["at"] < opens[0]["last_at"] < opens[1]["at"]


async def test_the_window_holds_across_a_restart(
    make_client: Client, stores: Stores, urls: TrackingUrls, tmp_path: Path
) -> None:
    first = await make_client(event_process=True)
    await replay(first, pixel(stores, urls), 5)
    await first.close()  # the app stops; its event process writes what it holds and goes
    second = await make_client(event_process=True)
    await replay(second, pixel(stores, urls), 5)
    [event] = await recorded(second, stores)
    assert event["count"] == 10
    assert await event_rows(stores) == 1


async def test_copies_links_and_verdicts_are_never_merged(
    make_client: Client, stores: Stores, urls: TrackingUrls
) -> None:
    """Each copy, each link of a copy, and a scanner's fetch beside a person's, are events
    of their own: only a replay of the very same fetch is counted."""
    client = await make_client()
    await replay(client, pixel(stores, urls, "Q1"), 2)
    await replay(client, pixel(stores, urls, "Q2"), 1)
    await replay(client, pixel(stores, urls, "Q1"), 3, **{"User-Agent": SCANNER})
    sale = urls.click_url(copy_of(stores), "https://shop.example/sale").removeprefix(PUBLIC)
    shoes = urls.click_url(copy_of(stores), "https://shop.example/shoes").removeprefix(PUBLIC)
    for link, times in ((sale, 2), (shoes, 1)):
        for _ in range(times):
            answer = await client.get(link, allow_redirects=False, headers={"User-Agent": HUMAN})
            assert answer.status == 302
    rows = [
        (e["type"], e["queue_id"], e["detail"]["reason"], e["detail"].get("url"), e["count"])
        for e in await recorded(client, stores)
    ]
    assert sorted(rows, key=str) == sorted(
        [
            ("open", "Q1", "human", None, 2),
            ("open", "Q2", "human", None, 1),
            ("open", "Q1", "scanner:barracuda", None, 3),
            ("click", "Q1", "human", "https://shop.example/sale", 2),
            ("click", "Q1", "human", "https://shop.example/shoes", 1),
        ],
        key=str,
    )


@pytest.mark.parametrize("event_process", [False, True], ids=["in-process", "event-process"])
async def test_past_its_limit_a_client_gets_the_image_and_records_nothing(
    make_client: Client, stores: Stores, urls: TrackingUrls, event_process: bool
) -> None:
    client = await make_client(
        event_process=event_process, fetch_limit=RateLimit(per_minute=1, burst=3)
    )
    me = {"X-Forwarded-For": "203.0.113.9"}
    for copy in range(6):  # six different copies' pixels: no repeat, only the limit
        await replay(client, pixel(stores, urls, f"Q{copy}"), 1, **me)
    # Another client is not held back, nor is a known image proxy fetching for many.
    await replay(client, pixel(stores, urls, "other"), 1, **{"X-Forwarded-For": "198.51.100.7"})
    google = {"X-Forwarded-For": "66.249.84.10", "User-Agent": "Mozilla/5.0 GoogleImageProxy"}
    for copy in range(5):
        await replay(client, pixel(stores, urls, f"G{copy}"), 1, **google)
    opens = await recorded(client, stores)
    assert sorted(e["queue_id"] for e in opens) == sorted(
        ["Q0", "Q1", "Q2", "other", "G0", "G1", "G2", "G3", "G4"]
    )
    metrics = await (await client.get("/metrics")).text()
    assert 'optout_rate_limited_total{route="pixel"} 3.0' in metrics


async def test_past_its_limit_a_click_still_redirects_unrecorded(
    make_client: Client, stores: Stores, urls: TrackingUrls
) -> None:
    client = await make_client(fetch_limit=RateLimit(per_minute=1, burst=2))
    me = {"X-Forwarded-For": "203.0.113.9", "User-Agent": HUMAN}
    for copy in range(4):
        link = urls.click_url(copy_of(stores, f"Q{copy}"), "https://shop.example/sale")
        answer = await client.get(link.removeprefix(PUBLIC), allow_redirects=False, headers=me)
        assert answer.status == 302
        assert answer.headers["Location"] == "https://shop.example/sale"
    clicks = await recorded(client, stores)
    assert [e["queue_id"] for e in clicks] == ["Q0", "Q1"]
    metrics = await (await client.get("/metrics")).text()
    assert 'optout_rate_limited_total{route="click"} 2.0' in metrics
