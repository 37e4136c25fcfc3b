"""The rewritten HTML looks the same as the sender's above the footer, in a real browser.

Headless Chromium renders the original and the rewritten HTML part of each framework template of
the corpus; the screenshots must be identical, pixel for pixel, above the top of the injected
footer. Screenshots are kept under the test's tmp dir (test-artifacts/) for a look on failure.
"""

from __future__ import annotations

import html
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.rewrite import Decorations, build_template, list_unsubscribe_headers
from tests.corpus.check import PIXEL, UNSUB, VALUES, decoded_text, entities

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CORPUS = Path(__file__).parent / "corpus"
TEMPLATES = [
    "framework-mjml",
    "framework-cerberus",
    "framework-foundation",
    "framework-boilerplate-8bit",
    "framework-mailchimp-placeholder",
    "framework-react-email-minified",
    "framework-listmonk",
    "client-outlook-word",
    "client-gmail",
    "html-mso-conditional-body",
    "html-several-documents",
]
WIDTH, HEIGHT = 800, 2600

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        "needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)",
        allow_module_level=True,
    )
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="needs selenium (pip install selenium)"
)
Image = pytest.importorskip("PIL.Image", reason="needs pillow (pip install pillow)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    for argument in (
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
        # No network here: make every remote image and font fail at once, the same each time.
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={profile}",
        f"--window-size={WIDTH},{HEIGHT}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _html_of(raw: bytes) -> tuple[str, str]:
    part = next(e for e in entities(raw) if e.ctype == "text/html")
    return decoded_text(part), part.headers.get_content_charset() or "utf-8"


# The top of what the relay injected: its footer block and its pixel.
_INJECTED_TOP = """
const [link, pixel] = arguments;
const tops = [];
for (const img of document.images) {
  if (img.src === pixel) tops.push(img.getBoundingClientRect().top);
}
for (const a of document.links) {
  const box = a.parentElement;
  const style = box ? box.getAttribute('style') || '' : '';
  if (a.href === link && style.startsWith('margin:0;padding:16px'))
    tops.push(box.getBoundingClientRect().top);
}
return tops.length ? Math.min(...tops) : null;
"""


def _screenshot(driver: object, page: Path, shot: Path) -> tuple[object, float | None]:
    driver.get(page.as_uri())  # type: ignore[attr-defined]
    top = driver.execute_script(_INJECTED_TOP, UNSUB, PIXEL)  # type: ignore[attr-defined]
    driver.save_screenshot(str(shot))  # type: ignore[attr-defined]
    return Image.open(shot).convert("RGB"), top


@pytest.mark.parametrize("name", TEMPLATES)
def test_rewritten_html_renders_the_same_above_the_footer(
    browser: object, tmp_path: Path, name: str
) -> None:
    raw = (CORPUS / f"{name}.eml").read_bytes()
    out = build_template(raw, Decorations()).render(VALUES, list_unsubscribe_headers(UNSUB))
    artifacts = tmp_path / "test-artifacts"
    artifacts.mkdir()
    shots = []
    for label, message in (("original", raw), ("rewritten", out)):
        text, charset = _html_of(message)
        page = artifacts / f"{name}-{label}.html"
        # Opened as a file, the page has no Content-Type: give it the part's MIME charset.
        page.write_bytes(f'<meta charset="{html.escape(charset)}">'.encode() + text.encode(charset))
        shots.append(_screenshot(browser, page, artifacts / f"{name}-{label}.png"))
    (before, untouched_top), (after, top) = shots
    assert untouched_top is None
    assert top is not None, f"{name}: no injected footer or pixel found in the page"
    limit = int(min(top, HEIGHT))
    assert limit > 50, f"{name}: footer at {top}px, nothing above it to compare"
    box = (0, 0, WIDTH, limit)
    assert before.crop(box).tobytes() == after.crop(box).tobytes(), (  # type: ignore[attr-defined]
        f"{name}: the rendering above the footer changed; see {artifacts}"
    )
