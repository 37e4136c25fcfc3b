"""Scopes are validated whole and kept in one spelling; old stores are repaired."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from suppression import (
    MIGRATIONS,
    AddressHasher,
    Database,
    InvalidScope,
    Reason,
    SuppressionStore,
    parse_scope,
)
from tests.helpers import cli

KEY = b"scope-test-key-0123456789abcdef"


@pytest.mark.parametrize(
    "scope", ["global\n", "topic:news\n", " global", "topic:news letter", "topic:a\tb", "topic:"]
)
def test_a_scope_with_whitespace_is_refused_not_stored(scope: str) -> None:
    with pytest.raises(InvalidScope):
        parse_scope(scope)


def test_one_topic_has_one_spelling() -> None:
    assert parse_scope("Topic:E\u0301te\u0301") == parse_scope("topic:ÉTÉ") == "topic:été"
    assert parse_scope("SENDER:Bücher.Example") == "sender:xn--bcher-kva.example"


def test_the_cli_refuses_a_trailing_newline_in_one_line(config: Path) -> None:
    added = cli(config, "suppress", "add", "--scope", "topic:news\n", "ann@example.org")
    assert added.returncode == 2
    assert added.stderr == (
        "optout-relay: error: invalid scope 'topic:news\\n':"
        " expected 'global', 'topic:NAME' or 'sender:DOMAIN'\n"
    )
    assert cli(config, "suppress", "list").stdout == ""


async def test_entries_stored_under_a_newline_scope_are_moved_and_merged(tmp_path: Path) -> None:
    path = tmp_path / "optout.db"
    db = await Database.open(path, MIGRATIONS[:2])  # as the previous release made it
    store = SuppressionStore(db, AddressHasher(KEY))
    await store.add("ann@example.org", scope="topic:news", reason=Reason.MANUAL)
    await store.add("bob@example.org", scope="global", reason=Reason.MANUAL)
    await db.close()
    hasher = AddressHasher(KEY)
    ann, bob = hasher.hash("ann@example.org"), hasher.hash("bob@example.org")
    with sqlite3.connect(path) as conn:
        # What the old check let through: a stronger entry under "topic:news\n" next to
        # ann's canonical one, and bob's only unsubscribe under "global\n".
        for key, scope, reason, at in (
            (ann, "topic:news\n", "unsubscribe", "2020-01-01T00:00:00.000Z"),
            (bob, "sender:shop.example\n", "unsubscribe", "2021-05-05T00:00:00.000Z"),
        ):
            conn.execute(
                "INSERT INTO suppressions (address_hash, scope, reason, source, created_at,"
                " updated_at, added_by) VALUES (?, ?, ?, 'one-click', ?, ?, 1)",
                [key, scope, reason, at, at],
            )
    conn.close()

    db = await Database.open(path, MIGRATIONS)
    store = SuppressionStore(db, hasher)
    try:
        found = await store.check("ann@example.org", ["topic:news"])
        assert found is not None
        assert (found.reason, found.created_at) == ("unsubscribe", "2020-01-01T00:00:00.000Z")
        moved = await store.check("bob@example.org", ["sender:shop.example"])
        assert moved is not None and moved.reason == "unsubscribe"
        assert sorted(e.scope for e in await store.list()) == [
            "global",
            "sender:shop.example",
            "topic:news",
        ]
        record = await store.show("ann@example.org")
        assert [(h.action, h.detail) for h in record.history][-1] == (
            "repair",
            {"stored_scope": "topic:news\n"},
        )
    finally:
        await db.close()
