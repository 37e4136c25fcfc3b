"""The recipient-facing endpoint over real HTTP (aiohttp test server) and real SQLite.

RFC 8058 point by point, the body link's pages, topics, opens, and the operator's routes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from relay.settings import Settings, SigningSettings, StorageSettings
from relay.stores import STORE_FILE, Stores
from tests.helpers import wait_for
from tracking import PIXEL_GIF, RateLimit, RecipientRef, Signer, TrackingUrls, create_app
from tracking.state import TRACKING

KEYS = ("app-test-key-0123456789abcdef",)
ADDRESS = "carol@example.org"
ONE_CLICK = {"List-Unsubscribe": "One-Click"}
AN_HOUR_LATER: Callable[[], float] = lambda: time.time() + 3600  # noqa: E731
HUMAN_AGENT = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Thunderbird/128.0"

Client = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[Stores]:
    settings = Settings(storage=StorageSettings(tmp_path), signing=SigningSettings(KEYS))
    async with Stores(settings) as opened:
        await opened.suppressions.remember([ADDRESS])
        yield opened


@pytest.fixture
def urls() -> TrackingUrls:
    return TrackingUrls("https://mail.shop.example", Signer(KEYS))


@pytest.fixture
def make_client(aiohttp_client: Any, stores: Stores, urls: TrackingUrls) -> Client:
    async def make(**options: Any) -> TestClient[Any, Any]:
        app = create_app(stores.suppressions, stores.events, options.pop("urls", urls), **options)
        client: TestClient[Any, Any] = await aiohttp_client(app)
        return client

    return make


@pytest.fixture
async def client(make_client: Client) -> TestClient[Any, Any]:
    return await make_client()


def ref(stores: Stores, scope: str = "global", queue_id: str = "Q1") -> RecipientRef:
    return RecipientRef(stores.suppressions.hasher.hash(ADDRESS), scope, "spring", queue_id)


def path(url: str) -> str:
    return url.removeprefix("https://mail.shop.example")


async def events(stores: Stores, client: TestClient[Any, Any] | None = None) -> list[Any]:
    if client is not None:
        await client.app[TRACKING].recorder.flush()  # opens and clicks are written in batches
    return [e async for e in stores.events.export()]


# --- RFC 8058 one-click -------------------------------------------------------------------


async def test_one_click_urlencoded_suppresses_at_once_without_redirect(
    client: TestClient[Any, Any], stores: Stores, urls: TrackingUrls, tmp_path: Path
) -> None:
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
    # At once: committed before the answer, visible to another connection to the file.
    with sqlite3.connect(tmp_path / STORE_FILE) as db:
        rows = db.execute("SELECT scope, reason, source FROM suppressions").fetchall()
    assert rows == [("global", "unsubscribe", "one-click")]
    found = await stores.suppressions.check(ADDRESS)
    assert found is not None and found.address == ADDRESS
    [event] = await events(stores)
    assert (event["type"], event["recipient"], event["campaign"], event["queue_id"]) == (
        "unsubscribe",
        ADDRESS,
        "spring",
        "Q1",
    )
    assert event["detail"]["method"] == "one-click"
    assert event["detail"]["scope"] == "global"


async def test_one_click_multipart_as_gmail_sends_it_is_idempotent(
    client: TestClient[Any, Any], stores: Stores, urls: TrackingUrls
) -> None:
    url = path(urls.unsubscribe_url(ref(stores)))
    for _ in range(3):
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("List-Unsubscribe", "One-Click")
        response = await client.post(url, data=form, allow_redirects=False)
        assert response.status == 200
        assert "multipart/form-data" in response.request_info.headers["Content-Type"]
    assert await stores.suppressions.count() == 1
    assert [e["type"] for e in await events(stores)] == ["unsubscribe"]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-www-form-urlencoded; charset=utf-8", b"List-Unsubscribe=One-Click"),
        ("application/x-www-form-urlencoded", b"List-Unsubscribe=One-Click\r\n"),
        ("text/plain", b"List-Unsubscribe=One-Click"),
        (None, b"List-Unsubscribe=One-Click"),
    ],
)
async def test_one_click_body_variants_clients_send(
    client: TestClient[Any, Any],
    stores: Stores,
    urls: TrackingUrls,
    content_type: str | None,
    body: bytes,
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = await client.post(
        path(urls.unsubscribe_url(ref(stores))), data=body, headers=headers
    )
    assert response.status == 200
    assert await stores.suppressions.check(ADDRESS) is not None


async def test_one_click_needs_no_cookie_login_origin_or_csrf_token(
    client: TestClient[Any, Any], stores: Stores, urls: TrackingUrls
) -> None:
    # A cross-site POST from a webmail origin, with a stray cookie: none of it matters.
    response = await client.post(
        path(urls.unsubscribe_url(ref(stores))),
        data=ONE_CLICK,
        headers={
            "Origin": "https://mail.google.com",
            "Referer": "https://mail.google.com/",
            "Cookie": "session=unrelated",
            "Sec-Fetch-Site": "cross-site",
        },
        allow_redirects=False,
    )
    assert response.status == 200
    assert await stores.suppressions.check(ADDRESS) is not None


async def test_one_click_applies_the_token_scope(
    client: TestClient[Any, Any], stores: Stores, urls: TrackingUrls
) -> None:
    response = await client.post(
        path(urls.unsubscribe_url(ref(stores, "topic:news"))), data=ONE_CLICK
    )
    assert response.status == 200
    assert await stores.suppressions.check(ADDRESS) is None
    found = await stores.suppressions.check(ADDRESS, ["topic:news"])
    assert found is not None and found.scope == "topic:news"
    [event] = await events(stores)
    assert event["detail"]["scope"] == "topic:news"


async def test_the_event_names_the_key_that_signed_the_token_never_the_key(
    make_client: Client, stores: Stores
) -> None:
    old_key, new_key = "old-key-0123456789abcdef", "new-key-0123456789abcdef"
    old = TrackingUrls("https://mail.shop.example", Signer([old_key]))
    rotated = TrackingUrls("https://mail.shop.example", Signer([new_key, old_key]))
    client = await make_client(urls=rotated)
    response = await client.post(path(old.unsubscribe_url(ref(stores))), data=ONE_CLICK)
    assert response.status == 200
    [event] = await events(stores)
    assert event["detail"]["key_id"] == rotated.key_ids[1] == old.key_ids[0]
    assert old_key not in json.dumps(event)
    # The audit log keeps the same proof with the suppression.
    record = await stores.suppressions.show(ADDRESS)
    assert any((h.detail or {}).get("key_id") == old.key_ids[0] for h in record.history), (
        record.history
    )


@pytest.mark.parametrize("days", [61, 366])
async def test_an_old_unsubscribe_link_still_opts_out(
    client: TestClient[Any, Any],
    stores: Stores,
    urls: TrackingUrls,
    monkeypatch: pytest.MonkeyPatch,
    days: int,
) -> None:
    """CASL asks 60 days, CAN-SPAM 30, our contract a year: a link from mail sent 61 days (or
    a year and a day) ago still works, one-click and page alike."""
    signed_at = int(time.time()) - days * 86400
    monkeypatch.setattr(time, "time", lambda: float(signed_at))
    token_url = urls.unsubscribe_url(ref(stores))
    monkeypatch.undo()
    assert urls.check_unsubscribe(token_url.rpartition("/")[2]).signed_at == signed_at
    page = await client.get(path(token_url))
    assert page.status == 200 and "<button" in await page.text()
    response = await client.post(path(token_url), data=ONE_CLICK, allow_redirects=False)
    assert response.status == 200
    found = await stores.suppressions.check(ADDRESS)
    assert found is not None and found.reason == "unsubscribe"
    [event] = await events(stores)
    assert (event["type"], event["detail"]["method"]) == ("unsubscribe", "one-click")


@pytest.mark.parametrize("data", [{"List-Unsubscribe": "Maybe"}, {}, {"list-unsubscribe": "x"}])
async def test_post_without_the_one_click_body_changes_nothing(
    client: TestClient[Any, Any], stores: Stores, urls: TrackingUrls, data: dict[str, str]
) -> None:
    response = await client.post(path(urls.unsubscribe_url(ref(stores))), data=data)
    assert response.status == 400
    assert await stores.suppressions.count() == 0


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-5] + ("A" if t[-5] != "A" else "B") + t[-4:],
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # spare base64 bits: still refused
        lambda t: t.split(".")[0],
        lambda t: t + "x",
        lambda t: "",
        lambda t: "x" * 5000,
    ],
)
async def test_forged_unsubscribe_tokens_change_nothing(
    client: TestClient[Any, Any], stores: Stores, urls: TrackingUrls, mangle: Any
) -> None:
    token = urls.unsubscribe_url(ref(stores)).rsplit("/", 1)[1]
    response = await client.post(f"/u/{mangle(token)}", data=ONE_CLICK)
    assert response.status in (404, 405)
    assert await stores.suppressions.count() == 0


async def test_token_from_another_key_or_kind_is_refused(
    client: TestClient[Any, Any], stores: Stores, urls: TrackingUrls
) -> None:
    foreign = TrackingUrls("https://mail.shop.example", Signer(["another-key-0123456789abcdef"]))
    response = await client.post(path(foreign.unsubscribe_url(ref(stores))), data=ONE_CLICK)
    assert response.status == 404
    open_token = urls.pixel_url(ref(stores)).rsplit("/", 1)[1].removesuffix(".gif")
    response = await client.post(f"/u/{open_token}", data=ONE_CLICK)
    assert response.status == 404
    assert await stores.suppressions.count() == 0


async def test_get_head_and_prefetch_show_a_page_and_never_suppress(
    client: TestClient[Any, Any], stores: Stores, urls: TrackingUrls
) -> None:
    url = path(urls.unsubscribe_url(ref(stores)))
    page = await client.get(url)
    assert page.status == 200
    html = await page.text()
    assert '<form method="post">' in html
    assert "<script" not in html
    assert (await client.head(url)).status == 200
    prefetch = await client.get(url, headers={"Sec-Purpose": "prefetch", "Purpose": "prefetch"})
    assert prefetch.status == 200
    assert await stores.suppressions.count() == 0
    assert await events(stores) == []
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert "no-store" in page.headers["Cache-Control"]


# --- the body link's pages ------------------------------------------------------------------


async def test_page_has_one_button_and_is_accessible_without_javascript(
    client: TestClient[Any, Any], stores: Stores, urls: TrackingUrls
) -> None:
    html = await (await client.get(path(urls.unsubscribe_url(ref(stores))))).text()
    assert html.count("<button") == 1
    assert '<html lang="en">' in html
    assert 'name="viewport"' in html
    assert "<script" not in html and "onclick" not in html
    assert "<h1>" in html


async def test_confirm_suppresses_and_the_done_page_says_so(
    client: TestClient[Any, Any], stores: Stores, urls: TrackingUrls
) -> None:
    response = await client.post(path(urls.unsubscribe_url(ref(stores))), data={"confirm": "yes"})
    assert response.status == 200
    html = await response.text()
    assert "You are unsubscribed" in html
    found = await stores.suppressions.check(ADDRESS)
    assert found is not None and found.source == "page"
    [event] = await events(stores)
    assert event["detail"]["method"] == "page"


async def test_topic_page_offers_just_this_topic_or_everything(
    client: TestClient[Any, Any], stores: Stores, urls: TrackingUrls
) -> None:
    url = path(urls.unsubscribe_url(ref(stores, "topic:news")))
    html = await (await client.get(url)).text()
    assert 'name="scope" value="topic" checked' in html
    assert 'name="scope" value="all"' in html
    assert html.count("<button") == 1
    # "Just this topic" (the default).
    assert (await client.post(url, data={"confirm": "yes", "scope": "topic"})).status == 200
    assert await stores.suppressions.check(ADDRESS) is None
    assert await stores.suppressions.check(ADDRESS, ["topic:news"]) is not None
    # "Everything from this sender".
    response = await client.post(url, data={"confirm": "yes", "scope": "all"})
    assert "marketing email" in await response.text()
    found = await stores.suppressions.check(ADDRESS)
    assert found is not None and found.scope == "global"
    unsubscribes = [e for e in await events(stores) if e["type"] == "unsubscribe"]
    assert [e["detail"]["scope"] for e in unsubscribes] == ["topic:news", "global"]
    assert unsubscribes[1]["detail"]["token_scope"] == "topic:news"


async def test_global_page_offers_no_topic_choice(
    client: TestClient[Any, Any], stores: Stores, urls: TrackingUrls
) -> None:
    html = await (await client.get(path(urls.unsubscribe_url(ref(stores))))).text()
    assert 'name="scope"' not in html


async def test_done_page_undo_resubscribes_through_the_same_token(
    client: TestClient[Any, Any], stores: Stores, urls: TrackingUrls
) -> None:
    url = path(urls.unsubscribe_url(ref(stores, "topic:news")))
    done = await (await client.post(url, data={"confirm": "yes", "scope": "all"})).text()
    assert 'name="undo" value="yes"' in done
    assert await stores.suppressions.check(ADDRESS) is not None
    response = await client.post(url, data={"undo": "yes", "scope": "all"})
    assert response.status == 200
    assert "subscribed again" in await response.text()
    assert await stores.suppressions.check(ADDRESS, ["topic:news"]) is None


async def test_undo_never_lifts_what_the_page_did_not_make(
    client: TestClient[Any, Any], stores: Stores, urls: TrackingUrls
) -> None:
    from suppression import Reason

    await stores.suppressions.add(ADDRESS, reason=Reason.COMPLAINT, source="fbl")
    response = await client.post(path(urls.unsubscribe_url(ref(stores))), data={"undo": "yes"})
    assert response.status == 409
    assert await stores.suppressions.check(ADDRESS) is not None


async def test_undo_expires(make_client: Client, stores: Stores, urls: TrackingUrls) -> None:
    client = await make_client(clock=lambda: time.time() + 2 * 3600)
    url = path(urls.unsubscribe_url(ref(stores)))
    await client.post(url, data={"confirm": "yes"})
    response = await client.post(url, data={"undo": "yes"})
    assert response.status == 409
    assert await stores.suppressions.check(ADDRESS) is not None


async def test_operator_templates_override_ours_and_brand_shows(
    make_client: Client, stores: Stores, urls: TrackingUrls, tmp_path: Path
) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "base.html").write_text(
        '<!doctype html><html lang="de"><title>{{ brand }}</title>'
        '<body class="acme">{% block content %}{% endblock %}</body></html>'
    )
    client = await make_client(template_dir=templates, brand="Acme & Söhne")
    html = await (await client.get(path(urls.unsubscribe_url(ref(stores))))).text()
    assert '<body class="acme">' in html
    assert "Acme &amp; Söhne" in html
    assert "<button" in html  # our confirm.html inside their base.html


async def test_invalid_link_page(client: TestClient[Any, Any]) -> None:
    response = await client.get("/u/not-a-token")
    assert response.status == 404
    assert "not valid" in await response.text()


# --- opens ---------------------------------------------------------------------------------


async def test_pixel_always_answers_the_image_and_records_only_valid_opens(
    make_client: Client, stores: Stores, urls: TrackingUrls
) -> None:
    client = await make_client(clock=AN_HOUR_LATER)
    good = path(urls.pixel_url(ref(stores)))
    for url, agent in [
        (good, HUMAN_AGENT),
        (
            good,
            "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0"
            " (via ggpht.com GoogleImageProxy)",
        ),
        ("/o/forged.gif", HUMAN_AGENT),
        ("/o/" + "A" * 300 + ".gif", HUMAN_AGENT),
        (path(urls.unsubscribe_url(ref(stores))).replace("/u/", "/o/") + ".gif", HUMAN_AGENT),
    ]:
        response = await client.get(url, headers={"User-Agent": agent})
        assert response.status == 200
        assert response.headers["Content-Type"] == "image/gif"
        assert "no-store" in response.headers["Cache-Control"]
        assert await response.read() == PIXEL_GIF
    opens = await events(stores, client)
    assert [(e["type"], e["machine"], e["detail"]["reason"]) for e in opens] == [
        ("open", False, "human"),
        ("open", True, "google-image-proxy"),
    ]
    assert opens[0]["recipient"] == ADDRESS
    assert (opens[0]["campaign"], opens[0]["queue_id"]) == ("spring", "Q1")


async def test_an_open_seconds_after_delivery_is_a_machine(
    client: TestClient[Any, Any], stores: Stores, urls: TrackingUrls
) -> None:
    await client.get(path(urls.pixel_url(ref(stores))), headers={"User-Agent": HUMAN_AGENT})
    [event] = await events(stores, client)
    assert (event["machine"], event["detail"]["reason"]) == (True, "too-fast")


async def test_no_ip_or_user_agent_is_kept_unless_configured(
    make_client: Client, stores: Stores, urls: TrackingUrls
) -> None:
    client = await make_client(clock=AN_HOUR_LATER)
    url = path(urls.pixel_url(ref(stores)))
    await client.get(url, headers={"User-Agent": HUMAN_AGENT, "X-Forwarded-For": "203.0.113.77"})
    [event] = await events(stores, client)
    assert set(event["detail"]) == {"reason"}
    assert "203.0.113" not in json.dumps(event) and "Thunderbird" not in json.dumps(event)


async def test_configured_ip_is_truncated_and_agent_kept(
    make_client: Client, stores: Stores, urls: TrackingUrls
) -> None:
    client = await make_client(clock=AN_HOUR_LATER, store_ip=True, store_user_agent=True)
    # The test client connects from 127.0.0.1, a trusted proxy by default: the forwarded
    # address is the client's, and what a client puts before it is not believed.
    for copy, forwarded in enumerate(("198.51.100.1, 203.0.113.77", "2001:db8:1234:5678::9")):
        url = path(urls.pixel_url(ref(stores, queue_id=f"Q{copy}")))
        await client.get(url, headers={"User-Agent": HUMAN_AGENT, "X-Forwarded-For": forwarded})
    first, second = await events(stores, client)
    assert first["detail"]["ip"] == "203.0.113.0/24"
    assert second["detail"]["ip"] == "2001:db8:1234::/48"
    assert first["detail"]["user_agent"] == HUMAN_AGENT
    assert "198.51.100" not in json.dumps([first, second])


async def test_durable_mode_commits_before_answering(
    make_client: Client, stores: Stores, urls: TrackingUrls
) -> None:
    client = await make_client(durable_events=True)
    await client.get(path(urls.pixel_url(ref(stores))))
    assert [e["type"] for e in await events(stores)] == ["open"]  # no flush needed


async def test_buffered_opens_are_written_when_the_app_stops(
    aiohttp_client: Any, stores: Stores, urls: TrackingUrls
) -> None:
    client = await aiohttp_client(create_app(stores.suppressions, stores.events, urls))
    for copy in range(50):
        await client.get(path(urls.pixel_url(ref(stores, queue_id=f"Q{copy}"))))
    await client.close()  # runs the app's cleanup: the recorder writes what it holds
    assert len(await events(stores)) == 50


# --- operations ----------------------------------------------------------------------------


async def test_healthz(client: TestClient[Any, Any]) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.text() == "ok\n"


async def test_metrics_count_requests_opens_unsubscribes_and_bad_tokens(
    make_client: Client, stores: Stores, urls: TrackingUrls
) -> None:
    client = await make_client(clock=AN_HOUR_LATER)
    await client.get(path(urls.pixel_url(ref(stores))), headers={"User-Agent": HUMAN_AGENT})
    await client.get("/o/forged.gif")
    await client.post(path(urls.unsubscribe_url(ref(stores))), data=ONE_CLICK)
    await client.app[TRACKING].recorder.flush()
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    for line in [
        'optout_http_requests_total{method="GET",route="pixel",status="200"} 2.0',
        'optout_http_requests_total{method="POST",route="unsubscribe",status="200"} 1.0',
        'optout_opens_total{machine="false",reason="human"} 1.0',
        'optout_unsubscribes_total{method="one-click",scope="global"} 1.0',
        'optout_bad_tokens_total{route="pixel"} 1.0',
        "optout_events_written_total 1.0",
    ]:
        assert line in text, line
    assert "optout_errors_total" in text


async def test_pixel_answers_are_counted_once_by_method_with_every_header(
    make_client: Client, stores: Stores, urls: TrackingUrls
) -> None:
    client = await make_client(clock=AN_HOUR_LATER)
    url = path(urls.pixel_url(ref(stores)))
    for response in [await client.get(url), await client.head(url), await client.get(url)]:
        assert response.status == 200
        assert response.headers["Content-Type"] == "image/gif"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert response.headers.getall("Content-Security-Policy") == [
            response.headers["Content-Security-Policy"]
        ]  # once: the response hook adds nothing to the pixel's own set
    text = await (await client.get("/metrics")).text()
    assert 'optout_http_requests_total{method="GET",route="pixel",status="200"} 2.0' in text
    assert 'optout_http_requests_total{method="HEAD",route="pixel",status="200"} 1.0' in text
    await client.app[TRACKING].recorder.flush()
    assert "optout_events_written_total 3.0" in await (await client.get("/metrics")).text()


async def test_metrics_registry_is_per_app(make_client: Client) -> None:
    first, second = await make_client(), await make_client()
    await first.get("/healthz")
    text = await (await second.get("/metrics")).text()
    assert 'route="healthz"' not in text


async def test_metrics_are_refused_to_the_internet(client: TestClient[Any, Any]) -> None:
    # Through the local proxy for a client on the internet: not the operator's network.
    response = await client.get("/metrics", headers={"X-Forwarded-For": "203.0.113.5"})
    assert response.status == 404


@pytest.mark.parametrize(
    "forwarded",
    [
        # The client's own line first, the proxy's own line after it (HAProxy's forwardfor).
        [("X-Forwarded-For", "127.0.0.1"), ("X-Forwarded-For", "203.0.113.5")],
        # Hops the proxy passed on that are no address: the client is unknown, not the proxy.
        [("X-Forwarded-For", "garbage")],
        [("X-Forwarded-For", "unknown, 127.0.0.1")],
        [("X-Forwarded-For", "203.0.113.5,,")],
        [("X-Forwarded-For", "")],
    ],
)
async def test_metrics_stay_closed_whatever_the_client_forwards(
    client: TestClient[Any, Any], forwarded: list[tuple[str, str]]
) -> None:
    assert (await client.get("/metrics")).status == 200  # the operator, on loopback
    response = await client.get("/metrics", headers=forwarded)
    assert response.status == 404


async def test_the_proxy_line_names_the_client_however_many_lines_come(
    make_client: Client, stores: Stores, urls: TrackingUrls
) -> None:
    """A client rotating a forged first line is still one client, kept by the network its
    proxy saw; one sending garbage is an unknown client, limited like the others."""
    client = await make_client(
        rate_limit=RateLimit(per_minute=6, burst=2), clock=AN_HOUR_LATER, store_ip=True
    )
    url = path(urls.unsubscribe_url(ref(stores)))
    statuses = []
    for forged in ("198.51.100.1", "198.51.100.2", "198.51.100.3"):
        headers = [("X-Forwarded-For", forged), ("X-Forwarded-For", "203.0.113.9")]
        statuses.append((await client.post(url, data={"confirm": "yes"}, headers=headers)).status)
    assert statuses == [200, 200, 429]
    statuses = []
    for garbage in ("x", "y", "z"):
        headers = {"X-Forwarded-For": garbage}
        statuses.append((await client.post(url, data={"confirm": "yes"}, headers=headers)).status)
    assert statuses == [200, 200, 429]
    two_lines = [("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "203.0.113.9")]
    pixel = path(urls.pixel_url(ref(stores, queue_id="Q1")))
    await client.get(pixel, headers=[("User-Agent", HUMAN_AGENT), *two_lines])
    pixel = path(urls.pixel_url(ref(stores, queue_id="Q2")))
    await client.get(pixel, headers={"User-Agent": HUMAN_AGENT, "X-Forwarded-For": "garbage"})
    opens = [e for e in await events(stores, client) if e["type"] == "open"]
    assert [e["detail"].get("ip") for e in opens] == ["203.0.113.0/24", None]


async def test_security_headers_on_every_kind_of_answer(
    client: TestClient[Any, Any], stores: Stores, urls: TrackingUrls
) -> None:
    for response in [
        await client.get(path(urls.pixel_url(ref(stores)))),
        await client.get("/u/bad"),
        await client.get("/nowhere"),
        await client.get("/healthz"),
    ]:
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


async def test_request_bodies_are_limited(
    client: TestClient[Any, Any], stores: Stores, urls: TrackingUrls
) -> None:
    body = "List-Unsubscribe=One-Click&pad=" + "x" * 100_000
    response = await client.post(
        path(urls.unsubscribe_url(ref(stores))),
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status == 413
    assert await stores.suppressions.count() == 0


async def test_state_changing_posts_are_rate_limited_per_client(
    make_client: Client, stores: Stores, urls: TrackingUrls
) -> None:
    client = await make_client(rate_limit=RateLimit(per_minute=6, burst=3))
    url = path(urls.unsubscribe_url(ref(stores)))
    me = {"X-Forwarded-For": "203.0.113.9"}
    statuses = [(await client.post(url, data={"confirm": "yes"}, headers=me)).status]
    statuses += [(await client.post("/u/forged", data=ONE_CLICK, headers=me)).status]
    statuses += [(await client.post(url, data={"confirm": "yes"}, headers=me)).status]
    assert statuses == [200, 404, 200]
    refused = await client.post(url, data={"confirm": "yes"}, headers=me)
    assert refused.status == 429
    assert int(refused.headers["Retry-After"]) >= 1
    # Another client is not held back; pages (GET) never are.
    other = await client.post(url, data={"confirm": "yes"}, headers={"X-Forwarded-For": "::1:2"})
    assert other.status == 200
    assert (await client.get(url, headers=me)).status == 200


async def test_one_click_from_a_shared_provider_address_is_limited_per_recipient(
    make_client: Client, stores: Stores, urls: TrackingUrls
) -> None:
    """A provider's one-click POSTs for many recipients share a few addresses: none of them
    is refused; one recipient's token replayed is."""
    client = await make_client(rate_limit=RateLimit(per_minute=6, burst=3))
    google = {"X-Forwarded-For": "209.85.220.41"}
    recipients = [f"user{i}@example.org" for i in range(10)]
    await stores.suppressions.remember(recipients)
    for address in recipients:
        token_ref = RecipientRef(stores.suppressions.hasher.hash(address), "global", "c", "Q")
        response = await client.post(
            path(urls.unsubscribe_url(token_ref)), data=ONE_CLICK, headers=google
        )
        assert response.status == 200
    assert await stores.suppressions.count() == 10
    url = path(urls.unsubscribe_url(ref(stores)))
    replays = [(await client.post(url, data=ONE_CLICK, headers=google)).status for _ in range(4)]
    assert replays == [200, 200, 200, 429]


async def test_failing_event_writes_never_break_the_pixel_and_healthz_says_so(
    client: TestClient[Any, Any], stores: Stores, urls: TrackingUrls, tmp_path: Path
) -> None:
    pixel = path(urls.pixel_url(ref(stores)))
    with sqlite3.connect(tmp_path / STORE_FILE) as db:  # the table goes away under the app
        db.execute("ALTER TABLE events RENAME TO events_away")
    response = await client.get(pixel)
    assert response.status == 200 and await response.read() == PIXEL_GIF
    await client.app[TRACKING].recorder.flush()
    assert (await client.get("/healthz")).status == 503
    metrics = await (await client.get("/metrics")).text()
    assert 'optout_errors_total{where="event-write"} 1.0' in metrics
    assert "optout_events_dropped_total 1.0" in metrics
    with sqlite3.connect(tmp_path / STORE_FILE) as db:
        db.execute("ALTER TABLE events_away RENAME TO events")
    await client.get(pixel)
    await client.app[TRACKING].recorder.flush()
    assert (await client.get("/healthz")).status == 200
    assert len(await events(stores)) == 1


async def test_past_the_high_water_mark_the_pixel_waits_for_the_writer_and_loses_nothing(
    make_client: Client, stores: Stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests faster than their events can be written (more HTTP processes than the
    writer keeps up with): past the mark a pixel is answered once its open is written."""
    import asyncio

    import tracking.opens
    import tracking.recorder

    monkeypatch.setattr(tracking.opens, "HIGH_WATER", 3)
    monkeypatch.setattr(tracking.recorder, "HIGH_WATER", 3)
    monkeypatch.setattr(tracking.recorder, "PACE_WAIT", 60.0)
    client = await make_client(clock=AN_HOUR_LATER)
    recorder = client.app[TRACKING].recorder
    urls = TrackingUrls("https://mail.shop.example", Signer(KEYS))
    pixels = [path(urls.pixel_url(ref(stores, queue_id=f"Q{n}"))) for n in range(10)]
    blocker = sqlite3.connect(tmp_path / STORE_FILE, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the writer waits (its busy timeout is 5 s)
    try:
        fetches = [
            asyncio.create_task(client.get(url, headers={"User-Agent": HUMAN_AGENT}))
            for url in pixels
        ]
        await wait_for(lambda: recorder.waiting == 10, what="ten opens waiting")
        await wait_for(lambda: sum(f.done() for f in fetches) >= 3, what="three answers")
        assert sum(f.done() for f in fetches) == 3  # the rest wait for the writer
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    answers = await asyncio.gather(*fetches)
    assert [answer.status for answer in answers] == [200] * 10
    await recorder.flush()
    assert len([e for e in await events(stores) if e["type"] == "open"]) == 10
