"""Signed webhooks through a real HTTP receiver that verifies each one with the
`standardwebhooks` package: retries with one webhook-id, suppression changes from another
process, a SIGKILL while one waits, secret rotation, no redirects, a dead endpoint that
slows nothing, erasure, and the `webhooks` commands."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError

from relay.app import Relay
from relay.settings import Settings
from relay.stores import STORE_FILE, Stores
from tests.helpers import (
    ROOT,
    CaptureServer,
    StartRelay,
    asubmit,
    cli,
    free_ports,
    local_url,
    newsletter,
    parse,
    wait_for,
    wait_until_listening,
)
from tracking import create_app
from tracking.webhooks import WebhookDelivery, WebhookEndpoint
from tracking.webhooks.dispatch import Dispatcher

ALICE = "alice@example.org"
FAST = WebhookDelivery(timeout=5.0, first_retry=0.05)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


SECRET = new_secret()


@dataclass
class Delivery:
    """One POST as the receiver saw it."""

    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    def verified(self, secret: str = SECRET) -> dict[str, Any]:
        document: dict[str, Any] = Webhook(secret).verify(self.body, self.headers)
        return document


@dataclass
class Receiver:
    """A CRM's webhook endpoint: keeps every POST; answers what `script` says, in turn,
    then `then` (a status, or None to hang until the client gives up)."""

    url: str = ""
    seen: list[Delivery] = field(default_factory=list)
    script: list[int] = field(default_factory=list)
    then: int | None = 200
    released: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Delivery(request.path, dict(request.headers), await request.read()))
        status = self.script.pop(0) if self.script else self.then
        if status is None:
            await self.released.wait()  # no answer until the test is over
        if status in (301, 302, 307, 308):
            raise web.HTTPTemporaryRedirect("/elsewhere")
        return web.Response(status=status or 200, text="thanks")

    def of(self, kind: str) -> list[Delivery]:
        return [d for d in self.seen if json.loads(d.body)["type"] == kind]


@pytest.fixture
async def receiver(aiohttp_server: Any) -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hooks/optout", receiver.handle)
    app.router.add_route("*", "/elsewhere", receiver.handle)
    server = await aiohttp_server(app)
    receiver.url = str(server.make_url("/hooks/optout"))
    yield receiver
    receiver.released.set()


def with_webhooks(settings: Settings, *endpoints: WebhookEndpoint) -> Settings:
    return replace(settings, webhooks=endpoints, webhook_delivery=FAST)


async def one_click(relay: Relay, downstream: CaptureServer, campaign: str = "spring") -> None:
    """Mail ALICE, then take her copy's one-click unsubscribe, as her mail provider does."""
    message = newsletter([ALICE], headers={"X-Optout-Campaign": campaign})
    await asubmit(relay.addresses.smtp[1], message, "news@shop.example", [ALICE])
    await wait_for(lambda: bool(downstream.handler.for_recipient(ALICE)), what="Alice's copy")

    # As a person would, some time after the copy's delivery is logged: the event (and its
    # webhook) then carries the Message-ID.
    async def delivery_logged() -> bool:
        return any([e async for e in relay.stores.events.export() if e["type"] == "delivered"])

    await wait_for(delivery_logged, what="the delivered event")
    copy = parse(downstream.handler.for_recipient(ALICE)[-1].content)
    match = re.fullmatch(r"<(https://\S+?)>", copy["List-Unsubscribe"])
    assert match
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            local_url(relay, match.group(1)),
            data="List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as response,
    ):
        assert response.status == 200


async def test_two_500s_then_200_three_tries_one_webhook_id(
    settings: Settings, start_relay: StartRelay, downstream: CaptureServer, receiver: Receiver
) -> None:
    receiver.script = [500, 500]
    relay = await start_relay(
        with_webhooks(settings, WebhookEndpoint(receiver.url, SECRET, ("unsubscribe",)))
    )
    await one_click(relay, downstream)
    await wait_for(lambda: len(receiver.seen) == 3, what="three tries")

    assert {d.webhook_id for d in receiver.seen} == {receiver.seen[0].webhook_id}
    assert len({d.body for d in receiver.seen}) == 1  # the same bytes each time
    documents = [d.verified() for d in receiver.seen]  # every one signed with the secret
    document = documents[0]
    assert document["type"] == "unsubscribe"
    assert document["data"]["recipient"] == ALICE
    assert document["data"]["campaign"] == "spring"
    assert document["data"]["detail"]["method"] == "one-click"
    # The data is the event as `optout-relay events` shows it.
    [event] = [e async for e in relay.stores.events.export() if e["type"] == "unsubscribe"]
    assert document["timestamp"] == event["at"]
    assert document["data"] == {k: v for k, v in event.items() if k != "type"}
    # Only the type asked for: no delivered webhook.
    assert all(json.loads(d.body)["type"] == "unsubscribe" for d in receiver.seen)

    await wait_for(
        lambda: _outbox(settings, "state, attempts") == [("delivered", 3)],
        what="the outbox row delivered after 3 tries",
    )
    with pytest.raises(WebhookVerificationError):
        receiver.seen[0].verified(new_secret())


async def test_suppression_changes_from_the_cli_are_webhooks(
    settings: Settings, start_relay: StartRelay, receiver: Receiver, tmp_path: Path
) -> None:
    endpoint = WebhookEndpoint(receiver.url, SECRET, ("suppression.added", "suppression.removed"))
    await start_relay(with_webhooks(settings, endpoint))
    config = tmp_path / "relay.toml"
    config.write_text(f'[storage]\ndir = "{settings.storage.dir}"\n')
    # Another process changes the list; the running relay's dispatcher sends the webhooks.
    assert cli(config, "suppress", "add", "Carol@Example.org", "--reason", "manual").returncode == 0
    assert cli(config, "suppress", "remove", "carol@example.org").returncode == 0
    await wait_for(lambda: len(receiver.seen) == 2, what="added and removed")
    added, removed = (d.verified() for d in receiver.seen)
    assert added["type"] == "suppression.added"
    assert removed["type"] == "suppression.removed"
    for document in (added, removed):
        assert document["data"]["address"] == "carol@example.org"
        assert document["data"]["scope"] == "global"
        assert document["data"]["reason"] == "manual"
    assert added["data"]["source"] == "cli"


async def test_rotation_signs_with_both_secrets(
    settings: Settings, start_relay: StartRelay, receiver: Receiver
) -> None:
    old, new = new_secret(), new_secret()
    relay = await start_relay(
        with_webhooks(settings, WebhookEndpoint(receiver.url, new, previous_secret=old))
    )
    await relay.stores.suppressions.add("dave@example.org")
    await wait_for(lambda: bool(receiver.seen), what="a webhook")
    [delivery] = receiver.seen
    assert len(delivery.headers["webhook-signature"].split(" ")) == 2
    # A receiver that still knows only the old secret, and one that knows only the new.
    assert delivery.verified(old)["type"] == "suppression.added"
    assert delivery.verified(new)["type"] == "suppression.added"
    with pytest.raises(WebhookVerificationError):
        delivery.verified(new_secret())


async def test_a_redirect_is_not_followed_and_the_webhook_gives_up_in_time(
    settings: Settings, start_relay: StartRelay, receiver: Receiver, caplog: Any
) -> None:
    receiver.then = 307
    relay = await start_relay(
        replace(
            with_webhooks(settings, WebhookEndpoint(receiver.url, SECRET)),
            webhook_delivery=WebhookDelivery(first_retry=0.05, give_up_after=0.5),
        )
    )
    caplog.set_level(logging.INFO, logger="optout.webhooks")
    await relay.stores.suppressions.add("erin@example.org")
    await wait_for(lambda: _outbox(settings, "state") == [("failed",)], what="the webhook given up")
    assert receiver.seen and all(d.path == "/hooks/optout" for d in receiver.seen)
    [(status,)] = _outbox(settings, "last_status")
    assert status == "HTTP 307 (redirect not followed)"
    assert "failed for good" in caplog.text
    assert SECRET not in caplog.text and SECRET.removeprefix("whsec_") not in caplog.text


async def test_a_hanging_endpoint_slows_neither_mail_nor_the_pixel(
    settings: Settings, start_relay: StartRelay, downstream: CaptureServer, receiver: Receiver
) -> None:
    receiver.then = None  # accepts, reads, never answers
    relay = await start_relay(
        replace(
            with_webhooks(settings, WebhookEndpoint(receiver.url, SECRET)),
            webhook_delivery=WebhookDelivery(timeout=60.0, concurrency=1),
        )
    )
    await relay.stores.suppressions.add("frank@example.org")
    await wait_for(lambda: bool(receiver.seen), what="a POST that hangs")
    # With the one POST slot taken for a minute, mail still goes and events are written.
    for number in range(3):
        recipient = f"user{number}@example.org"
        await asubmit(
            relay.addresses.smtp[1], newsletter([recipient]), "news@shop.example", [recipient]
        )
    await wait_for(lambda: len(downstream.handler.messages) == 3, what="three copies")
    await wait_for(
        lambda: _outbox(settings, "COUNT(*)", "type = 'delivered'") == [(3,)],
        what="their delivered events queued as webhooks",
    )
    host, port = relay.addresses.http
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{host}:{port}/o/not-a-token.gif") as response:
            assert response.status == 200
        async with http.get(f"http://{host}:{port}/healthz") as response:
            assert response.status == 200
    assert len(receiver.seen) == 1  # still the one hanging POST


async def test_an_erasure_scrubs_the_address_from_waiting_webhooks(
    settings: Settings, start_relay: StartRelay, receiver: Receiver, tmp_path: Path
) -> None:
    receiver.then = 503
    await start_relay(with_webhooks(settings, WebhookEndpoint(receiver.url, SECRET)))
    config = tmp_path / "relay.toml"
    config.write_text(f'[storage]\ndir = "{settings.storage.dir}"\n')
    assert cli(config, "suppress", "add", "gina@example.org").returncode == 0
    await wait_for(lambda: bool(receiver.seen), what="a try")
    assert json.loads(receiver.seen[-1].body)["data"]["address"] == "gina@example.org"
    exported = cli(config, "subject", "export", "gina@example.org")
    assert exported.returncode == 0, exported.stderr
    [waiting] = json.loads(exported.stdout)["webhooks"]
    assert (waiting["type"], waiting["url"]) == ("suppression.added", receiver.url)
    assert waiting["data"]["address"] == "gina@example.org"
    erased = cli(config, "subject", "erase", "--yes", "gina@example.org")
    assert erased.returncode == 0, erased.stderr
    assert "webhooks: 1 anonymised" in erased.stdout
    payloads = [json.loads(p) for (p,) in _outbox(settings, "payload")]
    assert payloads and all(p["address"] is None for p in payloads)
    assert [h for (h,) in _outbox(settings, "address_hash")] == [None] * len(payloads)
    receiver.then = 200
    assert cli(config, "webhooks", "retry").returncode == 0
    await wait_for(
        lambda: all(s == "delivered" for (s,) in _outbox(settings, "state")), what="delivered"
    )
    assert "gina" not in receiver.seen[-1].body.decode()


async def test_an_endpoint_failing_for_an_hour_shows_on_healthz(
    tmp_path: Path, aiohttp_client: Any, caplog: Any
) -> None:
    from relay.settings import StorageSettings

    closed = free_ports(1)[0]
    endpoint = WebhookEndpoint(f"http://127.0.0.1:{closed}/hooks?token=abc", SECRET)
    later = [0.0]  # the dispatcher's clock runs this many seconds ahead
    async with Stores(Settings(storage=StorageSettings(tmp_path))) as stores:
        await stores.webhooks.subscribe([endpoint], FAST.give_up_after)
        await stores.suppressions.add("hank@example.org")
        dispatcher = Dispatcher(
            stores.webhooks, [endpoint], FAST, clock=lambda: time.time() + later[0]
        )
        app = create_app(
            stores.suppressions,
            stores.events,
            _urls(),
            health_details=dispatcher.health_lines,
        )
        client = await aiohttp_client(app)
        caplog.set_level(logging.INFO, logger="optout.webhooks")
        task = asyncio.create_task(dispatcher.run())
        try:
            await wait_for(_failed_tries(stores, 1), what="a refused connection")
            assert (await (await client.get("/healthz")).text()) == "ok\n"
            later[0] = 3601  # an hour later, it still fails
            await stores.webhooks.retry(None, time.time(), FAST.give_up_after)
            await wait_for(_failed_tries(stores, 2), what="another try")
            response = await client.get("/healthz")
            text = await response.text()
            assert response.status == 200
            assert text.startswith("ok\n")
            assert f"webhook http://127.0.0.1:{closed} failing since" in text
            assert "token" not in text and "token" not in caplog.text
            assert "has been failing since" in caplog.text
            [health] = await stores.webhooks.health()
            assert health.failing_since is not None and "cannot connect" in (
                health.last_status or ""
            )
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _failed_tries(stores: Stores, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        rows = await stores.webhooks.rows()
        return bool(rows) and rows[0].attempts >= count

    return check


def _urls() -> Any:
    from tracking import Signer, TrackingUrls

    return TrackingUrls("https://mail.shop.example", Signer(("a-test-key-0123456789",)))


async def test_webhooks_commands(receiver: Receiver, tmp_path: Path) -> None:
    closed = free_ports(1)[0]
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[storage]\ndir = "{tmp_path / "data"}"\n'
        f'[[webhooks]]\nurl = "{receiver.url}"\nsecret = "{SECRET}"\n'
        f'[[webhooks]]\nurl = "http://127.0.0.1:{closed}/down"\nsecret = "{SECRET}"\n'
    )
    tested = await asyncio.to_thread(cli, config, "webhooks", "test", receiver.url)
    assert tested.returncode == 0, tested.stderr
    assert f"{receiver.url}: ok (HTTP 200)" in tested.stdout
    [delivery] = receiver.seen
    assert delivery.verified()["type"] == "webhook.test"

    everything = await asyncio.to_thread(cli, config, "webhooks", "test")
    assert everything.returncode == 1
    assert f"http://127.0.0.1:{closed}/down: FAILED (cannot connect" in everything.stdout
    assert SECRET not in everything.stdout + everything.stderr

    empty = await asyncio.to_thread(cli, config, "webhooks", "list")
    assert empty.returncode == 0 and "No webhooks waiting" in empty.stdout
    # No relay running has subscribed anyone yet: list/retry on an outbox filled by hand.
    async with Stores(_settings_of(tmp_path)) as stores:
        await stores.webhooks.subscribe([WebhookEndpoint(receiver.url, SECRET)], 60.0)
        await stores.suppressions.add("ivy@example.org")
        [row] = await stores.webhooks.rows()
    listed = await asyncio.to_thread(cli, config, "webhooks", "list")
    assert row.webhook_id in listed.stdout and "suppression.added" in listed.stdout
    assert "-- 1 waiting, 0 given up" in listed.stdout
    retried = await asyncio.to_thread(cli, config, "webhooks", "retry", row.webhook_id)
    assert retried.returncode == 0 and retried.stdout == "1 webhooks due now\n"
    unknown = await asyncio.to_thread(cli, config, "webhooks", "retry", "msg_nonesuch")
    assert unknown.returncode == 1
    no_endpoint = await asyncio.to_thread(cli, config, "webhooks", "test", "https://x.example/")
    assert no_endpoint.returncode == 2
    assert no_endpoint.stderr.startswith("optout-relay: error: no [[webhooks]] endpoint")


def _settings_of(tmp_path: Path) -> Settings:
    from relay.settings import StorageSettings

    return Settings(storage=StorageSettings(tmp_path / "data"))


def _outbox(settings: Settings, columns: str, where: str = "1") -> list[tuple[Any, ...]]:
    """Straight from the SQLite file, through a connection of its own."""
    with sqlite3.connect(settings.storage.dir / STORE_FILE) as db:
        return db.execute(
            f"SELECT {columns} FROM webhook_outbox WHERE {where} ORDER BY id"
        ).fetchall()


# --------------------------------------------------------------------------- SIGKILL


def _serve(config: Path, cwd: Path, http_port: int) -> subprocess.Popen[bytes]:
    with open(cwd / "relay.log", "ab") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(config)],
            cwd=cwd,
            stderr=stderr,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    wait_until_listening(http_port, process)
    return process


@pytest.fixture
async def serve_processes() -> AsyncIterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(process.wait)


async def test_a_webhook_waiting_when_serve_is_killed_arrives_after_the_restart(
    receiver: Receiver, tmp_path: Path, serve_processes: list[subprocess.Popen[bytes]]
) -> None:
    smtp_port, http_port = free_ports(2)
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[storage]\ndir = "{tmp_path / "data"}"\n'
        f'[smtp]\nlisten = "127.0.0.1:{smtp_port}"\n'
        f'[http]\nlisten = "127.0.0.1:{http_port}"\n'
        f"[webhook_delivery]\nfirst_retry = 0.2\n"
        f'[[webhooks]]\nurl = "{receiver.url}"\nsecret = "{SECRET}"\n'
        'events = ["suppression.added"]\n'
    )
    receiver.then = 503  # the CRM is down
    serve_processes.append(await asyncio.to_thread(_serve, config, tmp_path, http_port))
    added = await asyncio.to_thread(cli, config, "suppress", "add", "jack@example.org")
    assert added.returncode == 0
    await wait_for(lambda: len(receiver.seen) >= 2, what="two failed tries")

    serve_processes[0].send_signal(signal.SIGKILL)
    await asyncio.to_thread(serve_processes[0].wait)
    tries_before = len(receiver.seen)
    receiver.then = 200  # the CRM is back, the relay is not: nothing arrives
    await asyncio.sleep(0.5)
    assert len(receiver.seen) == tries_before

    serve_processes.append(await asyncio.to_thread(_serve, config, tmp_path, http_port))
    await wait_for(lambda: len(receiver.seen) > tries_before, within=20, what="the webhook")
    final = receiver.seen[-1]
    assert final.verified()["data"]["address"] == "jack@example.org"
    assert {d.webhook_id for d in receiver.seen} == {final.webhook_id}
    await asyncio.sleep(0.5)
    assert len(receiver.seen) == tries_before + 1  # delivered once it answered 200
    log = (tmp_path / "relay.log").read_text()
    assert SECRET.removeprefix("whsec_") not in log
