"""Click tracking: which links are rewritten, byte-for-byte elsewhere, and a redirect that only
ever goes to the exact URL signed for the message (through the real app and SQLite)."""

from __future__ import annotations

import email
import email.policy
import html
import re
import time
from collections.abc import AsyncIterator
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.pipeline import Pipeline
from relay.rewrite import Decorations, Hole, LinkHole, build_template
from relay.settings import Settings, SigningSettings, StorageSettings
from relay.stores import Stores
from suppression import AddressHasher
from tracking import Namespace, RecipientRef, Signer, TrackingUrls, create_app
from tracking.state import TRACKING

KEYS = ("clicks-test-key-0123456789",)
BASE = "https://mail.shop.example"
URLS = TrackingUrls(BASE, Signer(KEYS))
HASHER = AddressHasher(b"h" * 32)
ALICE = "alice@example.org"
HUMAN = "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0"

HTML = """<!doctype html><html><body>
<p><a href="https://shop.example/sale?utm=mail&amp;id=7">Sale</a></p>
<p><A HREF='https://shop.example/shoes'>Shoes</A> <a href=https://shop.example/bags>Bags</a></p>
<p><a href="https://shop.example/private" data-optout-notrack>Account</a></p>
<p><a href="mailto:help@shop.example">Mail us</a> <a href="tel:+4912345">Call</a>
<a href="#top">Top</a> <a href="/relative">Relative</a> <a name="x">Anchor</a></p>
<p><a href="%unsubscribe_url%">Leave the list</a></p>
<!--[if mso]><a href="https://shop.example/outlook-only">O</a><![endif]-->
<map><area href="https://shop.example/map" alt="map"></map>
<p><a href=" https://shop.example/caf\u00e9?q=a b ">Caf\u00e9</a></p>
</body></html>
"""
TRACKED = [
    "https://shop.example/sale?utm=mail&id=7",
    "https://shop.example/shoes",
    "https://shop.example/bags",
    "https://shop.example/map",
    "https://shop.example/caf%C3%A9?q=a%20b",
]


def message(html_body: str = HTML, headers: dict[str, str] | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Shop <news@shop.example>"
    msg["To"] = ALICE
    msg["Subject"] = "Sale"
    for key, value in (headers or {}).items():
        msg[key] = value
    msg.set_content("Sale at https://shop.example/sale\n")
    msg.add_alternative(html_body, subtype="html", cte="quoted-printable")
    return msg.as_bytes().replace(b"\n", b"\r\n")


def parts(raw: bytes) -> tuple[str, str]:
    parsed: Message = email.message_from_bytes(raw, policy=email.policy.compat32)
    found = {}
    for part in parsed.walk():
        if part.get_content_maintype() == "text":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            found[part.get_content_subtype()] = payload.decode(part.get_content_charset("ascii"))
    return found["plain"], found["html"]


def click_urls(html_text: str) -> list[str]:
    found = re.findall(
        r"""(?i)href\s*=\s*(["'])(https://mail\.shop\.example/c/[^"']+)\1""", html_text
    )
    return [html.unescape(url) for _, url in found]


def test_only_trackable_links_become_holes_in_document_order() -> None:
    template = build_template(message(), Decorations(clicks=True))
    assert list(template.links) == TRACKED
    assert Hole.CLICK_URL in template.holes
    assert any("5 links tracked" in note for note in template.notes), template.notes


def test_everything_but_the_tracked_hrefs_stays_as_it_was() -> None:
    raw = message()
    values: dict[Any, str] = {Hole.UNSUBSCRIBE_URL: f"{BASE}/u/T", Hole.PIXEL_URL: f"{BASE}/o/P"}
    plain_off, html_off = parts(build_template(raw, Decorations()).render(values))
    tracked = build_template(raw, Decorations(clicks=True))
    for index in range(len(tracked.links)):
        values[LinkHole(index)] = f"{BASE}/c/R/L{index}"
    plain_on, html_on = parts(tracked.render(values))
    assert plain_on == plain_off  # text parts are never rewritten
    expected = html_off
    for index, (old, quoted) in enumerate(
        [
            ('"https://shop.example/sale?utm=mail&amp;id=7"', True),
            ("'https://shop.example/shoes'", True),
            ("https://shop.example/bags", False),
            ('"https://shop.example/map"', True),
            ('" https://shop.example/caf\u00e9?q=a b "', True),
        ]
    ):
        new = f"{BASE}/c/R/L{index}"
        quote = old[0] if quoted else '"'
        expected = expected.replace(old, f"{quote}{new}{quote}", 1)
    assert html_on == expected
    for untouched in ("mailto:", "tel:", 'href="#top"', "/relative", "outlook-only", "private"):
        assert untouched in html_on
    assert f'href="{BASE}/u/T"' in html_on  # the placeholder became the unsubscribe link


def test_clicks_are_off_by_default_and_with_tracking_off() -> None:
    assert build_template(message(), Decorations()).links == ()
    pipeline = Pipeline(clicks=True)
    for headers in ({"X-Optout-Track": "off"}, {"X-Optout-Category": "transactional"}):
        prepared = pipeline.prepare("Q", "news@shop.example", message(headers=headers))
        assert prepared.template.links == ()
    assert Pipeline().prepare("Q", "news@shop.example", message()).template.links == ()


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[Stores]:
    settings = Settings(storage=StorageSettings(tmp_path), signing=SigningSettings(KEYS))
    async with Stores(settings) as opened:
        await opened.suppressions.remember([ALICE])
        yield opened


@pytest.fixture
async def client(aiohttp_client: Any, stores: Stores) -> TestClient[Any, Any]:
    app = create_app(stores.suppressions, stores.events, URLS, clock=lambda: time.time() + 3600)
    result: TestClient[Any, Any] = await aiohttp_client(app)
    return result


def local(url: str) -> str:
    return url.removeprefix(BASE)


async def clicks(client: TestClient[Any, Any], stores: Stores) -> list[dict[str, Any]]:
    await client.app[TRACKING].recorder.flush()
    return [e async for e in stores.events.export() if e["type"] == "click"]


async def test_a_personalised_copy_redirects_to_exactly_the_senders_urls(
    client: TestClient[Any, Any], stores: Stores
) -> None:
    prepared = Pipeline(clicks=True).prepare("QID-1", "news@shop.example", message())
    copy = prepared.personalise(ALICE, URLS, stores.suppressions.hasher)
    found = click_urls(parts(copy)[1])
    assert len(found) == len(TRACKED)
    for url, destination in zip(found, TRACKED, strict=True):
        response = await client.get(
            local(url), allow_redirects=False, headers={"User-Agent": HUMAN}
        )
        assert response.status == 302
        assert response.headers["Location"] == destination
        assert "no-store" in response.headers["Cache-Control"]
        assert response.headers["Referrer-Policy"] == "no-referrer"
    recorded = await clicks(client, stores)
    assert [e["detail"]["url"] for e in recorded] == TRACKED
    assert all(e["recipient"] == ALICE and e["queue_id"] == "QID-1" for e in recorded)
    assert all(e["machine"] is False for e in recorded)


async def test_each_recipient_gets_own_click_urls_sharing_the_link_half(stores: Stores) -> None:
    prepared = Pipeline(clicks=True).prepare("QID-2", "news@shop.example", message())
    first = click_urls(parts(prepared.personalise(ALICE, URLS, HASHER))[1])
    second = click_urls(parts(prepared.personalise("bob@example.org", URLS, HASHER))[1])
    assert [u.rsplit("/", 1)[1] for u in first] == [u.rsplit("/", 1)[1] for u in second]
    assert first[0].split("/")[-2] != second[0].split("/")[-2]


def flip(token: str, at: int) -> str:
    return token[:at] + ("A" if token[at] != "A" else "B") + token[at + 1 :]


async def test_tampered_or_mixed_click_urls_redirect_nowhere(
    client: TestClient[Any, Any], stores: Stores
) -> None:
    ref = RecipientRef(HASHER.hash(ALICE), "global", "c", "QID-3")
    good = local(URLS.click_url(ref, "https://shop.example/sale"))
    _, _, recipient, link = good.split("/")
    other_message = URLS.link_token("QID-OTHER", "https://evil.example/")
    forged_link = Signer(["attacker-key-0123456789"]).sign(
        Namespace.LINK, ["QID-3", "https://evil.example/"]
    )
    for bad in [
        f"/c/{recipient}/{flip(link, 10)}",
        f"/c/{flip(recipient, 10)}/{link}",
        f"/c/{recipient}/{other_message}",
        f"/c/{recipient}/{forged_link}",
        f"/c/{link}/{recipient}",
        f"/c/{recipient}/{link}x",
        f"/c/{recipient}/https:%2F%2Fevil.example",
        "/c/x/y",
    ]:
        response = await client.get(bad, allow_redirects=False)
        assert response.status == 404, bad
        assert "Location" not in response.headers
    assert await clicks(client, stores) == []


async def test_even_a_signed_non_web_url_is_never_a_redirect(
    client: TestClient[Any, Any], stores: Stores
) -> None:
    ref = RecipientRef(HASHER.hash(ALICE), "global", "c", "QID-4")
    for url in (
        "javascript:alert(1)",
        "https://shop.example/\r\nSet-Cookie: x=1",
        "//evil.example",
    ):
        response = await client.get(local(URLS.click_url(ref, url)), allow_redirects=False)
        assert response.status == 404
        assert "Location" not in response.headers


async def test_scanner_clicks_still_redirect_but_are_machines(
    client: TestClient[Any, Any], stores: Stores
) -> None:
    ref = RecipientRef(HASHER.hash(ALICE), "global", "c", "QID-5")
    url = local(URLS.click_url(ref, "https://shop.example/sale"))
    scanner = await client.get(
        url,
        allow_redirects=False,
        headers={"User-Agent": "Mozilla/5.0", "X-Forwarded-For": "40.107.22.9"},
    )
    head = await client.head(url, allow_redirects=False, headers={"User-Agent": HUMAN})
    assert scanner.status == head.status == 302
    recorded = await clicks(client, stores)
    assert [(e["machine"], e["detail"]["reason"]) for e in recorded] == [
        (True, "apple-mpp"),
        (True, "head-request"),
    ]


FRAGMENTS = [
    '<a href="https://shop.example/a?x=1&amp;y=2">A</a>',
    "<a href='https://shop.example/b'>B</a>",
    "<a href=https://shop.example/c>C</a>",
    '<a data-optout-notrack href="https://shop.example/d">D</a>',
    '<a href="mailto:a@shop.example">M</a>',
    '<a href="#x">X</a>',
    '<a href="%unsubscribe_url%">U</a>',
    '<!-- <a href="https://shop.example/commented">no</a> -->',
    '<!--[if mso]><a href="https://shop.example/mso">O</a><![endif]-->',
    "<script>var a = '<a href=\"https://shop.example/js\">';</script>",
    '<area href="https://shop.example/area">',
    '<a title="x > y" href="https://shop.example/e">E</a>',
    "<p>Text &amp; more</p>",
    '<a href="https://shop.example/f" href="https://shop.example/dup">F</a>',
    '<a HREF = "https://shop.example/g" >G</a>',
]
HREF_VALUE = re.compile(r"""(?i)(href\s*=\s*)("[^"]*"|'[^']*'|[^\s>"']+)""")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=12))
def test_click_rewriting_changes_hrefs_and_nothing_else(fragments: list[str]) -> None:
    body = "<html><body>\n" + "\n".join(fragments) + "\n</body></html>\n"
    raw = message(body)
    values: dict[Any, str] = {Hole.UNSUBSCRIBE_URL: f"{BASE}/u/T", Hole.PIXEL_URL: f"{BASE}/o/P"}
    off = parts(build_template(raw, Decorations()).render(values))[1]
    tracked = build_template(raw, Decorations(clicks=True))
    for index in range(len(tracked.links)):
        values[LinkHole(index)] = f"{BASE}/c/R/L{index}"
    on = parts(tracked.render(values))[1]
    assert HREF_VALUE.sub(r"\1", on) == HREF_VALUE.sub(r"\1", off)
    assert len(click_urls(on)) == len(tracked.links)
    # Exactly the links a browser would follow that may be tracked, in document order.
    expected = [
        url
        for fragment in fragments
        for url in {
            FRAGMENTS[0]: ["https://shop.example/a?x=1&y=2"],
            FRAGMENTS[1]: ["https://shop.example/b"],
            FRAGMENTS[2]: ["https://shop.example/c"],
            FRAGMENTS[10]: ["https://shop.example/area"],
            FRAGMENTS[11]: ["https://shop.example/e"],
            FRAGMENTS[13]: ["https://shop.example/f"],
            FRAGMENTS[14]: ["https://shop.example/g"],
        }.get(fragment, [])
    ]
    assert list(tracked.links) == expected
