"""The SQLite layer: group commit, failure isolation, recorded migrations."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
import sqlite_utils

from suppression import Database, Migration


def create_items(db: sqlite_utils.Database) -> None:
    db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT UNIQUE)")


MIGRATIONS = (Migration("test/0001-items", create_items),)


def insert(name: str):  # type: ignore[no-untyped-def]
    def run(db: sqlite_utils.Database) -> int:
        return int(db.execute("INSERT INTO items (name) VALUES (?)", [name]).lastrowid)

    return run


def count(db: sqlite_utils.Database) -> int:
    return int(db.execute("SELECT COUNT(*) FROM items").fetchone()[0])


async def test_concurrent_writes_share_commits_and_one_failure_undoes_only_itself(
    tmp_path: Path,
) -> None:
    db = await Database.open(tmp_path / "t.db", MIGRATIONS)
    try:
        names = [f"n{i}" for i in range(200)] + ["n0"]  # the last one breaks UNIQUE
        results = await asyncio.gather(
            *(db.write(insert(name)) for name in names), return_exceptions=True
        )
        assert isinstance(results[-1], sqlite3.IntegrityError)
        assert all(isinstance(r, int) for r in results[:-1])
        assert await db.read(count) == 200
    finally:
        await db.close()
    # Durable and readable by another connection after close.
    with sqlite3.connect(tmp_path / "t.db") as plain:
        assert plain.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 200
        [(name,)] = plain.execute("SELECT name FROM migrations").fetchall()
        assert name == "test/0001-items"


async def test_migrations_run_once(tmp_path: Path) -> None:
    for _ in range(2):
        db = await Database.open(tmp_path / "t.db", MIGRATIONS)
        await db.write(insert("x") if _ == 0 else lambda db: None)
        await db.close()
    with sqlite3.connect(tmp_path / "t.db") as plain:
        assert plain.execute("SELECT COUNT(*) FROM migrations").fetchone()[0] == 1


async def test_a_failing_migration_stops_the_open(tmp_path: Path) -> None:
    def broken(db: sqlite_utils.Database) -> None:
        db.execute("CREATE TABLE t (x)")
        raise RuntimeError("half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        await Database.open(tmp_path / "t.db", (Migration("test/broken", broken),))
    with sqlite3.connect(tmp_path / "t.db") as plain:
        tables = {r[0] for r in plain.execute("SELECT name FROM sqlite_master")}
    assert "t" not in tables  # rolled back with its record


async def test_writes_after_close_are_refused(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "t.db", MIGRATIONS)
    await db.close()
    with pytest.raises(RuntimeError, match="closed"):
        await db.write(insert("late"))
