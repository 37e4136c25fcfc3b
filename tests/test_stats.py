"""`optout-relay stats` against a known event history: every number worked out by hand here,
written through the event store in batches as the relay writes them."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.app import Relay
from relay.settings import Settings, StorageSettings
from relay.stores import HASH_KEY_FILE, STORE_FILE, Stores, load_or_create_secret
from suppression import Database, format_time
from tests.helpers import (
    CaptureServer,
    asubmit,
    body_of,
    cli,
    local_url,
    newsletter,
    parse,
    wait_for,
)
from tracking.events import Event, EventType
from tracking.retention import Retention, purge
from tracking.statistics import Selection

NOW = datetime.now(UTC)
RECENT = format_time(NOW - timedelta(hours=2))
OLD = format_time(NOW - timedelta(days=10))


def delivered(n: int, campaign: str | None, domain: str | None, at: str = RECENT) -> list[Event]:
    detail: dict[str, Any] = {"reply": "250 2.0.0 Ok", "attempt": 1}
    if domain:
        detail["from_domain"] = domain
    return [
        Event(
            EventType.DELIVERED, f"{campaign}-r{i}", campaign, f"Q-{campaign}", detail=detail, at=at
        )
        for i in range(n)
    ]


def bounced(n: int, campaign: str, detail: dict[str, Any], at: str = RECENT) -> list[Event]:
    return [
        Event(
            EventType.BOUNCED, f"{campaign}-b{i}", campaign, f"Q-{campaign}", detail=detail, at=at
        )
        for i in range(n)
    ]


def opens(
    recipients: range, campaign: str, machine: bool, kind: EventType = EventType.OPEN
) -> list[Event]:
    return [
        Event(kind, f"{campaign}-r{i}", campaign, f"Q-{campaign}", machine, {"reason": "x"}, RECENT)
        for i in recipients
    ]


def plain(kind: EventType, n: int, campaign: str, at: str = RECENT) -> list[Event]:
    return [Event(kind, f"{campaign}-x{i}", campaign, f"Q-{campaign}", at=at) for i in range(n)]


COMPLAINT = EventType.COMPLAINT  # recorded by the feedback intake (ARF reports)
HARD_5XX = {"reply": "550 5.1.1 no such user", "attempt": 1}
SOFT_EXPIRED = {"reply": "451 4.4.1 expired after 5 days", "attempt": 9}
LATE_HARD = {"kind": "hard", "status": "5.1.1"}  # a DSN after the MTA took the copy


async def history(stores: Stores) -> None:
    """Written in several batches, as the relay writes them."""
    record = stores.events.record
    # spring: 1000 copies taken by the MTA (shop.example), 10 refused at once with 5xx, 5
    # expired after retries; later 5 DSNs say a taken copy bounced; 8 deferrals.
    await record(*delivered(1000, "spring", "shop.example"))
    await record(*bounced(10, "spring", HARD_5XX), *bounced(5, "spring", SOFT_EXPIRED))
    await record(*bounced(5, "spring", LATE_HARD), *plain(EventType.DEFERRED, 8, "spring"))
    await record(*plain(COMPLAINT, 2, "spring"), *plain(EventType.UNSUBSCRIBE, 15, "spring"))
    # 200 people open (some twice, across batches), 100 machine fetches (some twice).
    await record(*opens(range(0, 150), "spring", False), *opens(range(0, 60), "spring", True))
    await record(*opens(range(100, 200), "spring", False), *opens(range(50, 100), "spring", True))
    await record(*opens(range(0, 200), "spring", False))
    # 40 people click, 10 of them twice; 10 scanner clicks.
    await record(*opens(range(0, 40), "spring", False, EventType.CLICK))
    await record(*opens(range(30, 40), "spring", False, EventType.CLICK))
    await record(*opens(range(500, 510), "spring", True, EventType.CLICK))
    # autumn (news.shop.example): a bad list.
    await record(*delivered(100, "autumn", "news.shop.example"))
    await record(*bounced(5, "autumn", HARD_5XX), *plain(COMPLAINT, 1, "autumn"))
    # Mail without a campaign, and last month's autumn mail, outside --since 7d.
    await record(*delivered(10, None, None))
    await record(*delivered(50, "autumn", "news.shop.example", at=OLD))


@pytest.fixture
async def stores(tmp_path: Path, store_database: str | None) -> AsyncIterator[Stores]:
    """On each engine (the conftest fixture `store_database`)."""
    storage = StorageSettings(tmp_path / "data", database=store_database)
    async with Stores(Settings(storage=storage)) as opened:
        await history(opened)
        yield opened


@pytest.fixture
def config(tmp_path: Path, store_database: str | None) -> Path:
    path = tmp_path / "relay.toml"
    database = f'database = "{store_database}"\n' if store_database else ""
    path.write_text(f'[storage]\ndir = "{tmp_path / "data"}"\n{database}')
    return path


SPRING = {
    "campaign": "spring",
    "domain": None,
    "sent": 1015,  # 1000 taken + 10 + 5 refused
    "delivered": 995,  # 1000 taken - 5 bounced later
    "deferred": 8,
    "bounced_hard": 15,
    "bounced_soft": 5,
    "complaints": 2,
    "unsubscribes": 15,
    "opens_human": 200,
    "opens_machine": 100,
    "clicks_human": 40,
    "clicks_machine": 10,
    "suppressed": 0,
    "delivery_rate": 0.980296,  # 995 / 1015
    "hard_bounce_rate": 0.014778,  # 15 / 1015: under 2%
    "soft_bounce_rate": 0.004926,
    "complaint_rate": 0.00201,  # 2 / 995
    "unsubscribe_rate": 0.015075,
    "open_rate_human": 0.201005,
    "click_rate_human": 0.040201,
    "warnings": ["complaint rate 0.20% is above Gmail's 0.1% target"],
    # No mail of this history was measured in aggregate: all of it is individual.
    "opens_human_individual": 200,
    "opens_machine_individual": 100,
    "clicks_human_individual": 40,
    "clicks_machine_individual": 10,
    "opens_human_aggregate": 0,
    "opens_machine_aggregate": 0,
    "clicks_human_aggregate": 0,
    "clicks_machine_aggregate": 0,
}


async def test_json_numbers_match_the_history(stores: Stores, config: Path) -> None:
    result = cli(config, "stats", "--since", "7d", "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["campaign"] for row in rows] == [None, "autumn", "spring"]
    none, autumn, spring = rows
    assert spring == SPRING
    assert autumn["sent"] == 105 and autumn["delivered"] == 100
    assert autumn["bounced_hard"] == 5 and autumn["complaints"] == 1
    assert autumn["warnings"] == [
        "complaint rate 1.00% is at or above Gmail's 0.3% limit",
        "hard bounce rate 4.76% is above 2%",
    ]
    assert none["sent"] == 10 and none["warnings"] == []
    assert none["complaint_rate"] == 0.0 and none["open_rate_human"] == 0.0

    everything = json.loads(cli(config, "stats", "--format", "json").stdout)
    assert [row["delivered"] for row in everything] == [10, 150, 995]  # last month's too


async def test_one_campaign_per_domain_text_and_csv(stores: Stores, config: Path) -> None:
    only = json.loads(cli(config, "stats", "--campaign", "spring", "--format", "json").stdout)
    assert only == [SPRING]

    by_domain = json.loads(cli(config, "stats", "--by", "domain", "--format", "json").stdout)
    assert [(row["domain"], row["sent"], row["opens_human"]) for row in by_domain] == [
        (None, 10, 0),
        ("news.shop.example", 155, 0),
        # Bounces, opens and the rest find the From domain through their message.
        ("shop.example", 1015, 200),
    ]

    text = cli(config, "stats", "--campaign", "autumn").stdout
    assert "autumn" in text and "WARNING: complaint rate 0.67%" in text  # 1 / 150
    assert "hard bounces 3.23%" in text  # 5 / 155, all time

    table = list(csv.DictReader(io.StringIO(cli(config, "stats", "--format", "csv").stdout)))
    assert [row["campaign"] for row in table] == ["", "autumn", "spring"]
    assert table[2]["opens_human"] == "200"
    assert table[2]["warnings"] == SPRING["warnings"][0]

    bad = cli(config, "stats", "--since", "soon")
    assert bad.returncode == 2 and "not an age" in bad.stderr


async def test_counts_outlive_retention_and_erasure_but_firsts_do_not(
    stores: Stores, tmp_path: Path
) -> None:
    before = await stores.statistics.report(Selection(campaign="spring"))
    await purge(stores.events, stores.suppressions, Retention(open=timedelta(seconds=1)))
    await stores.events.erase_recipient("spring-r0")
    after = await stores.statistics.report(Selection(campaign="spring"))
    assert [s.as_dict() for s in after] == [s.as_dict() for s in before]
    left = await stores.database.read(
        lambda db: db.execute("SELECT metric, COUNT(*) FROM stats_reach GROUP BY metric").fetchall()
    )
    opens_left = await stores.database.read(
        lambda db: db.execute("SELECT COUNT(*) FROM events WHERE type = 'open'").fetchone()
    )
    assert tuple(opens_left) == (0,)
    assert dict(left) == {"click_human": 39, "click_machine": 10}  # r0's click forgotten


async def test_events_already_there_are_counted_when_the_rollup_arrives(tmp_path: Path) -> None:
    from tracking.events import MIGRATIONS

    path = tmp_path / "data" / STORE_FILE
    database = await Database.open(path, MIGRATIONS[:1])  # the store before statistics
    load_or_create_secret(path.parent / HASH_KEY_FILE)
    await database.write(
        lambda db: db.execute(
            "INSERT INTO events (type, at, address_hash, campaign, machine)"
            " VALUES ('open', ?, 'h1', 'winter', 0), ('open', ?, 'h1', 'winter', 0),"
            " ('delivered', ?, 'h1', 'winter', NULL)",
            [RECENT, RECENT, RECENT],
        )
    )
    await database.close()
    async with Stores(Settings(storage=StorageSettings(tmp_path / "data"))) as opened:
        [winter] = await opened.statistics.report()
    assert (winter.campaign, winter.sent, winter.count("open_human_unique")) == ("winter", 1, 1)


async def test_series_per_day_for_a_chart(stores: Stores) -> None:
    series = await stores.statistics.series(Selection(campaign="autumn"))
    assert series.buckets == [OLD[:10], RECENT[:10]]
    assert series.lines["bounces"] == [0, 5]
    assert series.lines["complaints"] == [0, 1]
    hourly = await stores.statistics.series(Selection(campaign="spring"), hourly=True)
    assert hourly.buckets == [RECENT[:13]]
    assert hourly.lines["opens (human)"] == [200]
    assert hourly.lines["opens (machine)"] == [100]
    assert hourly.lines["clicks (human)"] == [40]


async def test_a_relayed_campaign_counts_per_sending_domain(
    relay: Relay, downstream: CaptureServer
) -> None:
    """Mail through a real relay: deliveries carry the From domain, and the open that
    follows is counted under it too."""
    recipients = ["kim@example.org", "lee@example.org"]
    message = newsletter(recipients, headers={"X-Optout-Campaign": "launch"})
    await asubmit(relay.addresses.smtp[1], message, "news@shop.example", recipients)
    await wait_for(lambda: len(downstream.handler.messages) == 2, what="two copies")
    html = body_of(parse(downstream.handler.messages[0].content), "html")
    pixel = re.search(r'src="(https://mail\.shop\.example/o/[^"]+)"', html)
    assert pixel
    async with (
        aiohttp.ClientSession() as http,
        http.get(local_url(relay, pixel.group(1))) as response,
    ):
        assert response.status == 200

    async def counted() -> bool:
        report = await relay.stores.statistics.report(Selection(group_by="domain"))
        return bool(report) and report[0].count("open_machine_unique") == 1

    await wait_for(counted, what="the open counted")
    [shop] = await relay.stores.statistics.report(Selection(group_by="domain"))
    assert shop.as_dict()["domain"] == "shop.example"
    assert (shop.sent, shop.delivered, shop.as_dict()["opens_machine"]) == (2, 2, 1)
    [launch] = await relay.stores.statistics.report(Selection(campaign="launch"))
    assert launch.sent == 2
