"""Stopping individual tracking without unsubscribing, over HTTP against real SQLite: the
preference page and the unsubscribe pages' form. A GET or HEAD never changes anything; the
form's POST (signed token in the URL, nothing else) withdraws both purposes once, as an
event; forged tokens and foreign forms change nothing. Aggregate tokens through the app:
one URL for everyone, counted, deduplicated per client, and no recipient in sight."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from relay.settings import Settings, SigningSettings, StorageSettings
from relay.stores import Stores
from tracking import RecipientRef, Signer, TrackingUrls, create_app
from tracking.state import TRACKING
from tracking.tokens import AggregateRef

KEYS = ("preferences-test-key-0123456789",)
PUBLIC = "https://mail.shop.example"
ERIN = "erin@example.org"
HUMAN = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Thunderbird/128.0"
Client = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def stores(tmp_path: Path, store_database: str | None) -> AsyncIterator[Stores]:
    """On each engine (the conftest fixture `store_database`)."""
    storage = StorageSettings(tmp_path, database=store_database)
    settings = Settings(storage=storage, signing=SigningSettings(KEYS))
    async with Stores(settings) as opened:
        await opened.suppressions.remember([ERIN])
        yield opened


@pytest.fixture
def urls() -> TrackingUrls:
    return TrackingUrls(PUBLIC, Signer(KEYS))


@pytest.fixture
async def client(aiohttp_client: Any, stores: Stores, urls: TrackingUrls) -> TestClient[Any, Any]:
    # An hour after the copies were made: opens are a person's, not a scanner's.
    later = time.time() + 3600
    app = create_app(
        stores.suppressions,
        stores.events,
        urls,
        tracking_withdrawal=True,
        clock=lambda: later,
    )
    made: TestClient[Any, Any] = await aiohttp_client(app)
    return made


def ref(stores: Stores) -> RecipientRef:
    return RecipientRef(stores.suppressions.hasher.hash(ERIN), "topic:news", "spring", "Q1")


def path(url: str) -> str:
    return url.removeprefix(PUBLIC)


async def query(stores: Stores, sql: str) -> list[tuple[Any, ...]]:
    """Rows straight from the store's database (SQLite file or PostgreSQL)."""
    return await stores.suppressions.database.read(
        lambda db: [tuple(row) for row in db.execute(sql).fetchall()]
    )


async def consent_rows(stores: Stores) -> list[tuple[Any, ...]]:
    return await query(stores, "SELECT purpose, state, source FROM tracking_consent ORDER BY 1")


async def withdrawn_events(stores: Stores) -> list[dict[str, Any]]:
    return [e async for e in stores.events.export() if e["type"] == "tracking.withdrawn"]


async def test_the_preference_page_changes_nothing_until_its_form_is_posted(
    client: TestClient[Any, Any], stores: Stores, urls: TrackingUrls, tmp_path: Path
) -> None:
    preferences = path(urls.preferences_url(urls.unsubscribe_url(ref(stores))))
    for method in (client.get, client.head):
        async with method(preferences) as page:
            assert page.status == 200
    page_text = await (await client.get(preferences)).text()
    assert "Stop tracking whether I open these emails" in page_text
    assert "<script" not in page_text
    assert await consent_rows(stores) == []

    stopped = await client.post(preferences, data={"stop_tracking": "yes"})
    assert stopped.status == 200
    assert "Tracking stopped" in await stopped.text()
    assert await consent_rows(stores) == [
        ("clicks", "withdrawn", "preferences"),
        ("opens", "withdrawn", "preferences"),
    ]
    again = await client.post(preferences, data={"stop_tracking": "yes"})
    assert again.status == 200  # idempotent: nothing more recorded
    [event] = await withdrawn_events(stores)
    assert (event["recipient"], event["campaign"], event["queue_id"]) == (ERIN, "spring", "Q1")
    assert event["detail"]["purposes"] == ["clicks", "opens"]
    assert event["detail"]["method"] == "preferences"
    assert "Tracking is off for you" in await (await client.get(preferences)).text()
    assert await stores.suppressions.check(ERIN, ["global", "topic:news"]) is None


async def test_the_unsubscribe_pages_offer_it_without_unsubscribing(
    client: TestClient[Any, Any], stores: Stores, urls: TrackingUrls, tmp_path: Path
) -> None:
    unsubscribe = path(urls.unsubscribe_url(ref(stores)))
    confirm = await (await client.get(unsubscribe)).text()
    assert confirm.count("<form") == 2 and 'name="stop_tracking"' in confirm
    stopped = await client.post(unsubscribe, data={"stop_tracking": "yes"})
    assert "Tracking stopped" in await stopped.text()
    assert [row[2] for row in await consent_rows(stores)] == ["page", "page"]
    assert await stores.suppressions.check(ERIN, ["global", "topic:news"]) is None  # subscribed

    done = await client.post(unsubscribe, data={"confirm": "yes"})
    assert 'name="stop_tracking"' in await done.text()  # the done page offers it too
    assert await stores.suppressions.check(ERIN, ["topic:news"]) is not None


async def test_forged_tokens_and_foreign_forms_change_nothing(
    client: TestClient[Any, Any], stores: Stores, urls: TrackingUrls, tmp_path: Path
) -> None:
    preferences = path(urls.preferences_url(urls.unsubscribe_url(ref(stores))))
    forged = preferences[:-4] + ("AAAA" if not preferences.endswith("AAAA") else "BBBB")
    assert (await client.get(forged)).status == 404
    assert (await client.post(forged, data={"stop_tracking": "yes"})).status == 404
    assert (await client.post(preferences, data={"something": "else"})).status == 400
    assert (await client.post(preferences, data=b"stop_tracking=yes")).status == 400  # no type
    other = Signer(("another-relay-key-0123456789",))
    foreign = TrackingUrls(PUBLIC, other).unsubscribe_url(ref(stores))
    assert (
        await client.post(path(foreign).replace("/u/", "/p/"), data={"stop_tracking": "1"})
    ).status == 404
    assert await consent_rows(stores) == []


async def test_an_aggregate_pixel_names_nobody_and_counts_once_per_client(
    client: TestClient[Any, Any], stores: Stores, urls: TrackingUrls, tmp_path: Path
) -> None:
    at = int(time.time())
    pixel = path(urls.aggregate_pixel_url(AggregateRef("spring", "shop.example"), at))
    assert pixel == path(urls.aggregate_pixel_url(AggregateRef("spring", "shop.example"), at))
    for client_address in ("192.0.2.1", "192.0.2.1", "192.0.2.2"):  # a reload, then another
        answer = await client.get(
            pixel, headers={"User-Agent": HUMAN, "X-Forwarded-For": client_address}
        )
        assert answer.status == 200 and answer.content_type == "image/gif"
    await client.app[TRACKING].recorder.flush()
    counts = await query(stores, "SELECT campaign, domain, metric, n FROM aggregate_counts")
    assert counts == [("spring", "shop.example", "open_human", 2)]
    assert await query(stores, "SELECT count(*) FROM events") == [(0,)]
