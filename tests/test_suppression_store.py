"""The suppression store on a real SQLite file: scopes, strength, expiry, audit, lookups."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from suppression import (
    MIGRATIONS,
    AddressHasher,
    Database,
    NormalizationChanged,
    NormalizationPolicy,
    Outcome,
    PermanentReason,
    Reason,
    SuppressionStore,
    sender_scopes,
)
from suppression.engine import Connection
from suppression.schema import MIGRATIONS as ALL_MIGRATIONS
from tests.postgres import OpenEngine

KEY = b"store-test-key-0123456789abcdef"


@pytest.fixture
async def store(open_engine: OpenEngine) -> SuppressionStore:
    """On each engine (the conftest fixture `open_engine`)."""
    opened = SuppressionStore(await open_engine(MIGRATIONS), AddressHasher(KEY))
    await opened.verify_normalization()
    return opened


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


async def stored(store: SuppressionStore, sql: str) -> list[tuple[object, ...]]:
    return await store.database.read(lambda db: [tuple(row) for row in db.execute(sql)])


async def test_mixed_case_and_idn_spellings_hit_one_entry(store: SuppressionStore) -> None:
    assert await store.add("Jörg@Bücher.Example", reason=Reason.UNSUBSCRIBE)
    for spelling in (
        "jörg@xn--bcher-kva.example",
        "JÖRG@BÜCHER.EXAMPLE",
        "jo\u0308rg@bücher.example",
    ):
        found = await store.check(spelling)
        assert found is not None, spelling
        assert found.address == "jörg@xn--bcher-kva.example"
    assert await store.check("joerg@bücher.example") is None


async def test_scopes_are_kept_apart(store: SuppressionStore) -> None:
    await store.add("ann@example.org", scope="topic:News", reason=Reason.UNSUBSCRIBE)
    await store.add("ann@example.org", scope="sender:Shop.Example")
    await store.add("bob@example.org", scope="sender:bücher.example")
    assert await store.check("ann@example.org") is None
    topic = await store.check("ann@example.org", ["global", "topic:news"])
    assert topic is not None and (topic.scope, topic.reason) == ("topic:news", "unsubscribe")
    assert await store.check("ann@example.org", ["topic:sport"]) is None
    sender = await store.check("ann@example.org", sender_scopes("promo@shop.example"))
    assert sender is not None and sender.scope == "sender:shop.example"
    assert await store.check("ann@example.org", sender_scopes("promo@other.example")) is None
    idn = await store.check("bob@example.org", sender_scopes("x@xn--bcher-kva.example"))
    assert idn is not None and idn.scope == "sender:xn--bcher-kva.example"
    # Callers name global with the scope of the mail; a global entry then stops it.
    await store.add("ann@example.org")
    found = await store.check("ann@example.org", ["global", "topic:sport"])
    assert found is not None and found.scope == "global"
    assert await store.check("ANN@example.org", ["Topic:News"]) is not None


async def test_an_entry_is_only_ever_strengthened(store: SuppressionStore) -> None:
    soon = datetime.now(UTC) + timedelta(days=30)
    assert await store.suppress("cy@example.org", reason=Reason.MANUAL, expires_at=soon) == (
        Outcome.ADDED
    )
    first = await store.check("cy@example.org")
    assert first is not None and first.expires_at is not None
    # Weaker or equal: nothing changes.
    assert await store.suppress("cy@example.org", reason=Reason.IMPORT) is Outcome.STRENGTHENED
    permanent = await store.check("cy@example.org")
    assert permanent is not None and permanent.expires_at is None
    assert permanent.reason == "manual" and permanent.created_at == first.created_at
    assert await store.suppress("cy@example.org", reason=Reason.IMPORT) is Outcome.UNCHANGED
    assert await store.suppress("cy@example.org", reason=Reason.COMPLAINT, source="fbl") is (
        Outcome.STRENGTHENED
    )
    strongest = await store.check("cy@example.org")
    assert strongest is not None
    assert (strongest.reason, strongest.source) == ("complaint", "fbl")
    assert strongest.created_at == first.created_at
    assert not await store.add("cy@example.org", reason=Reason.UNSUBSCRIBE)


async def test_complaints_are_reported_first(store: SuppressionStore) -> None:
    await store.add("di@example.org", reason=Reason.UNSUBSCRIBE)
    await store.add("di@example.org", scope="topic:news", reason=Reason.COMPLAINT)
    found = await store.check("di@example.org", ["global", "topic:news"])
    assert found is not None and found.reason == "complaint"


async def test_expiry_is_for_soft_reasons_only_and_lapses(store: SuppressionStore) -> None:
    past = datetime.now(UTC) - timedelta(seconds=1)
    with pytest.raises(PermanentReason):
        await store.add("ed@example.org", reason=Reason.UNSUBSCRIBE, expires_at=past)
    with pytest.raises(PermanentReason):
        await store.add_hash(store.hasher.hash("ed@example.org"), source="x", expires_at=past)
    await store.add("ed@example.org", reason=Reason.HARD_BOUNCE, expires_at=past)
    assert await store.check("ed@example.org") is None
    # A lapsed entry is replaced as new by the next add.
    assert await store.suppress("ed@example.org") is Outcome.ADDED
    assert await store.check("ed@example.org") is not None
    await store.add("fay@example.org", reason=Reason.IMPORT, expires_at=past)
    assert await store.purge_expired() == 1
    assert await stored(store, "SELECT address FROM suppressions") == [("ed@example.org",)]
    history = await store.show("fay@example.org")
    assert [h.action for h in history.history] == ["add", "expire"]


async def test_every_change_is_audited_without_the_plain_address(
    store: SuppressionStore,
) -> None:
    await store.add("gus@example.org", source="cli", actor="alice")
    await store.remember(["gus@example.org"])
    await store.add_hash(
        store.hasher.hash("gus@example.org"),
        scope="topic:news",
        source="one-click",
        detail={"campaign": "spring", "reply": "550 5.7.1 <Gus@Example.org> said stop"},
    )
    assert await store.remove("GUS@example.org", scope="global", actor="bob") == 1
    record = await store.show("gus@example.org")
    assert [(h.action, h.scope, h.source, h.actor) for h in record.history] == [
        ("add", "global", "cli", "alice"),
        ("add", "topic:news", "one-click", None),
        ("remove", "global", "cli", "bob"),
    ]
    assert record.history[1].detail == {
        "campaign": "spring",
        "reply": "550 5.7.1 <[address]> said stop",
    }
    assert record.history[2].detail["previous"]["reason"] == "manual"
    assert [e.scope for e in record.suppressions] == ["topic:news"]
    assert record.suppressions[0].address == "gus@example.org"
    audit = await stored(store, "SELECT * FROM suppression_audit")
    assert "gus@example.org" not in repr(audit).lower()
    with pytest.raises(Exception, match="append-only"):
        await store.database.write(lambda db: db.execute("DELETE FROM suppression_audit"))
    with pytest.raises(Exception, match="append-only"):
        await store.database.write(
            lambda db: db.execute("UPDATE suppression_audit SET actor = 'x'")
        )


async def test_remove_hash_undoes_one_scope_only(store: SuppressionStore) -> None:
    key = store.hasher.hash("una@example.org")
    await store.add_hash(key, scope="topic:news", source="page")
    await store.add("una@example.org", reason=Reason.COMPLAINT)
    assert await store.remove_hash(key, scope="topic:sport", source="page-undo") == 0
    assert await store.remove_hash(key, scope="Topic:News", source="page-undo") == 1
    assert await store.check_hash(key, ["topic:news"]) is None
    assert await store.check_hash(key) is not None
    record = await store.show("una@example.org")
    assert [(h.action, h.scope, h.source) for h in record.history][-1] == (
        "remove",
        "topic:news",
        "page-undo",
    )


async def test_remove_lifts_hashed_list_entries_too(store: SuppressionStore) -> None:
    from suppression import Entry

    [md5_key] = [k for k in store.hasher.lookup_keys("hal@example.org") if k.startswith("md5:")]
    await store.apply([Entry(md5_key, "global", "import", "import:list")], actor=None)
    found = await store.check("Hal@Example.org")
    assert found is not None and found.key_kind == "md5"
    # Delivery checks by keyed hash; the contact names the address to digest.
    hal = store.hasher.hash("hal@example.org")
    assert await store.check_hash(hal) is None
    await store.remember(["hal@example.org"])
    hashed = await store.check_hash(hal)
    assert hashed is not None and hashed.address_hash == md5_key
    assert await store.remove("hal@example.org") == 1
    assert await store.check("hal@example.org") is None


async def test_a_check_is_one_primary_key_search(store: SuppressionStore) -> None:
    postgresql = store.database.dialect.is_postgresql

    def plan(db: Connection) -> list[str]:
        from suppression.store import _FIND

        sql = _FIND.format(keys="?, ?, ?", scopes="?, ?")
        explain = "EXPLAIN" if postgresql else "EXPLAIN QUERY PLAN"
        cursor = db.execute(f"{explain} {sql}", ["a", "b", "c", "global", "x", "t"])
        return [row[0] if postgresql else row[3] for row in cursor.fetchall()]

    details = await store.database.read(plan)
    if postgresql:
        assert details[0].startswith("Index Scan using suppressions_pkey on suppressions")
        assert "address_hash = ANY" in details[1] and "scope = ANY" in details[1]
        assert not any("Seq Scan" in d for d in details)
        return
    assert details[0] == "SEARCH suppressions USING PRIMARY KEY (address_hash=? AND scope=?)"
    assert not any(d.startswith("SCAN") for d in details)


async def test_the_normalisation_policy_is_pinned(store: SuppressionStore) -> None:
    other = SuppressionStore(store.database, AddressHasher(KEY, policy=NormalizationPolicy(False)))
    with pytest.raises(NormalizationChanged) as caught:
        await other.verify_normalization()
    assert "fold_local_part=1" in str(caught.value)
    await SuppressionStore(store.database, AddressHasher(KEY)).verify_normalization()


async def test_entries_from_before_the_audit_log_are_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = await Database.open(path, ALL_MIGRATIONS[:1])
    await db.write(
        lambda d: d.execute(
            "INSERT INTO suppressions VALUES ('hash-of-ivy-0123456789', 'global',"
            " 'ivy@example.org', 'unsubscribe', 'one-click', '2025-01-02T03:04:05.000Z')"
        )
    )
    await db.close()
    db = await Database.open(path, ALL_MIGRATIONS)
    try:
        store = SuppressionStore(db, AddressHasher(KEY))
        [entry] = await store.list()
        assert (entry.address, entry.reason, entry.expires_at) == (
            "ivy@example.org",
            "unsubscribe",
            None,
        )
        # Keys of that time were made with the default policy, which is now pinned.
        with pytest.raises(NormalizationChanged):
            await SuppressionStore(
                db, AddressHasher(KEY, policy=NormalizationPolicy(strip_subaddress=True))
            ).verify_normalization()
    finally:
        await db.close()
    history = rows(path, "SELECT action, source, at, detail FROM suppression_audit")
    assert history == [("add", "one-click", "2025-01-02T03:04:05.000Z", '{"migrated":true}')]


async def test_listing_pages_through_in_creation_order(store: SuppressionStore) -> None:
    for i in range(7):
        await store.add(f"p{i}@example.org")
    seen = [e.address async for e in store.entries(page_size=3)]
    assert seen == [f"p{i}@example.org" for i in range(7)]
    assert await store.count() == 7
    assert await store.count(scope="topic:x") == 0
