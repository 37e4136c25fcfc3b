"""10,000 random and bit-flipped tokens against every route of the real app: nothing changes
in the SQLite store, no request fails with a server error, and nothing crashes."""

from __future__ import annotations

import asyncio
import logging
import random
import string
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from relay.settings import Settings, SigningSettings, StorageSettings
from relay.stores import Stores
from tracking import PIXEL_GIF, RateLimit, RecipientRef, Signer, TrackingUrls, create_app
from tracking.state import TRACKING

KEYS = ("fuzz-test-key-0123456789abcdef",)
BASE = "https://mail.shop.example"
URLS = TrackingUrls(BASE, Signer(KEYS))
TOKENS = 10_000
ALPHABET = string.ascii_letters + string.digits + "-_."
ODD = "/%?#&=+ \\\"'<>é\u2028\x00\x7f"


def genuine() -> list[str]:
    ref = RecipientRef("fuzz-recipient-hash", "topic:news", "fuzz", "QFUZZ")
    click = URLS.click_url(ref, "https://shop.example/sale").split("/c/")[1].split("/")
    return [
        URLS.unsubscribe_url(ref).rsplit("/", 1)[1],
        URLS.pixel_url(ref).rsplit("/", 1)[1].removesuffix(".gif"),
        *click,
    ]


def mutants(rng: random.Random, count: int) -> list[str]:
    """Half bit flips (one to three bits, any byte) of genuine tokens of every kind; half
    random strings, mostly of the token alphabet, some with characters that need quoting."""
    bases = genuine()
    out: list[str] = []
    while len(out) < count // 2:
        raw = bytearray(rng.choice(bases).encode())
        for _ in range(rng.randint(1, 3)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        token = raw.decode("latin-1")
        if token not in bases:
            out.append(token)
    while len(out) < count:
        size = rng.choice([0, 1, 5, 20, 60, 90, 150, 400])
        chars = ALPHABET if rng.random() < 0.8 else ALPHABET + ODD
        out.append("".join(rng.choice(chars) for _ in range(size)))
    rng.shuffle(out)
    return out


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[Stores]:
    settings = Settings(storage=StorageSettings(tmp_path), signing=SigningSettings(KEYS))
    async with Stores(settings) as opened:
        yield opened


async def test_random_and_bit_flipped_tokens_change_nothing(
    aiohttp_client: Any, stores: Stores, caplog: pytest.LogCaptureFixture
) -> None:
    unlimited = RateLimit(per_minute=1e9, burst=10**9)  # every token must reach the check
    app = create_app(stores.suppressions, stores.events, URLS, rate_limit=unlimited)
    client: TestClient[Any, Any] = await aiohttp_client(app)
    rng = random.Random(8058)
    tokens = mutants(rng, TOKENS)
    link = genuine()[3]
    gate = asyncio.Semaphore(32)
    statuses: dict[str, set[int]] = {}

    async def hit(index: int, token: str) -> None:
        quoted = quote(token, safe="")
        route = ("unsubscribe-get", "unsubscribe-post", "pixel", "click")[index % 4]
        async with gate:
            if route == "unsubscribe-get":
                response = await client.get(URL(f"/u/{quoted}", encoded=True))
            elif route == "unsubscribe-post":
                response = await client.post(
                    URL(f"/u/{quoted}", encoded=True),
                    data={"List-Unsubscribe": "One-Click", "confirm": "yes"},
                    allow_redirects=False,
                )
            elif route == "pixel":
                response = await client.get(URL(f"/o/{quoted}.gif", encoded=True))
            else:
                halves = (f"{quoted}/{link}", f"{link}/{quoted}")[index % 8 // 4]
                response = await client.get(
                    URL(f"/c/{halves}", encoded=True), allow_redirects=False
                )
            body = await response.read()
        statuses.setdefault(route, set()).add(response.status)
        assert response.status < 500, (route, token)
        assert "Location" not in response.headers, (route, token)
        if route == "pixel" and response.status == 200:
            assert body == PIXEL_GIF

    with caplog.at_level(logging.ERROR):
        await asyncio.gather(*(hit(i, t) for i, t in enumerate(tokens)))
    await client.app[TRACKING].recorder.flush()

    assert statuses["pixel"] <= {200, 404}  # 404 only where the path is no pixel path at all
    assert 200 not in statuses["unsubscribe-post"]
    assert 302 not in statuses["click"]
    assert await stores.suppressions.count() == 0
    assert [e async for e in stores.events.export()] == []
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    metrics = await (await client.get("/metrics")).text()
    assert "optout_errors_total" not in metrics.replace("# HELP optout_errors_total", "").replace(
        "# TYPE optout_errors_total", ""
    )
    # The app still works for a genuine token afterwards.
    ref = RecipientRef("after-hash", "global", "fuzz", "QAFTER")
    response = await client.post(
        URLS.unsubscribe_url(ref).removeprefix(BASE), data={"List-Unsubscribe": "One-Click"}
    )
    assert response.status == 200
    assert await stores.suppressions.count() == 1
