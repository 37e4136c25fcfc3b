"""A real browser, JavaScript off (Debian's headless Chromium driven by selenium): a recipient
stops tracking without unsubscribing, from the footer's preference page and from the
unsubscribe confirmation and done pages; the consent table in the SQLite file says so.

Screenshots under the test's tmp_path (`screenshots/*.png`); OPTOUT_ARTIFACTS=DIR copies them.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay.settings import Settings, SigningSettings, StorageSettings
from relay.stores import STORE_FILE, Stores
from tests.test_browser import CHROMEDRIVER, CHROMIUM, _check_screenshots
from tracking import RecipientRef, Signer, TrackingUrls, create_app

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip("needs Debian's chromium and chromium-driver", allow_module_level=True)
pytest.importorskip("selenium.webdriver", reason="needs selenium (pip)")
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.browser import wait_until_page_shows
from tests.test_browser import browser  # noqa: F401 - the fixture

KEYS = ("preferences-browser-key-0123456789",)
FAY, GUS, HAL = "fay@example.org", "gus@example.org", "hal@example.org"


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[Stores]:
    settings = Settings(storage=StorageSettings(tmp_path), signing=SigningSettings(KEYS))
    async with Stores(settings) as opened:
        await opened.suppressions.remember([FAY, GUS, HAL])
        yield opened


def states(tmp_path: Path, stores: Stores, address: str) -> list[tuple[str, str, str]]:
    """Straight from the SQLite file, through a connection of its own."""
    with sqlite3.connect(tmp_path / STORE_FILE) as db:
        return list(
            db.execute(
                "SELECT purpose, state, source FROM tracking_consent WHERE address_hash = ?"
                " ORDER BY purpose",
                [stores.suppressions.hasher.hash(address)],
            )
        )


async def test_stop_tracking_in_a_real_browser_without_javascript(
    aiohttp_server: Any,
    browser: WebDriver,  # noqa: F811 - the fixture imported above
    stores: Stores,
    tmp_path: Path,
) -> None:
    server = await aiohttp_server(
        create_app(
            stores.suppressions,
            stores.events,
            TrackingUrls("https://mail.shop.example", Signer(KEYS)),
            brand="Shop Example",
            tracking_withdrawal=True,
        )
    )
    urls = TrackingUrls(str(server.make_url("/")), Signer(KEYS))
    hasher = stores.suppressions.hasher
    shots = tmp_path / "screenshots"
    shots.mkdir()

    def unsubscribe_url(address: str) -> str:
        return urls.unsubscribe_url(RecipientRef(hasher.hash(address), "global", "spring", "Q1"))

    def shoot(name: str) -> None:
        path = shots / f"{name}.png"
        assert browser.save_screenshot(str(path))
        print(f"screenshot: {path}")

    def shows(expected: str) -> None:
        wait_until_page_shows(browser, expected)

    def press(label: str) -> None:
        [button] = [b for b in browser.find_elements(By.TAG_NAME, "button") if b.text == label]
        button.click()

    def javascript_is_off() -> None:
        browser.get("data:text/html,<title>off</title><script>document.title='on'</script>")
        assert browser.title == "off"

    await asyncio.to_thread(javascript_is_off)

    # fay: the footer's "Tracking preferences" link.
    def preference_page() -> None:
        browser.get(urls.preferences_url(unsubscribe_url(FAY)))
        shows("Tracking preferences")
        shoot("1-preferences")

    await asyncio.to_thread(preference_page)
    assert states(tmp_path, stores, FAY) == []  # looking changes nothing

    def stop_there() -> None:
        press("Stop tracking whether I open these emails")
        shows("Tracking stopped")
        shoot("2-stopped")
        browser.get(urls.preferences_url(unsubscribe_url(FAY)))
        shows("Tracking is off for you")
        shoot("3-preferences-off")

    await asyncio.to_thread(stop_there)
    assert states(tmp_path, stores, FAY) == [
        ("clicks", "withdrawn", "preferences"),
        ("opens", "withdrawn", "preferences"),
    ]

    # gus: the unsubscribe confirmation page, staying subscribed.
    def from_the_confirmation() -> None:
        browser.get(unsubscribe_url(GUS))
        shows("Unsubscribe?")
        shoot("4-confirm-with-offer")
        press("Stop tracking whether I open these emails")
        shows("Tracking stopped")

    await asyncio.to_thread(from_the_confirmation)
    assert [row[1:] for row in states(tmp_path, stores, GUS)] == [("withdrawn", "page")] * 2
    assert await stores.suppressions.check(GUS) is None  # still subscribed

    # hal: unsubscribes, then also stops tracking from the done page.
    def from_the_done_page() -> None:
        browser.get(unsubscribe_url(HAL))
        press("Unsubscribe")
        shows("You are unsubscribed")
        shoot("5-done-with-offer")
        press("Stop tracking whether I open these emails")
        shows("Tracking stopped")

    await asyncio.to_thread(from_the_done_page)
    assert [row[1] for row in states(tmp_path, stores, HAL)] == ["withdrawn", "withdrawn"]
    assert await stores.suppressions.check(HAL) is not None
    _check_screenshots(shots)
