"""The recipient-facing endpoint over real HTTP (aiohttp test server) and real SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from relay.app import Stores
from relay.config import Settings, SigningSettings, StorageSettings
from tracking import PIXEL_GIF, RecipientRef, Signer, TrackingUrls, create_app

KEYS = ("app-test-key-0123456789abcdef",)
ADDRESS = "carol@example.org"


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[Stores]:
    settings = Settings(storage=StorageSettings(tmp_path), signing=SigningSettings(KEYS))
    async with Stores(settings) as opened:
        yield opened


@pytest.fixture
def urls() -> TrackingUrls:
    return TrackingUrls("https://mail.shop.example", Signer(KEYS))


@pytest.fixture
async def client(aiohttp_client: Any, stores: Stores, urls: TrackingUrls) -> TestClient:
    return await aiohttp_client(create_app(stores.suppressions, stores.events, urls))


def ref(stores: Stores, scope: str = "global") -> RecipientRef:
    return RecipientRef(stores.suppressions.hasher.hash(ADDRESS), scope, "spring", "Q1")


def path(url: str) -> str:
    return url.removeprefix("https://mail.shop.example")


async def events(stores: Stores) -> list[dict[str, Any]]:
    return [e async for e in stores.events.export()]


async def test_one_click_urlencoded_suppresses_at_once_without_redirect(
    client: TestClient, stores: Stores, urls: TrackingUrls
) -> None:
    await stores.suppressions.remember([ADDRESS])
    url = path(urls.unsubscribe_url(ref(stores)))
    response = await client.post(
        url,
        data="List-Unsubscribe=One-Click",
        allow_redirects=False,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status == 200
    assert "Location" not in response.headers
    assert "Set-Cookie" not in response.headers
    found = await stores.suppressions.check(ADDRESS)
    assert found is not None
    assert (found.address, found.reason, found.source) == (ADDRESS, "unsubscribe", "one-click")
    [event] = await events(stores)
    assert (event["type"], event["recipient"], event["campaign"]) == (
        "unsubscribe",
        ADDRESS,
        "spring",
    )


async def test_one_click_multipart_is_accepted_and_idempotent(
    client: TestClient, stores: Stores, urls: TrackingUrls
) -> None:
    url = path(urls.unsubscribe_url(ref(stores)))
    for _ in range(3):
        form = aiohttp.FormData(default_to_multipart=True)  # what Gmail sends
        form.add_field("List-Unsubscribe", "One-Click")
        response = await client.post(url, data=form, allow_redirects=False)
        assert response.status == 200
        assert "multipart/form-data" in response.request_info.headers["Content-Type"]
    assert await stores.suppressions.check(ADDRESS) is not None
    assert [e["type"] for e in await events(stores)] == ["unsubscribe"]


async def test_get_and_head_show_a_page_and_never_suppress(
    client: TestClient, stores: Stores, urls: TrackingUrls
) -> None:
    url = path(urls.unsubscribe_url(ref(stores)))
    page = await client.get(url)
    assert page.status == 200
    html = await page.text()
    assert '<form method="post">' in html
    assert "<script" not in html
    head = await client.head(url)
    assert head.status == 200
    assert await stores.suppressions.check(ADDRESS) is None
    assert await events(stores) == []
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]


async def test_confirm_button_suppresses_in_the_token_scope(
    client: TestClient, stores: Stores, urls: TrackingUrls
) -> None:
    url = path(urls.unsubscribe_url(ref(stores, scope="topic:news")))
    response = await client.post(url, data={"confirm": "yes"})
    assert response.status == 200
    assert "unsubscribed" in (await response.text()).lower()
    assert await stores.suppressions.check(ADDRESS) is None
    found = await stores.suppressions.check(ADDRESS, ["topic:news"])
    assert found is not None
    assert found.source == "page"


async def test_post_without_one_click_body_is_refused(
    client: TestClient, stores: Stores, urls: TrackingUrls
) -> None:
    url = path(urls.unsubscribe_url(ref(stores)))
    response = await client.post(url, data={"List-Unsubscribe": "Maybe"})
    assert response.status == 400
    assert await stores.suppressions.check(ADDRESS) is None


@pytest.mark.parametrize(
    "mangle",
    [
        # Not the last character: its spare base64 bits may decode to the same signature.
        lambda t: t[:-5] + ("A" if t[-5] != "A" else "B") + t[-4:],
        lambda t: t.split(".")[0],
        lambda t: "",
        lambda t: "x" * 5000,
    ],
)
async def test_forged_unsubscribe_tokens_change_nothing(
    client: TestClient, stores: Stores, urls: TrackingUrls, mangle: Any
) -> None:
    token = urls.unsubscribe_url(ref(stores)).rsplit("/", 1)[1]
    response = await client.post(f"/u/{mangle(token)}", data={"List-Unsubscribe": "One-Click"})
    assert response.status in (404, 405)
    assert await stores.suppressions.list() == []


async def test_token_from_another_key_or_kind_is_refused(
    client: TestClient, stores: Stores, urls: TrackingUrls
) -> None:
    foreign = TrackingUrls("https://mail.shop.example", Signer(["another-key-0123456789abcdef"]))
    response = await client.post(
        path(foreign.unsubscribe_url(ref(stores))), data={"List-Unsubscribe": "One-Click"}
    )
    assert response.status == 404
    # An open token is signed for another purpose: it cannot unsubscribe.
    open_token = urls.pixel_url(ref(stores)).rsplit("/", 1)[1].removesuffix(".gif")
    response = await client.post(f"/u/{open_token}", data={"List-Unsubscribe": "One-Click"})
    assert response.status == 404
    assert await stores.suppressions.list() == []


async def test_old_key_still_verifies_after_rotation(aiohttp_client: Any, stores: Stores) -> None:
    old = TrackingUrls("https://mail.shop.example", Signer(["old-key-0123456789abcdef"]))
    rotated = TrackingUrls(
        "https://mail.shop.example",
        Signer(["new-key-0123456789abcdef", "old-key-0123456789abcdef"]),
    )
    client = await aiohttp_client(create_app(stores.suppressions, stores.events, rotated))
    response = await client.post(
        path(old.unsubscribe_url(ref(stores))), data={"List-Unsubscribe": "One-Click"}
    )
    assert response.status == 200
    assert await stores.suppressions.check(ADDRESS) is not None


async def test_pixel_always_answers_the_image_and_records_only_valid_opens(
    client: TestClient, stores: Stores, urls: TrackingUrls
) -> None:
    good = path(urls.pixel_url(ref(stores)))
    for url, agent in [
        (good, "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Thunderbird/128.0"),
        (
            good,
            "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0"
            " (via ggpht.com GoogleImageProxy)",
        ),
        ("/o/forged.gif", "Mozilla/5.0"),
        ("/o/" + "A" * 300 + ".gif", "Mozilla/5.0"),
    ]:
        response = await client.get(url, headers={"User-Agent": agent})
        assert response.status == 200
        assert response.headers["Content-Type"] == "image/gif"
        assert "no-store" in response.headers["Cache-Control"]
        assert await response.read() == PIXEL_GIF
    opens = await events(stores)
    assert [(e["type"], e["machine"]) for e in opens] == [("open", False), ("open", True)]


async def test_healthz(client: TestClient) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
