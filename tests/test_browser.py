"""A real browser, JavaScript off: Debian's headless Chromium driven by selenium opens the body
link, sees the page, confirms, and the address is suppressed in the SQLite file; the done
page's undo lifts it again.

Screenshots of every page are saved under the test's tmp_path (`screenshots/*.png`, printed
on the way); set OPTOUT_ARTIFACTS=DIR to also copy them to DIR.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.settings import Settings, SigningSettings, StorageSettings
from relay.stores import STORE_FILE, Stores
from tracking import RecipientRef, Signer, TrackingUrls, create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
KEYS = ("browser-test-key-0123456789",)
ADDRESS = "erin@example.org"

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        "needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver):"
        " apt-get install -y chromium chromium-driver",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip)")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402

from tests.browser import wait_until_page_shows  # noqa: E402


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=420,900",  # a phone-sized window: the page must work there
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs", {"profile.managed_default_content_settings.javascript": 2}
    )
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[Stores]:
    settings = Settings(storage=StorageSettings(tmp_path), signing=SigningSettings(KEYS))
    async with Stores(settings) as opened:
        await opened.suppressions.remember([ADDRESS])
        yield opened


def suppressed_scopes(tmp_path: Path) -> list[str]:
    """Straight from the SQLite file, through a connection of its own."""
    with sqlite3.connect(tmp_path / STORE_FILE) as db:
        return [row[0] for row in db.execute("SELECT scope FROM suppressions ORDER BY scope")]


async def test_body_link_in_a_real_browser_without_javascript(
    aiohttp_server: Any, browser: WebDriver, stores: Stores, tmp_path: Path
) -> None:
    server = await aiohttp_server(
        create_app(
            stores.suppressions,
            stores.events,
            TrackingUrls("https://mail.shop.example", Signer(KEYS)),
            brand="Shop Example",
        )
    )
    urls = TrackingUrls(str(server.make_url("/")), Signer(KEYS))
    ref = RecipientRef(stores.suppressions.hasher.hash(ADDRESS), "topic:news", "spring", "Q1")
    shots = tmp_path / "screenshots"
    shots.mkdir()

    def shoot(name: str) -> None:
        path = shots / f"{name}.png"
        assert browser.save_screenshot(str(path))
        print(f"screenshot: {path}")

    def shows(expected: str) -> None:
        wait_until_page_shows(browser, expected)

    # Selenium blocks: it runs in a thread while the event loop serves the pages.
    def javascript_is_off() -> None:
        browser.get("data:text/html,<title>off</title><script>document.title='on'</script>")
        assert browser.title == "off"

    await asyncio.to_thread(javascript_is_off)

    def open_page() -> None:
        browser.get(urls.unsubscribe_url(ref))
        shows("Unsubscribe?")
        shoot("1-confirm")

    await asyncio.to_thread(open_page)
    assert suppressed_scopes(tmp_path) == []  # looking changes nothing

    def confirm_everything() -> None:
        browser.find_element(By.CSS_SELECTOR, 'input[name="scope"][value="all"]').click()
        buttons = browser.find_elements(By.TAG_NAME, "button")
        assert len(buttons) == 1
        buttons[0].click()
        shows("You are unsubscribed")
        shoot("2-done")

    await asyncio.to_thread(confirm_everything)
    assert suppressed_scopes(tmp_path) == ["global"]
    found = await stores.suppressions.check(ADDRESS)
    assert found is not None and found.source == "page"

    def undo() -> None:
        browser.find_element(By.TAG_NAME, "button").click()
        shows("subscribed again")
        shoot("3-undone")

    await asyncio.to_thread(undo)
    assert suppressed_scopes(tmp_path) == []

    def invalid_link() -> None:
        browser.get(urls.unsubscribe_url(ref)[:-6] + "AAAAAA")
        shows("not valid")
        shoot("4-invalid")

    await asyncio.to_thread(invalid_link)
    _check_screenshots(shots)


def _check_screenshots(shots: Path) -> None:
    from PIL import Image

    for path in sorted(shots.glob("*.png")):
        with Image.open(path) as image:
            assert image.width >= 300 and image.height >= 300
            colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
            assert colours is None or len(colours) > 2, f"{path} looks blank"
    target = os.environ.get("OPTOUT_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for path in shots.glob("*.png"):
            shutil.copy(path, Path(target) / path.name)
