"""The shared store: several nodes' Stores on one database, the keys in it, webhooks queued
by its triggers, and what a node sees when the server goes away and comes back."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay.errors import MissingStore
from relay.settings import Settings, SigningSettings, StorageSettings
from relay.stores import HASH_KEY_FILE, SIGNING_KEY_FILE, STORE_FILE, Stores
from suppression import Reason, StorageUnavailable
from tests.postgres import PostgresServer
from tracking.events import Event, EventType
from tracking.signing import Namespace
from tracking.webhooks import WebhookEndpoint


def node(tmp_path: Path, name: str, database: str | None) -> Settings:
    """A node's settings: its own data dir, the shared database."""
    return Settings(storage=StorageSettings(tmp_path / name, database=database))


@pytest.fixture
async def two_nodes(tmp_path: Path, postgres_url: str) -> AsyncIterator[tuple[Stores, Stores]]:
    async with (
        Stores(node(tmp_path, "a", postgres_url)) as a,
        Stores(node(tmp_path, "b", postgres_url)) as b,
    ):
        yield a, b


async def rows(stores: Stores, sql: str) -> list[tuple[Any, ...]]:
    return await stores.database.read(lambda db: [tuple(row) for row in db.execute(sql)])


async def test_an_opt_out_on_one_node_is_seen_by_the_next_check_on_another(
    two_nodes: tuple[Stores, Stores],
) -> None:
    a, b = two_nodes
    # Nothing is cached: every check is a read of the committed state, so a node sees the
    # other's writes at once, back and forth.
    for round_ in range(20):
        address = f"r{round_}@example.org"
        assert await b.suppressions.check(address) is None
        await a.suppressions.add_hash(
            a.suppressions.hasher.hash(address), reason=Reason.UNSUBSCRIBE, source="one-click"
        )
        found = await b.suppressions.check(address)
        assert found is not None and found.reason == "unsubscribe"
        assert await b.suppressions.remove_hash(found.address_hash, scope="global", source="x")
        assert await a.suppressions.check(address) is None


async def test_nodes_share_their_keys_and_keep_none_in_their_data_dirs(
    tmp_path: Path, two_nodes: tuple[Stores, Stores]
) -> None:
    a, b = two_nodes
    assert a.suppressions.hasher.hash("x@example.org") == b.suppressions.hasher.hash(
        "x@example.org"
    )
    token = a.signer().sign(Namespace.UNSUBSCRIBE, "payload")
    assert b.signer().verify(Namespace.UNSUBSCRIBE, token) == "payload"
    for name in ("a", "b"):
        for file in (HASH_KEY_FILE, SIGNING_KEY_FILE, STORE_FILE):
            assert not (tmp_path / name / file).exists()
    [(count,)] = await rows(a, "SELECT count(*) FROM shared_keys")
    assert count == 2


async def test_configured_signing_keys_stay_out_of_the_database(
    tmp_path: Path, postgres_url: str
) -> None:
    settings = Settings(
        storage=StorageSettings(tmp_path, database=postgres_url),
        signing=SigningSettings(("configured-key-0123456789abcdef",)),
    )
    async with Stores(settings) as stores:
        assert await rows(stores, "SELECT name FROM shared_keys") == [("address-hash",)]


async def test_a_reading_command_finds_no_store_in_an_empty_database(
    tmp_path: Path, postgres_url: str
) -> None:
    with pytest.raises(MissingStore):
        async with Stores(node(tmp_path, "a", postgres_url), create=False):
            pass
    async with Stores(node(tmp_path, "a", postgres_url)):
        pass
    async with Stores(node(tmp_path, "a", postgres_url), create=False):
        pass


async def test_writes_from_two_nodes_at_once_all_land_with_their_audit(
    two_nodes: tuple[Stores, Stores],
) -> None:
    a, b = two_nodes
    await asyncio.gather(
        *(
            (a if n % 2 else b).suppressions.add(f"p{n}@example.org", source=f"node{n % 2}")
            for n in range(200)
        )
    )
    assert await a.suppressions.count() == 200
    [(records, distinct)] = await rows(
        b, "SELECT count(*), count(DISTINCT id) FROM suppression_audit WHERE action = 'add'"
    )
    assert records == distinct == 200


async def test_nodes_starting_together_make_one_schema_and_one_key_set(
    tmp_path: Path, postgres_url: str
) -> None:
    async def start(name: str) -> tuple[str, str]:
        async with Stores(node(tmp_path, name, postgres_url)) as stores:
            hashed = stores.suppressions.hasher.hash("x@example.org")
            return hashed, stores.signer().sign(Namespace.OPEN, "v")

    results = await asyncio.gather(*(start(f"n{n}") for n in range(4)))
    assert len({hashed for hashed, _ in results}) == 1
    async with Stores(node(tmp_path, "check", postgres_url)) as stores:
        assert all(stores.signer().verify(Namespace.OPEN, signed) == "v" for _, signed in results)


async def webhook_rows(stores: Stores) -> list[tuple[str, dict[str, Any]]]:
    found = await rows(stores, "SELECT type, payload FROM webhook_outbox ORDER BY id")
    return [(kind, json.loads(payload)) for kind, payload in found]


async def test_suppression_and_event_webhooks_are_queued_alike_on_both_engines(
    tmp_path: Path, store_database: str | None
) -> None:
    async with Stores(node(tmp_path, "a", store_database)) as stores:
        endpoint = WebhookEndpoint("https://crm.example/hook", "whsec_" + "A" * 32)
        await stores.webhooks.subscribe([endpoint], 3600.0)
        await stores.suppressions.add("ann@example.org", reason=Reason.MANUAL)
        await stores.suppressions.add("ann@example.org", reason=Reason.COMPLAINT)  # stronger
        await stores.suppressions.add("ann@example.org", reason=Reason.MANUAL)  # no change
        await stores.suppressions.remember(["ann@example.org"])
        key = stores.suppressions.hasher.hash("ann@example.org")
        await stores.events.record(
            Event(EventType.OPEN, key, "spring", "Q1", machine=True, detail={"reason": "mpp"}),
            Event(EventType.DELIVERED, key, "spring", "Q1"),
        )
        assert await stores.suppressions.remove("ann@example.org", force=True) == 1
        queued = await webhook_rows(stores)
        assert [kind for kind, _ in queued] == [
            "suppression.added",
            "suppression.added",
            "open",
            "delivered",
            "suppression.removed",
        ]
        assert queued[1][1]["reason"] == "complaint"
        assert queued[2][1] == {
            "at": queued[2][1]["at"],
            "recipient": "ann@example.org",
            "campaign": "spring",
            "queue_id": "Q1",
            "message_id": None,
            "machine": True,
            "count": 1,
            "detail": {"reason": "mpp"},
        }
        assert "machine" not in queued[3][1]
        # An erasure leaves the queued webhooks without the address.
        from suppression import erase_subject

        await erase_subject(stores.suppressions, "ann@example.org", [], actor="dpo")
        for _kind, payload in await webhook_rows(stores):
            assert "ann@example.org" not in json.dumps(payload)


async def test_when_the_server_goes_away_a_check_fails_at_once_and_recovers(
    tmp_path: Path,
    postgres_server: PostgresServer,
    postgres_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Stores(node(tmp_path, "a", postgres_url)) as stores:
        await stores.suppressions.add("gone@example.org")
        postgres_server.stop()
        try:
            started = time.monotonic()
            for _ in range(50):
                with pytest.raises(StorageUnavailable):
                    await stores.suppressions.check("gone@example.org")
            # Fifty checks without the server: one connection attempt, then refusals.
            assert time.monotonic() - started < 10
            with pytest.raises(StorageUnavailable):
                await stores.suppressions.add("new@example.org")
        finally:
            postgres_server.start()
        deadline = time.monotonic() + 15
        while True:
            try:
                found = await stores.suppressions.check("gone@example.org")
                break
            except StorageUnavailable:
                assert time.monotonic() < deadline, "never reconnected"
                await asyncio.sleep(0.2)
        assert found is not None
        await stores.suppressions.add("new@example.org")
    said = [r.getMessage() for r in caplog.records if r.name == "optout.storage"]
    assert len([m for m in said if "unreachable" in m]) == 1, said
    assert len([m for m in said if "reachable again" in m]) == 1, said
    assert "***" not in postgres_url and all(postgres_url in m for m in said)


async def test_one_node_drains_the_outbox_and_another_takes_over_when_it_dies(
    tmp_path: Path, postgres_url: str, aiohttp_server: Any
) -> None:
    from aiohttp import web

    from tracking.webhooks.dispatch import Dispatcher
    from tracking.webhooks.endpoints import WebhookDelivery

    seen: list[str] = []  # webhook-id of each POST

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.headers["webhook-id"])
        await asyncio.sleep(0.3)  # a slow receiver: the webhook stays pending meanwhile
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", handle)
    server = await aiohttp_server(app)
    delivery = WebhookDelivery(timeout=5.0, first_retry=0.05)
    async with (
        Stores(node(tmp_path, "a", postgres_url)) as a,
        Stores(node(tmp_path, "b", postgres_url)) as b,
    ):
        # Both nodes have the endpoint configured: either could send every webhook.
        endpoint = WebhookEndpoint(str(server.make_url("/hook")), "whsec_" + "B" * 32)
        await a.webhooks.subscribe([endpoint], 3600.0)
        for n in range(10):
            await (a if n % 2 else b).suppressions.add(f"w{n}@example.org")
        dispatchers = {
            name: Dispatcher(stores.webhooks, [endpoint], delivery)
            for name, stores in (("a", a), ("b", b))
        }
        tasks = {name: asyncio.create_task(d.run()) for name, d in dispatchers.items()}
        try:
            deadline = time.monotonic() + 20
            while len(seen) < 10:
                assert time.monotonic() < deadline, seen
                await asyncio.sleep(0.05)
            assert sorted(seen) == sorted(set(seen))  # each once, by one node
            # The node that drains dies (its connections go, the lock with them); the
            # other takes over what comes next.
            leader = "a" if await a.webhooks.leading() else "b"
            tasks[leader].cancel()
            await asyncio.gather(tasks[leader], return_exceptions=True)
            await (a if leader == "a" else b).database.close()
            survivor = b if leader == "a" else a
            for n in range(10, 15):
                await survivor.suppressions.add(f"w{n}@example.org")
            while len(seen) < 15:
                assert time.monotonic() < deadline, seen
                await asyncio.sleep(0.05)
            assert len(set(seen)) == 15
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)


async def test_healthz_says_503_while_the_server_is_away(
    tmp_path: Path, postgres_server: PostgresServer, postgres_url: str, aiohttp_client: Any
) -> None:
    from tracking import Signer, TrackingUrls, create_app

    async with Stores(node(tmp_path, "a", postgres_url)) as stores:
        urls = TrackingUrls("https://t.example", Signer(["k" * 32]))
        app = create_app(stores.suppressions, stores.events, urls, event_process=False)
        client = await aiohttp_client(app)
        assert (await client.get("/healthz")).status == 200
        postgres_server.stop()
        try:
            response = await client.get("/healthz")
            assert response.status == 503
            assert (await response.text()).startswith("store unreachable: PostgreSQL at ")
        finally:
            postgres_server.start()
        deadline = time.monotonic() + 15
        while (await client.get("/healthz")).status != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
