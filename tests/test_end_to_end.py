"""The whole path through real sockets: submit, personalise, deliver, one-click, refuse."""

from __future__ import annotations

import base64
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from relay.app import Relay
from relay.stores import Stores
from tests.helpers import (
    CaptureServer,
    StartRelay,
    asubmit,
    body_of,
    local_url,
    newsletter,
    parse,
    relay_settings,
    wait_for,
)

ALICE = "alice@example.org"
BOB = "bob@example.org"


async def test_two_recipients_get_their_own_copies_and_one_click_stops_the_next(
    relay: Relay, downstream: CaptureServer
) -> None:
    port = relay.addresses.smtp[1]
    message = newsletter([ALICE, BOB], headers={"X-Optout-Campaign": "spring-2026"})
    message["List-Unsubscribe"] = "<mailto:unsubscribe@shop.example>"
    result = await asubmit(port, message, "news@shop.example", [ALICE, BOB])
    assert result.refused == {}

    handler = downstream.handler
    await wait_for(lambda: len(handler.messages) == 2, what="two personalised copies")
    copies = {m.recipients[0]: parse(m.content) for m in handler.messages}
    assert set(copies) == {ALICE, BOB}
    assert all(m.mail_from == "news@shop.example" for m in handler.messages)

    unsubscribe_urls = {}
    for address, copy in copies.items():
        # Exactly one of each list header, the sender's own replaced, control headers gone.
        assert len(copy.get_all("List-Unsubscribe")) == 1
        assert copy.get_all("List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"]
        assert copy.get("X-Optout-Campaign") is None
        match = re.fullmatch(
            r"<(https://mail\.shop\.example/u/[\w.\-]+)>", copy["List-Unsubscribe"]
        )
        assert match, copy["List-Unsubscribe"]
        url = match.group(1)
        unsubscribe_urls[address] = url
        # The visible link in both bodies, the pixel in the HTML.
        text, html = body_of(copy, "plain"), body_of(copy, "html")
        assert "Our spring sale starts today." in text
        assert url in text
        assert f'href="{url}"' in html
        pixel = re.search(r'<img src="(https://mail\.shop\.example/o/[\w.\-]+\.gif)"', html)
        assert pixel, html
        assert html.index(pixel.group(0)) < html.lower().rindex("</body>")
        # No address, plain or base64-decoded, anywhere in the URLs.
        for part in url.split("/")[-1].split("."):
            decoded = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
            assert b"example.org" not in decoded.lower()
        assert address not in url
    assert unsubscribe_urls[ALICE] != unsubscribe_urls[BOB]

    async with aiohttp.ClientSession() as http:
        # A scanner's GET shows the page and changes nothing.
        async with http.get(local_url(relay, unsubscribe_urls[ALICE])) as page:
            assert page.status == 200
            assert "Unsubscribe" in await page.text()
        assert await relay.stores.suppressions.check(ALICE) is None
        # The mail client's RFC 8058 one-click POST.
        async with http.post(
            local_url(relay, unsubscribe_urls[ALICE]),
            data={"List-Unsubscribe": "One-Click"},
            allow_redirects=False,
        ) as response:
            assert response.status == 200
    suppression = await relay.stores.suppressions.check(ALICE)
    assert suppression is not None
    assert (suppression.reason, suppression.source) == ("unsubscribe", "one-click")

    handler.messages.clear()
    again = await asubmit(port, newsletter([ALICE, BOB]), "news@shop.example", [ALICE, BOB])
    assert again.refused[ALICE][0] == 550
    assert again.refused[ALICE][1].startswith(b"5.7.1")
    assert BOB not in again.refused
    await wait_for(lambda: len(handler.messages) == 1, what="the copy for bob")
    assert handler.messages[0].recipients == [BOB]

    # The copy reaches the downstream before the relay has read its 250 and written the
    # delivered event: wait for the event, not only for the copy.
    events: list[dict[str, Any]] = []

    async def bob_delivered_twice() -> bool:
        events[:] = [e async for e in relay.stores.events.export()]
        return sum(e["type"] == "delivered" and e["recipient"] == BOB for e in events) == 2

    await wait_for(bob_delivered_twice, what="bob's second delivered event")
    kinds = [(e["type"], e["recipient"]) for e in events]
    assert kinds.count(("delivered", ALICE)) == 1
    assert kinds.count(("delivered", BOB)) == 2
    assert ("unsubscribe", ALICE) in kinds
    unsubscribe = next(e for e in events if e["type"] == "unsubscribe")
    assert unsubscribe["campaign"] == "spring-2026"
    assert unsubscribe["detail"]["method"] == "one-click"


async def test_tracked_clicks_redirect_only_to_the_signed_url(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    settings = relay_settings(tmp_path / "data", downstream.port)
    settings = replace(settings, tracking=replace(settings.tracking, clicks=True))
    relay = await start_relay(settings)
    message = newsletter([ALICE])
    html = message.get_body(("html",))
    assert html is not None
    html.set_content(
        '<html><body><a href="https://shop.example/spring?x=1&amp;y=2">Shop</a>'
        '<a href="mailto:help@shop.example">Help</a></body></html>',
        subtype="html",
    )
    await asubmit(relay.addresses.smtp[1], message, "news@shop.example", [ALICE])
    await wait_for(lambda: len(downstream.handler.messages) == 1, what="the copy")
    body = body_of(parse(downstream.handler.messages[0].content), "html")
    [click] = re.findall(r'href="(https://mail\.shop\.example/c/[^"]+)"', body)
    assert 'href="mailto:help@shop.example"' in body
    async with aiohttp.ClientSession() as http:
        async with http.get(local_url(relay, click), allow_redirects=False) as response:
            assert response.status in (302, 303, 307)
            assert response.headers["Location"] == "https://shop.example/spring?x=1&y=2"
        forged = click[:-3] + ("AAA" if not click.endswith("AAA") else "BBB")
        async with http.get(local_url(relay, forged), allow_redirects=False) as response:
            assert response.status == 404
            assert "Location" not in response.headers
    await relay.stop()
    clicks = [e for e in await _events(tmp_path) if e["type"] == "click"]
    assert len(clicks) == 1


async def _events(tmp_path: Path) -> list[dict[str, object]]:
    async with Stores(relay_settings(tmp_path / "data", None)) as stores:
        return [e async for e in stores.events.export()]
