"""Statistics count opens and clicks measured individually and in aggregate together, and say
which part is which: `optout-relay stats` (JSON, CSV, text) and the dashboard, from opens
fetched through the real app into a real store (each engine)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from relay.accounts import hash_password, verify_password
from relay.settings import Settings, SigningSettings, StorageSettings
from relay.spool import Spool
from relay.stores import SPOOL_FILE, Stores
from tests.helpers import PASSWORD, cli
from tests.test_admin import log_in
from tracking import Event, EventType, RecipientRef, Signer, TrackingUrls, create_app
from tracking.admin import create_admin_app
from tracking.state import TRACKING
from tracking.tokens import AggregateRef

KEYS = ("stats-consent-key-0123456789",)
PUBLIC = "https://mail.shop.example"
HUMAN = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Thunderbird/128.0"
PEOPLE = [f"p{n}@example.org" for n in range(10)]


@pytest.fixture
async def stores(tmp_path: Path, store_database: str | None) -> AsyncIterator[Stores]:
    storage = StorageSettings(tmp_path / "data", database=store_database)
    async with Stores(Settings(storage=storage, signing=SigningSettings(KEYS))) as opened:
        yield opened


@pytest.fixture
def config(tmp_path: Path, store_database: str | None) -> Path:
    path = tmp_path / "relay.toml"
    database = f'database = "{store_database}"\n' if store_database else ""
    path.write_text(f'[storage]\ndir = "{tmp_path / "data"}"\n{database}')
    return path


async def campaign(aiohttp_client: Any, stores: Stores) -> None:
    """Ten copies of `spring` delivered; p0 and p1 (measured individually) open, p1 twice;
    three others open the one aggregate pixel, one of them also clicks; a scanner too."""
    hasher = stores.suppressions.hasher
    await stores.suppressions.remember(PEOPLE)
    delivered = {"reply": "250 ok", "attempt": 1, "from_domain": "shop.example"}
    await stores.events.record(
        *(
            Event(EventType.DELIVERED, hasher.hash(p), "spring", "Q1", detail=delivered)
            for p in PEOPLE
        )
    )
    later = time.time() + 3600
    urls = TrackingUrls(PUBLIC, Signer(KEYS))
    app = create_app(stores.suppressions, stores.events, urls, clock=lambda: later)
    client: TestClient[Any, Any] = await aiohttp_client(app)

    async def get(url: str, client_address: str, agent: str = HUMAN) -> None:
        headers = {"User-Agent": agent, "X-Forwarded-For": client_address}
        answer = await client.get(url.removeprefix(PUBLIC), headers=headers, allow_redirects=False)
        assert answer.status in (200, 302)

    for n, address in ((0, "192.0.2.10"), (1, "192.0.2.11"), (1, "192.0.2.11")):
        ref = RecipientRef(hasher.hash(PEOPLE[n]), "global", "spring", "Q1")
        await get(urls.pixel_url(ref), address)
    at = int(time.time())
    shared = AggregateRef("spring", "shop.example")
    for address in ("192.0.2.20", "192.0.2.21", "192.0.2.22"):
        await get(urls.aggregate_pixel_url(shared, at), address)
    await get(urls.aggregate_click_url(shared, "https://shop.example/sale", at), "192.0.2.22")
    await get(urls.aggregate_pixel_url(shared, at), "192.0.2.30", "Barracuda Sentinel")
    await client.app[TRACKING].recorder.flush()


async def test_stats_count_both_parts_and_say_which_is_which(
    aiohttp_client: Any, stores: Stores, config: Path
) -> None:
    await campaign(aiohttp_client, stores)
    result = cli(config, "stats", "--format", "json")
    assert result.returncode == 0, result.stderr
    [spring] = json.loads(result.stdout)
    assert {key: spring[key] for key in spring if key.startswith(("opens", "clicks"))} == {
        "opens_human": 5,  # p0 and p1 once each, and three aggregate readings
        "opens_human_individual": 2,
        "opens_human_aggregate": 3,
        "opens_machine": 1,
        "opens_machine_individual": 0,
        "opens_machine_aggregate": 1,
        "clicks_human": 1,
        "clicks_human_individual": 0,
        "clicks_human_aggregate": 1,
        "clicks_machine": 0,
        "clicks_machine_individual": 0,
        "clicks_machine_aggregate": 0,
    }
    assert spring["open_rate_human"] == 0.5 and spring["click_rate_human"] == 0.1
    text = cli(config, "stats").stdout
    assert (
        "of which in aggregate, naming nobody: human opens 3, machine opens 1, human clicks 1"
        in text
    )
    table = cli(config, "stats", "--format", "csv").stdout.splitlines()
    header = table[0].split(",")
    assert "opens_human_individual" in header and "opens_human_aggregate" in header


async def test_the_dashboard_shows_both_parts(
    aiohttp_client: Any, stores: Stores, tmp_path: Path
) -> None:
    await campaign(aiohttp_client, stores)
    spool = await Spool.open(tmp_path / SPOOL_FILE)
    try:
        admin: TestClient[Any, Any] = await aiohttp_client(
            create_admin_app(
                users={"ops": hash_password(PASSWORD)},
                check_password=verify_password,
                suppressions=stores.suppressions,
                statistics=stores.statistics,
                webhooks=stores.webhooks,
                queue=spool.entries,
            )
        )
        assert (await log_in(admin)).status in (302, 303)
        overview = await (await admin.get("/")).text()
        assert "3 in aggregate" in overview
        assert "opens (human, aggregate)" in overview  # the chart's line
        page = await (await admin.get("/campaign", params={"name": "spring"})).text()
        assert "2 individual · 3 aggregate" in page
    finally:
        await spool.close()
