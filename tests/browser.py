"""What the browser tests share: waiting for a page to say something."""

from __future__ import annotations

from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.wait import WebDriverWait


def wait_until_page_shows(browser: WebDriver, expected: str, within: float = 10.0) -> None:
    """Wait for the page to say `expected`. A form's POST navigates after click() returns,
    so the body read may belong to the page going away: Chromium then says the element is
    stale, missing, or (under load) that its node "does not belong to the document". Each
    is tried again until `within` seconds have passed."""
    WebDriverWait(browser, within, ignored_exceptions=(WebDriverException,)).until(
        lambda driver: expected in driver.find_element(By.TAG_NAME, "body").text
    )
