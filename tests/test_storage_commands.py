"""`optout-relay storage migrate` and `storage copy --to postgresql://...`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from relay.settings import Settings, StorageSettings
from relay.spool import Spool
from relay.stores import SPOOL_FILE, Stores
from suppression import Reason
from tests.helpers import cli
from tracking.events import Event, EventType


def config_file(tmp_path: Path, database: str | None = None, name: str = "relay.toml") -> Path:
    path = tmp_path / name
    extra = f'database = "{database}"\n' if database else ""
    path.write_text(f'[storage]\ndir = "{tmp_path / "data"}"\n{extra}')
    return path


def test_migrate_creates_then_finds_the_schema_up_to_date(
    tmp_path: Path, store_database: str | None
) -> None:
    config = config_file(tmp_path, store_database)
    first = cli(config, "storage", "migrate")
    assert first.returncode == 0, first.stderr
    assert (
        "applied" in first.stdout and "suppression/0001-suppressions-and-contacts" in first.stdout
    )
    again = cli(config, "storage", "migrate")
    assert again.returncode == 0 and again.stdout.endswith(": up to date\n")
    assert "***" not in again.stdout  # no password in the URL here, and none shown if any


async def test_copy_moves_an_sqlite_store_and_its_keys_and_can_run_again(
    tmp_path: Path, postgres_url: str
) -> None:
    local = Settings(storage=StorageSettings(tmp_path / "data"))
    async with Stores(local) as stores:
        await stores.suppressions.add("ann@example.org", reason=Reason.UNSUBSCRIBE)
        await stores.suppressions.remember(["bob@example.org"])
        bob = stores.suppressions.hasher.hash("bob@example.org")
        await stores.events.record(
            *(Event(EventType.DELIVERED, bob, "spring", f"Q{n}") for n in range(2500))
        )
    config = config_file(tmp_path)
    copied = await asyncio.to_thread(cli, config, "storage", "copy", "--to", postgres_url)
    assert copied.returncode == 0, copied.stderr
    assert "events: 2500 rows, 2500 added" in copied.stdout
    assert "suppressions: 1 rows, 1 added" in copied.stdout
    assert "copying" in copied.stderr  # the progress bar
    # Again (as after an interruption): nothing is added twice.
    again = await asyncio.to_thread(cli, config, "storage", "copy", "--to", postgres_url)
    assert again.returncode == 0, again.stderr
    assert "events: 2500 rows, 0 added" in again.stdout

    shared = config_file(tmp_path, postgres_url, "shared.toml")
    checked = await asyncio.to_thread(cli, shared, "suppress", "check", "ann@example.org")
    assert checked.returncode == 0, checked.stdout + checked.stderr  # same key: still matches
    listed = await asyncio.to_thread(cli, shared, "events", "--format", "jsonl")
    events = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(events) == 2500 and events[0]["recipient"] == "bob@example.org"
    # New events get new ids after the copied ones.
    async with Stores(
        Settings(storage=StorageSettings(tmp_path / "data", database=postgres_url))
    ) as s:
        await s.events.record(Event(EventType.OPEN, bob, "spring", "Q1", machine=False))
        assert len([e async for e in s.events.export()]) == 2501


async def test_copy_into_another_relays_store_is_refused(tmp_path: Path, postgres_url: str) -> None:
    async with Stores(
        Settings(storage=StorageSettings(tmp_path / "other", database=postgres_url))
    ) as s:
        await s.suppressions.add("x@example.org")
    async with Stores(Settings(storage=StorageSettings(tmp_path / "data"))) as stores:
        await stores.suppressions.add("ann@example.org")
    result = await asyncio.to_thread(
        cli, config_file(tmp_path), "storage", "copy", "--to", postgres_url
    )
    assert result.returncode != 0
    assert "already has another address-hash key" in result.stderr
    assert "Traceback" not in result.stderr


async def test_queue_commands_say_they_act_on_this_node(tmp_path: Path, postgres_url: str) -> None:
    config = config_file(tmp_path, postgres_url)
    before_serve = await asyncio.to_thread(cli, config, "queue", "list")
    assert before_serve.returncode == 2 and "no store" in before_serve.stderr
    assert f"queue of this node only ({tmp_path / 'data'})" in before_serve.stderr
    (tmp_path / "data").mkdir()
    await (await Spool.open(tmp_path / "data" / SPOOL_FILE)).close()  # as serve makes it
    shared = await asyncio.to_thread(cli, config, "queue", "list")
    assert shared.returncode == 0, shared.stderr
    assert f"queue of this node only ({tmp_path / 'data'})" in shared.stderr
    alone = cli(config_file(tmp_path, name="alone.toml"), "queue", "list")
    assert alone.returncode == 0 and "this node" not in alone.stderr
