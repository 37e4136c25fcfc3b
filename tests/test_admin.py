"""The admin dashboard over HTTP: login, sessions, CSRF, rate limits, headers, and what its
pages show from a real store, spool and webhook outbox. (tests/test_admin_browser.py drives
it in Chromium.)"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from relay.accounts import hash_password, verify_password
from relay.app import Relay
from relay.settings import AdminSettings, AdminUser, Listen, Settings, StorageSettings
from relay.spool import Spool
from relay.stores import SPOOL_FILE, Stores
from suppression import Reason
from tests.helpers import PASSWORD, StartRelay, cli
from tracking.admin import create_admin_app
from tracking.events import Event, EventType
from tracking.webhooks import WebhookEndpoint

CARL = "carl@example.org"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
Client = TestClient[Any, Any]


async def seed(stores: Stores, spool: Spool) -> None:
    """A campaign, a one-click opt-out with its proof, a waiting message, a webhook."""
    await stores.suppressions.remember([CARL])
    carl = stores.suppressions.hasher.hash(CARL)
    delivered = {"reply": "250 ok", "attempt": 1, "from_domain": "shop.example"}
    await stores.events.record(
        *(
            Event(
                EventType.DELIVERED,
                f"r{i}",
                "spring",
                "Q1",
                detail=delivered,
                at=f"2026-03-0{1 + i % 3}T10:00:00.000Z",
            )
            for i in range(30)
        ),
        Event(
            EventType.OPEN, carl, "spring", "Q1", False, {"reason": "x"}, "2026-03-02T11:00:00.000Z"
        ),
    )
    await stores.suppressions.add_hash(
        carl,
        reason=Reason.UNSUBSCRIBE,
        source="one-click",
        detail={"method": "one-click", "scope": "global", "key_id": "k7f3"},
    )
    await stores.webhooks.subscribe([WebhookEndpoint("https://crm.example/hook", SECRET)], 60.0)
    await stores.suppressions.add("dora@example.org")  # queues a suppression.added webhook
    await spool.accept(
        "news@shop.example", ["eve@example.org"], b"Subject: hi\r\n\r\nhi\r\n", "app"
    )


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[Stores]:
    async with Stores(Settings(storage=StorageSettings(tmp_path))) as opened:
        yield opened


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    opened = await Spool.open(tmp_path / SPOOL_FILE)
    yield opened
    await opened.close()


ALERT = "webhook https://crm.example failing since 2026-03-02T10:00:00Z"


@pytest.fixture
async def client(aiohttp_client: Any, stores: Stores, spool: Spool) -> Client:
    await seed(stores, spool)
    app = create_admin_app(
        webhook_alerts=lambda: [ALERT],  # the running dispatcher's own lines
        users={"ops": hash_password(PASSWORD)},
        check_password=verify_password,
        suppressions=stores.suppressions,
        statistics=stores.statistics,
        webhooks=stores.webhooks,
        queue=spool.entries,
    )
    result: Client = await aiohttp_client(app)
    return result


def hidden(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no {name} field"
    return match.group(1)


async def log_in(
    client: Client, password: str = PASSWORD, username: str = "ops", **extra: str
) -> Any:
    page = await (await client.get("/login")).text()
    form = {"csrf": hidden(page, "csrf"), "username": username, "password": password, **extra}
    return await client.post("/login", data=form, allow_redirects=False)


async def csrf_of(client: Client) -> str:
    return hidden(await (await client.get("/lookup")).text(), "csrf")


async def test_every_page_needs_a_login(client: Client, stores: Stores) -> None:
    for path in ("/", "/campaign?name=spring", "/queue", "/webhooks", "/lookup"):
        response = await client.get(path, allow_redirects=False)
        assert response.status == 303, path
        assert response.headers["Location"].startswith("/login?next=/"), path
    response = await client.post("/suppress", data={"address": "fred@example.org"})
    assert response.status == 401
    assert await stores.suppressions.check("fred@example.org") is None


async def test_a_wrong_password_is_refused_then_rate_limited(client: Client) -> None:
    wrong = await log_in(client, "not the password")
    assert wrong.status == 401
    assert "Wrong username or password" in await wrong.text()
    assert "optout_admin" not in wrong.cookies
    nobody = await log_in(client, PASSWORD, username="root")
    assert nobody.status == 401
    statuses = [(await log_in(client, "guess")).status for _ in range(4)]
    assert statuses[-1] == 429
    limited = await log_in(client)  # even the right password, for now
    assert limited.status == 429 and int(limited.headers["Retry-After"]) >= 1


async def test_the_login_form_needs_its_own_token(client: Client) -> None:
    response = await client.post(
        "/login", data={"username": "ops", "password": PASSWORD}, allow_redirects=False
    )
    assert response.status == 403
    assert "optout_admin" not in response.cookies


async def test_a_session_cookie_then_logout_ends_it(client: Client) -> None:
    response = await log_in(client, next="/queue")
    assert response.status == 303 and response.headers["Location"] == "/queue"
    cookie = response.headers.getall("Set-Cookie")
    [session] = [c for c in cookie if c.startswith("optout_admin=")]
    assert "HttpOnly" in session and "SameSite=Strict" in session
    assert "Secure" not in session  # plain HTTP here
    old = response.cookies["optout_admin"].value
    assert (await client.get("/", allow_redirects=False)).status == 200

    token = await csrf_of(client)
    bye = await client.post("/logout", data={"csrf": token}, allow_redirects=False)
    assert bye.status == 303 and bye.headers["Location"] == "/login"
    client.session.cookie_jar.update_cookies({"optout_admin": old})  # a stolen cookie
    assert (await client.get("/", allow_redirects=False)).status == 303


async def test_the_cookie_is_secure_behind_a_tls_proxy(client: Client) -> None:
    page = await (await client.get("/login")).text()
    response = await client.post(
        "/login",
        data={"csrf": hidden(page, "csrf"), "username": "ops", "password": PASSWORD},
        headers={"X-Forwarded-Proto": "https"},  # from loopback: a trusted proxy
        allow_redirects=False,
    )
    [session] = [c for c in response.headers.getall("Set-Cookie") if "optout_admin=" in c]
    assert "Secure" in session


async def test_never_sent_elsewhere_after_login(client: Client) -> None:
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        client.session.cookie_jar.clear()  # logged out again
        response = await log_in(client, next=target)
        assert response.headers["Location"] == "/", target


async def test_a_form_without_its_csrf_token_changes_nothing(
    client: Client, stores: Stores
) -> None:
    await log_in(client)
    for form in ({"address": "gus@example.org"}, {"address": "gus@example.org", "csrf": "x"}):
        response = await client.post("/suppress", data=form)
        assert response.status == 403
        assert "nothing was changed" in await response.text()
    assert await stores.suppressions.check("gus@example.org") is None

    done = await client.post(
        "/suppress", data={"address": "gus@example.org", "csrf": await csrf_of(client)}
    )
    assert done.status == 200 and "Suppressed." in await done.text()
    record = await stores.suppressions.show("gus@example.org")
    assert [(h.action, h.source, h.actor) for h in record.history] == [("add", "dashboard", "ops")]


async def test_security_headers_on_every_answer(client: Client) -> None:
    for response in (await client.get("/login"), await client.get("/", allow_redirects=False)):
        headers = response.headers
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert "script-src" not in headers["Content-Security-Policy"]
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Cache-Control"] == "no-store"


async def test_the_pages_show_campaigns_proof_queue_and_webhooks(client: Client) -> None:
    await log_in(client)
    overview = await (await client.get("/")).text()
    assert 'href="/campaign?name=spring"' in overview
    assert "<svg" in overview and "<script" not in overview

    campaign = await (await client.get("/campaign?name=spring")).text()
    assert "Campaign: spring" in campaign and "<svg" in campaign
    assert re.search(r'<div class="n">30</div><div class="l">sent</div>', campaign)
    assert "shop.example" in campaign  # the per-domain table
    missing = await client.get("/campaign?name=nonesuch")
    assert missing.status == 404

    proof = await client.post(
        "/lookup", data={"address": "Carl@Example.org", "csrf": await csrf_of(client)}
    )
    text = await proof.text()
    assert proof.status == 200
    assert "carl@example.org" in text and "unsubscribe" in text
    assert "one-click" in text and "k7f3" in text  # how, and the key that signed the link
    assert "Suppress everywhere" not in text  # already suppressed globally
    bad = await client.post(
        "/lookup", data={"address": "no at sign", "csrf": await csrf_of(client)}
    )
    assert bad.status == 400

    queue = await (await client.get("/queue")).text()
    assert "news@shop.example" in queue and "1 message, 1 recipient waiting" in queue

    hooks = await (await client.get("/webhooks")).text()
    assert "suppression.added" in hooks and "https://crm.example" in hooks
    assert "1 waiting" in hooks
    assert ALERT in overview and ALERT in hooks  # an endpoint failing for an hour, on every page
    client.session.cookie_jar.clear()
    assert ALERT not in await (await client.get("/login")).text()  # not before a login


async def test_the_dashboard_has_a_listener_of_its_own(
    settings: Settings, start_relay: StartRelay, aiohttp_client: Any
) -> None:
    import aiohttp

    admin = AdminSettings(
        listen=Listen("127.0.0.1", 0), users=(AdminUser("ops", hash_password(PASSWORD)),)
    )
    relay: Relay = await start_relay(replace(settings, admin=admin))
    assert relay.addresses.admin is not None and relay.addresses.admin != relay.addresses.http
    async with aiohttp.ClientSession() as http:
        public = "http://{}:{}".format(*relay.addresses.http)
        async with http.get(f"{public}/login") as response:
            assert response.status == 404
        dashboard = "http://{}:{}".format(*relay.addresses.admin)
        async with http.get(f"{dashboard}/login") as response:
            assert response.status == 200 and "Log in" in await response.text()


async def test_admin_without_users_refuses_to_start(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[storage]\ndir = "{tmp_path / "data"}"\n[admin]\nlisten = "127.0.0.1:8081"\n'
    )
    result = cli(config, "serve")
    assert result.returncode == 2
    assert result.stderr.startswith("optout-relay: error: config: admin.users: [admin] needs")
    assert len(result.stderr.splitlines()) == 1
