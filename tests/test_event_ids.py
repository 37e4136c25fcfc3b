"""Every event names its message twice: the relay's queue id and the RFC 5322 Message-ID."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import aiohttp

from relay.settings import Settings, StorageSettings
from relay.stores import HASH_KEY_FILE, STORE_FILE, Stores
from suppression import MIGRATIONS as SUPPRESSION_MIGRATIONS
from suppression import Database
from tests.helpers import (
    CaptureServer,
    StartRelay,
    asubmit,
    body_of,
    cli,
    local_url,
    newsletter,
    parse,
    relay_settings,
    wait_for,
)
from tracking.events import MIGRATIONS as EVENT_MIGRATIONS
from tracking.events import Event, EventType

ALICE = "alice@example.org"


async def test_opens_and_unsubscribes_carry_the_message_id_of_their_copy(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    settings = relay_settings(tmp_path / "data", downstream.port)
    relay = await start_relay(settings)
    message = newsletter([ALICE], headers={"X-Optout-Campaign": "spring"})
    del message["Message-ID"]
    message["Message-ID"] = "  <Spring.2026-04@Shop.Example> (the list's own comment)"
    await asubmit(relay.addresses.smtp[1], message, "news@shop.example", [ALICE])
    await wait_for(lambda: len(downstream.handler.messages) == 1, what="the copy")
    copy = parse(downstream.handler.messages[0].content)
    pixel = re.search(r'<img src="([^"]+/o/[^"]+\.gif)"', body_of(copy, "html"))
    assert pixel is not None
    unsubscribe = copy["List-Unsubscribe"].strip("<>")
    async with aiohttp.ClientSession() as http:
        async with http.get(local_url(relay, pixel.group(1))) as response:
            assert response.status == 200
        async with http.post(
            local_url(relay, unsubscribe), data={"List-Unsubscribe": "One-Click"}
        ) as response:
            assert response.status == 200

    async def all_three() -> bool:
        kinds = {e["type"] async for e in relay.stores.events.export()}
        return {"delivered", "open", "unsubscribe"} <= kinds

    await wait_for(all_three, what="the delivered, open and unsubscribe events")
    await relay.stop()
    config = tmp_path / "relay.toml"
    config.write_text(f'[storage]\ndir = "{settings.storage.dir}"\n')
    result = cli(config, "events", "--format", "jsonl")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert {e["type"] for e in events} == {"delivered", "open", "unsubscribe"}
    queue_ids = {e["queue_id"] for e in events}
    assert len(queue_ids) == 1 and re.fullmatch(r"[0-9A-F]{12}", queue_ids.pop())
    assert {e["message_id"] for e in events} == {"<Spring.2026-04@Shop.Example>"}
    # The tokens in the copy name the queue id only: no Message-ID text travels in them.
    assert "Spring.2026" not in pixel.group(1) and "Spring.2026" not in unsubscribe


async def test_events_recorded_before_the_change_keep_their_queue_id(tmp_path: Path) -> None:
    # A store as the previous release left it: message_id held the queue id.
    path = tmp_path / STORE_FILE
    db = await Database.open(path, SUPPRESSION_MIGRATIONS + EVENT_MIGRATIONS[:1])
    await db.close()
    (tmp_path / HASH_KEY_FILE).write_text("the-address-hash-key-0123456789\n")
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO events (type, at, campaign, message_id)"
            " VALUES ('delivered', '2026-01-02T03:04:05.000Z', 'winter', '85A07CEEB780')"
        )
    conn.close()
    async with Stores(Settings(storage=StorageSettings(tmp_path))) as stores:
        [event] = [e async for e in stores.events.export()]
    assert (event["queue_id"], event["message_id"], event["campaign"]) == (
        "85A07CEEB780",
        None,
        "winter",
    )


async def test_an_open_written_before_its_delivered_event_gets_the_message_id(
    tmp_path: Path, store_database: str | None
) -> None:
    # The delivered event waits in the spool's journal; a fast reader's open can come first.
    settings = Settings(storage=StorageSettings(tmp_path / "data", database=store_database))
    async with Stores(settings) as stores:
        alice = stores.suppressions.hasher.hash(ALICE)
        await stores.events.record(Event(EventType.OPEN, alice, "spring", "0123456789AB"))
        await stores.events.record(
            Event(
                EventType.DELIVERED, alice, "spring", "0123456789AB", message_id="<m1@shop.example>"
            )
        )
        exported = [e async for e in stores.events.export()]
    assert [(e["type"], e["message_id"]) for e in exported] == [
        ("open", "<m1@shop.example>"),
        ("delivered", "<m1@shop.example>"),
    ]
