"""Data-subject requests over a real data dir: export everything, erase all but the key."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.delivery.transport import OutboxTransport, Outgoing
from relay.spool import Spool
from suppression import (
    MIGRATIONS,
    AddressHasher,
    Database,
    DataHolder,
    Outcome,
    Reason,
    SuppressionStore,
    erase_subject,
    export_subject,
)
from suppression.holders import outbox_holder, spool_holder
from tracking.events import MIGRATIONS as EVENT_MIGRATIONS
from tracking.events import Event, EventStore, EventType

KEY = b"subject-test-key-0123456789abcdef"
VICTIM = "Zoe.Victim@Example.ORG"
OTHER = "olga.other@example.org"


def message(to: str, body: str = "Hello") -> bytes:
    return (
        f"From: news@shop.example\r\nTo: {to}\r\nSubject: Sale\r\n\r\n{body} {to}\r\n"
        + "x" * 6000  # spills into overflow pages, as real bodies do
        + "\r\n"
    ).encode()


@dataclass
class DataDir:
    path: Path
    db: Database
    store: SuppressionStore
    events: EventStore
    spool: Spool

    def holders(self) -> list[DataHolder]:
        return [
            self.events.holder(),
            spool_holder(self.spool, self.path / "spool.db"),
            outbox_holder(self.path / "outbox"),
        ]


@pytest.fixture
async def data(tmp_path: Path) -> AsyncIterator[DataDir]:
    """A data dir as `serve` leaves it after mailing VICTIM and OTHER for a while."""
    path = tmp_path / "data"
    path.mkdir()
    db = await Database.open(path / "optout.db", MIGRATIONS + EVENT_MIGRATIONS)
    store = SuppressionStore(db, AddressHasher(KEY))
    events = EventStore(db)
    spool = await Spool.open(path / "spool.db")
    outbox = OutboxTransport(path / "outbox")
    for address in (VICTIM, OTHER):
        # Still waiting for delivery.
        await spool.accept("news@shop.example", [address], message(address, "Later"), "c")
    for address in (OTHER, VICTIM):
        await store.remember([address])
        key = store.hasher.hash(address)
        # Delivered earlier: spooled, written to the outbox, then dropped from the spool,
        # which leaves its pages free but not blank.
        queue_id = await spool.accept("news@shop.example", [address], message(address), "c")
        await outbox.send(Outgoing(queue_id, "news@shop.example", address, message(address)))
        loaded = await spool.load(queue_id, now=1e12)
        assert loaded is not None
        await spool.finish(loaded.deliveries[0])
        await events.record(
            Event(EventType.DELIVERED, key, "spring", queue_id, detail={"reply": "250 ok"}),
            Event(EventType.OPEN, key, "spring", queue_id, machine=False),
            Event(
                EventType.BOUNCED,
                key,
                "summer",
                "Q2",
                detail={"reply": f"550 5.1.1 <{address.lower()}>: no such user"},
            ),
        )
    await store.add(VICTIM, scope="topic:news", reason=Reason.UNSUBSCRIBE, source="one-click")
    await store.add(OTHER, reason=Reason.MANUAL)
    opened = DataDir(path, db, store, events, spool)
    try:
        yield opened
    finally:
        await spool.close()
        await db.close()


def files_mentioning(directory: Path, needles: list[str]) -> list[str]:
    """Every file (SQLite databases, their WAL and -shm files, outbox) holding a needle."""
    found = []
    encoded = [needle.lower().encode() for needle in needles]
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            content = path.read_bytes().lower()
            if any(needle in content for needle in encoded):
                found.append(str(path.relative_to(directory)))
    return found


async def test_export_has_everything_held(data: DataDir) -> None:
    document = await export_subject(data.store, VICTIM, data.holders(), actor="dpo")
    assert document["address"] == "zoe.victim@example.org"
    assert [(s["scope"], s["reason"]) for s in document["suppressions"]] == [
        ("topic:news", "unsubscribe")
    ]
    assert [h["action"] for h in document["suppression_history"]] == ["add"]
    assert document["contact"]["address"] == "zoe.victim@example.org"
    assert [e["type"] for e in document["events"]] == ["delivered", "open", "bounced"]
    assert document["events"][2]["detail"]["reply"].startswith("550 5.1.1 <zoe.victim@")
    assert {e["recipient"] for e in document["events"]} == {"zoe.victim@example.org"}
    assert [d["recipient"] for d in document["spool"]] == [VICTIM]
    assert len(document["outbox"]) == 1
    record = await data.store.show(VICTIM)
    assert record.history[-1].action == "subject-export"
    assert record.history[-1].actor == "dpo"


async def test_erase_keeps_the_address_suppressed_and_nothing_plain_on_disk(
    data: DataDir,
) -> None:
    spellings = [VICTIM, "zoe.victim@example.org", "zoe.victim"]
    assert files_mentioning(data.path, spellings)  # the grep finds it before erasure

    report = await erase_subject(data.store, VICTIM, data.holders(), actor="dpo")
    assert report.tombstone is Outcome.ADDED
    assert (report.suppressions_kept, report.contact_deleted) == (2, True)
    assert report.erased == {"events": 3, "spool": 1, "outbox": 1}
    assert report.effects == {
        "events": {"anonymised": 3},
        "spool": {
            "waiting deliveries cancelled": 1,
            "waiting messages with the address taken out of To/Cc": 0,
        },
        "outbox": {"files deleted": 1},
    }
    assert report.checkpointed

    found = await data.store.check("ZOE.VICTIM@example.org", ["topic:news"])
    assert found is not None and found.address is None
    record = await data.store.show(VICTIM)
    assert [e.scope for e in record.suppressions] == ["topic:news", "global"]
    assert [h.action for h in record.history][-2:] == ["add", "erase"]
    assert record.history[-1].detail["events_erased"] == 3
    assert record.erased_at is not None
    # Campaign counts survive without the person; the other recipient is untouched.
    exported = [e async for e in data.events.export()]
    assert sorted(e["recipient"] or "-" for e in exported) == ["-"] * 3 + [OTHER] * 3
    assert await data.spool.for_recipient(lambda address: address == OTHER)

    # While the stores are open, as with `serve` running: WAL files included.
    assert (data.path / "optout.db-wal").exists()
    assert files_mentioning(data.path, spellings) == []
    await data.spool.close()
    await data.db.close()
    assert files_mentioning(data.path, spellings) == []
    assert files_mentioning(data.path, [OTHER])  # the grep still sees what was kept


async def test_erase_twice_and_import_after_erase_stay_hash_only(
    data: DataDir, tmp_path: Path
) -> None:
    await erase_subject(data.store, VICTIM, data.holders(), actor="dpo")
    again = await erase_subject(data.store, VICTIM, data.holders(), actor="dpo")
    assert again.tombstone is Outcome.UNCHANGED
    assert (again.contact_deleted, again.erased) == (False, {"events": 0, "spool": 0, "outbox": 0})
    # A later list that still carries the address suppresses by key only.
    await data.store.add(VICTIM, scope="topic:sport")
    await data.store.remember([VICTIM])  # e.g. transactional mail afterwards
    with sqlite3.connect(data.path / "optout.db") as conn:
        addresses = conn.execute(
            "SELECT address FROM suppressions WHERE address_hash = ?",
            [data.store.hasher.hash(VICTIM)],
        ).fetchall()
    assert addresses == [(None,), (None,), (None,)]
