"""Machine or person: recorded user agents and addresses of proxies, scanners and people's
mail clients (tests/data/machine_fetches.json), judged alone and through the real app."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay.settings import Settings, SigningSettings, StorageSettings
from relay.stores import Stores
from tracking import Judge, RecipientRef, Signer, TrackingUrls, create_app
from tracking.network import parse_ip
from tracking.state import TRACKING
from tracking.verdict import is_machine

DATA = json.loads((Path(__file__).parent / "data" / "machine_fetches.json").read_text())
MACHINES = DATA["machines"]
PEOPLE = DATA["people"]
KEYS = ("verdict-test-key-0123456789",)
AN_HOUR = 3600.0


def name(case: dict[str, Any]) -> str:
    return str(case["what"])


@pytest.mark.parametrize("case", MACHINES, ids=name)
def test_recorded_machines_get_the_machine_verdict_and_their_reason(case: dict[str, Any]) -> None:
    verdict = Judge().judge(case["user_agent"], parse_ip(case["ip"]), AN_HOUR)
    assert (verdict.machine, verdict.reason) == (True, case["reason"])


@pytest.mark.parametrize("case", PEOPLE, ids=name)
def test_recorded_people_are_people(case: dict[str, Any]) -> None:
    verdict = Judge().judge(case["user_agent"], parse_ip(case["ip"]), AN_HOUR)
    assert (verdict.machine, verdict.reason) == (False, "human")
    assert not is_machine(case["user_agent"])


@pytest.mark.parametrize("case", PEOPLE[:2], ids=name)
def test_seconds_after_delivery_even_a_person_agent_is_a_machine(case: dict[str, Any]) -> None:
    judge = Judge()
    assert judge.judge(case["user_agent"], parse_ip(case["ip"]), 3.0).reason == "too-fast"
    assert not judge.judge(case["user_agent"], parse_ip(case["ip"]), 10.0).machine


def test_head_requests_and_prefetches_are_machines() -> None:
    agent = PEOPLE[0]["user_agent"]
    assert Judge().judge(agent, None, AN_HOUR, head=True).reason == "head-request"
    assert Judge().judge(agent, None, AN_HOUR, prefetch=True).reason == "prefetch"


def test_operators_can_add_agents_and_networks() -> None:
    judge = Judge(
        agents={"AcmeScanner": "scanner:acme"},
        networks={"scanner:acme": ["192.0.2.0/24"]},
        fast_seconds=60,
    )
    person = PEOPLE[0]["user_agent"]
    assert judge.judge("AcmeScanner/2.0", None, AN_HOUR).reason == "scanner:acme"
    assert judge.judge(person, parse_ip("192.0.2.9"), AN_HOUR).reason == "scanner:acme"
    assert judge.judge(person, parse_ip("203.0.113.1"), 30).reason == "too-fast"


def test_the_agent_cache_stays_bounded() -> None:
    judge = Judge()
    for i in range(10_000):
        judge.agent_reason(f"Mozilla/5.0 client-{i}")
    assert len(judge._agent_cache) <= 4096


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[Stores]:
    settings = Settings(storage=StorageSettings(tmp_path), signing=SigningSettings(KEYS))
    async with Stores(settings) as opened:
        yield opened


async def test_recorded_fetches_through_the_app(aiohttp_client: Any, stores: Stores) -> None:
    """Each recorded fetch loads the pixel through a local reverse proxy (X-Forwarded-For)."""
    urls = TrackingUrls("https://mail.shop.example", Signer(KEYS))
    app = create_app(stores.suppressions, stores.events, urls, clock=lambda: time.time() + AN_HOUR)
    client = await aiohttp_client(app)
    cases = MACHINES + PEOPLE
    for index, case in enumerate(cases):
        ref = RecipientRef(f"hash-{index}", "global", "verdicts", f"Q{index}")
        headers = {"X-Forwarded-For": case["ip"]}
        if case["user_agent"] is not None:
            headers["User-Agent"] = case["user_agent"]
        else:
            headers["User-Agent"] = ""
        pixel = urls.pixel_url(ref).removeprefix(urls.public_url)
        response = await client.get(pixel, headers=headers, skip_auto_headers=["User-Agent"])
        assert response.status == 200
    await client.app[TRACKING].recorder.flush()
    recorded = {e["queue_id"]: e async for e in stores.events.export()}
    for index, case in enumerate(cases):
        event = recorded[f"Q{index}"]
        expected = (True, case["reason"]) if "reason" in case else (False, "human")
        assert (event["machine"], event["detail"]["reason"]) == expected, case["what"]
