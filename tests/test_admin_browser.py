"""The dashboard in a real browser with JavaScript off (Debian's headless Chromium): a wrong
password refused, login, the campaign page and its chart (compared with a reference
screenshot), dark scheme, 420 px wide, an address's proof, a forged form that changes
nothing, logout.

Screenshots are saved under the test's tmp_path; OPTOUT_ARTIFACTS=DIR copies them to DIR.
OPTOUT_UPDATE_REFERENCE=1 writes the reference image anew (look at it before committing).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from relay.accounts import hash_password, verify_password
from relay.settings import Settings, StorageSettings
from relay.spool import Spool
from relay.stores import SPOOL_FILE, Stores
from suppression import Reason
from tests.helpers import PASSWORD
from tracking.admin import create_admin_app
from tracking.events import Event, EventType

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REFERENCE = Path(__file__).parent / "data" / "admin-campaign.png"
ADDRESS = "carl@example.org"
WIDTH, HEIGHT = 420, 900
# Pixels whose colour differs by more than NOTICEABLE (of 255) in a channel; at most this
# share of them may differ from the reference (font hinting, anti-aliasing).
NOTICEABLE = 48
TOLERANCE = 0.02

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        "needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip)")
from PIL import Image, ImageChops  # noqa: E402
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
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={WIDTH},{HEIGHT}",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs", {"profile.managed_default_content_settings.javascript": 2}
    )
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    # Headless windows have a minimum width; the page itself is laid out at a phone's.
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
    )
    try:
        yield driver
    finally:
        driver.quit()


# A week of one campaign: what people did each day after it went out on March 2.
DAYS = ["2026-03-02", "2026-03-03", "2026-03-04", "2026-03-05", "2026-03-06", "2026-03-07"]
HUMAN_OPENS = [40, 55, 30, 18, 10, 6]
MACHINE_OPENS = [45, 6, 3, 2, 1, 1]
CLICKS = [8, 14, 9, 5, 3, 1]
UNSUBSCRIBES = [1, 3, 2, 1, 0, 0]


def week() -> list[Event]:
    sent = {"reply": "250 2.0.0 Ok", "attempt": 1, "from_domain": "shop.example"}
    bounce = {"reply": "550 5.1.1 no such user", "attempt": 1, "from_domain": "shop.example"}
    events = [
        Event(EventType.DELIVERED, f"r{i}", "spring", "Q1", None, sent, f"{DAYS[0]}T08:00:00.000Z")
        for i in range(400)
    ]
    events += [
        Event(EventType.BOUNCED, f"b{i}", "spring", "Q1", None, bounce, f"{DAYS[0]}T08:00:00.000Z")
        for i in range(6)
    ]
    person = 0
    for day, humans, machines, clicks, unsubscribes in zip(
        DAYS, HUMAN_OPENS, MACHINE_OPENS, CLICKS, UNSUBSCRIBES, strict=True
    ):
        at = f"{day}T12:00:00.000Z"
        for _ in range(humans):
            events.append(Event(EventType.OPEN, f"r{person}", "spring", "Q1", False, {}, at))
            person += 1
        for n in range(machines):
            events.append(Event(EventType.OPEN, f"m{day}{n}", "spring", "Q1", True, {}, at))
        for n in range(clicks):
            events.append(
                Event(EventType.CLICK, f"r{person - 1 - n}", "spring", "Q1", False, {}, at)
            )
        for n in range(unsubscribes):
            events.append(Event(EventType.UNSUBSCRIBE, f"u{day}{n}", "spring", "Q1", None, {}, at))
    events.append(
        Event(EventType.COMPLAINT, "r3", "spring", "Q1", None, {}, f"{DAYS[1]}T09:00:00.000Z")
    )
    return events


@pytest.fixture
async def dashboard(aiohttp_server: Any, tmp_path: Path) -> AsyncIterator[tuple[str, Stores]]:
    async with Stores(Settings(storage=StorageSettings(tmp_path / "data"))) as stores:
        spool = await Spool.open(tmp_path / "data" / SPOOL_FILE)
        await stores.events.record(*week())
        await stores.suppressions.remember([ADDRESS])
        await stores.suppressions.add_hash(
            stores.suppressions.hasher.hash(ADDRESS),
            reason=Reason.UNSUBSCRIBE,
            source="one-click",
            detail={"method": "one-click", "scope": "global", "key_id": "k7f3"},
        )
        server = await aiohttp_server(
            create_admin_app(
                users={"ops": hash_password(PASSWORD)},
                check_password=verify_password,
                suppressions=stores.suppressions,
                statistics=stores.statistics,
                webhooks=stores.webhooks,
                queue=spool.entries,
            )
        )
        try:
            yield str(server.make_url("")).rstrip("/"), stores
        finally:
            await spool.close()


async def test_the_dashboard_in_a_browser_without_javascript(
    browser: WebDriver, dashboard: tuple[str, Stores], tmp_path: Path
) -> None:
    base, stores = dashboard
    shots = tmp_path / "screenshots"
    shots.mkdir()

    def shoot(name: str) -> Path:
        path = shots / f"{name}.png"
        assert browser.save_screenshot(str(path))
        print(f"screenshot: {path}")
        return path

    def shows(expected: str) -> None:
        wait_until_page_shows(browser, expected)

    def submit_login(password: str) -> None:
        browser.find_element(By.NAME, "username").send_keys("ops")
        browser.find_element(By.NAME, "password").send_keys(password)
        browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()

    def log_in() -> None:
        browser.get(base + "/")  # sent to the login page first
        shows("Log in")
        assert "/login" in browser.current_url
        submit_login("not the password")
        shows("Wrong username or password")
        shoot("1-wrong-password")
        submit_login(PASSWORD)
        shows("Campaigns")
        shoot("2-campaigns")

    await asyncio.to_thread(log_in)

    def campaign_page() -> tuple[Path, tuple[int, int, int, int]]:
        browser.find_element(By.LINK_TEXT, "spring").click()
        shows("Campaign: spring")
        svg = browser.find_element(By.CSS_SELECTOR, "figure.chart svg")
        assert svg.size["width"] > 300 and svg.size["height"] > 100
        box = (
            svg.location["x"],
            svg.location["y"],
            svg.location["x"] + svg.size["width"],
            svg.location["y"] + svg.size["height"],
        )
        legend = browser.find_element(By.CSS_SELECTOR, "figure.chart").text
        assert "opens (human)" in legend and "complaints" in legend
        assert "complaint rate" in browser.find_element(By.TAG_NAME, "body").text  # 1 of 394
        layout = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})
        # Usable at this width: wide tables scroll inside their box, not the page.
        assert layout["cssContentSize"]["width"] <= layout["cssLayoutViewport"]["clientWidth"]
        return shoot("3-campaign"), box

    campaign, chart_box = await asyncio.to_thread(campaign_page)
    _matches_reference(campaign, chart_box)

    def dark_scheme() -> Path:
        browser.execute_cdp_cmd(
            "Emulation.setEmulatedMedia",
            {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
        )
        browser.refresh()
        shows("Campaign: spring")
        return shoot("4-campaign-dark")

    dark = await asyncio.to_thread(dark_scheme)
    with Image.open(dark) as image:
        red, green, blue = image.convert("RGB").getpixel((WIDTH - 5, HEIGHT - 5))
        assert red + green + blue < 3 * 64, "the dark scheme's background is dark"

    def lookup() -> None:
        browser.find_element(By.LINK_TEXT, "Lookup").click()
        browser.find_element(By.NAME, "address").send_keys("Carl@Example.org")
        browser.find_element(By.CSS_SELECTOR, "main form button").click()
        shows("Proof")
        text = browser.find_element(By.TAG_NAME, "body").text
        assert "carl@example.org" in text and "one-click" in text and "k7f3" in text
        shoot("5-lookup")

    await asyncio.to_thread(lookup)

    def forged_form() -> None:
        """Another site's page posting to /suppress while we are logged in."""
        page = (
            f'<form method="post" action="{base}/suppress">'
            '<input name="address" value="victim@example.org"><button>Win</button></form>'
        )
        browser.get("data:text/html," + quote(page))
        browser.find_element(By.TAG_NAME, "button").click()
        shows("Log in first")  # the session cookie is SameSite: not sent from elsewhere
        shoot("6-forged-form")

    await asyncio.to_thread(forged_form)
    assert await stores.suppressions.check("victim@example.org") is None

    def log_out() -> None:
        browser.get(base + "/")
        shows("Campaigns")
        browser.find_element(By.XPATH, "//button[starts-with(., 'Log out')]").click()
        shows("Log in")
        browser.get(base + "/queue")
        shows("Log in")
        assert "/login" in browser.current_url
        shoot("7-logged-out")

    await asyncio.to_thread(log_out)
    _keep(shots)


def _matches_reference(shot: Path, chart: tuple[int, int, int, int]) -> None:
    """Like the reference, the whole page and the chart on its own; and not blank."""
    with Image.open(shot) as image:
        taken = image.convert("RGB")
    colours = taken.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 16, "the page looks blank"
    drawn = taken.crop(chart)
    # Saturated pixels: the lines' colours, not the greys of the axes and text.
    saturation = drawn.convert("HSV").getchannel("S")
    lines = sum(saturation.point(lambda v: 255 if v > 100 else 0).histogram()[255:])
    assert lines > 1000, f"the chart has {lines} coloured pixels: no lines drawn?"
    if os.environ.get("OPTOUT_UPDATE_REFERENCE"):
        REFERENCE.parent.mkdir(exist_ok=True)
        taken.save(REFERENCE)
    with Image.open(REFERENCE) as image:
        reference = image.convert("RGB")
    assert taken.size == reference.size
    for name, mine, theirs in (
        ("page", taken, reference),
        ("chart", drawn, reference.crop(chart)),
    ):
        difference = ImageChops.difference(mine, theirs).convert("L")
        changed = sum(difference.point(lambda v: 255 if v > NOTICEABLE else 0).histogram()[255:])
        share = changed / (mine.width * mine.height)
        assert share <= TOLERANCE, f"{share:.1%} of the {name}'s pixels differ from {REFERENCE}"


def _keep(shots: Path) -> None:
    target = os.environ.get("OPTOUT_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for path in shots.glob("*.png"):
            shutil.copy(path, Path(target) / path.name)
