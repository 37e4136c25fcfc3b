"""Retention as an operator meets it: unambiguous units, sensible embedded defaults, a dry run
that shows what would go per kind, and a readable purge line in serve's log."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from relay.config import parse_settings
from relay.errors import ConfigError
from relay.settings import Settings, StorageSettings
from relay.stores import STORE_FILE, Stores
from tests.helpers import cli
from tracking.events import Event, EventType

UNITS = "s, min, h, d, w, mo (30 days), y (365 days)"


def days_ago(days: float) -> str:
    moment = datetime.now(UTC) - timedelta(days=days)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def seed(data: Path, *events: Event) -> None:
    async def run() -> None:
        async with Stores(Settings(storage=StorageSettings(data))) as stores:
            await stores.events.record(*events)

    asyncio.run(run())


def event_types(data: Path) -> list[str]:
    with sqlite3.connect(data / STORE_FILE) as db:
        return [row[0] for row in db.execute("SELECT type FROM events ORDER BY id")]


@pytest.mark.parametrize("written", ["6m", "6M", "6 m"])
def test_m_is_refused_naming_the_key_and_the_units(config: Path, written: str) -> None:
    """`open = "6m"` meant six months and kept opens for six minutes; now it stops with one
    line naming the key and every unit, before anything is purged."""
    data = config.parent / "data"
    seed(data, Event(EventType.OPEN, None, "c", "Q", machine=True, at=days_ago(1)))
    config.write_text(config.read_text() + f'[retention]\nopen = "{written}"\n')
    for command in (["purge"], ["purge", "--dry-run"], ["events"]):
        result = cli(config, *command)
        assert result.returncode == 2, result
        [line] = result.stderr.splitlines()
        assert line.startswith("optout-relay: error: config: retention.open: ")
        assert f"invalid age {written!r}" in line
        assert "'m' is ambiguous: write min for minutes or mo for months" in line
        assert UNITS in line and '"forever"' in line
    assert event_types(data) == ["open"]


@pytest.mark.parametrize("written", ["6 months", "1.5d", "0d", "180", "d", "-3d", "6mm"])
def test_anything_but_a_whole_number_and_a_unit_is_refused(written: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"retention": {"click": written}})
    assert caught.value.key == "retention.click"
    assert UNITS in str(caught.value)


def test_every_unit_reads_as_documented() -> None:
    written = {
        "open": "90s",
        "click": "45min",
        "unsubscribe": "36h",
        "delivered": "400d",
        "deferred": "2w",
        "bounced": "13mo",
        "suppressed": "1y",
        "other": "forever",
        "contacts": "2 Y",
    }
    retention = parse_settings({"retention": written}).retention
    assert retention.open == timedelta(seconds=90)
    assert retention.click == timedelta(minutes=45)
    assert retention.unsubscribe == timedelta(hours=36)
    assert retention.delivered == timedelta(days=400)
    assert retention.deferred == timedelta(weeks=2)
    assert retention.bounced == timedelta(days=13 * 30)
    assert retention.suppressed == timedelta(days=365)
    assert retention.other is None
    assert retention.contacts == timedelta(days=730)


def test_cli_keep_takes_the_same_units(config: Path) -> None:
    result = cli(config, "purge", "--keep", "open=6M")
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert "retention.open: invalid age '6M'" in line and UNITS in line


def test_the_embedded_defaults_purge_and_the_dry_run_shows_each_kind(config: Path) -> None:
    """No [retention] in the config: opens older than half a year go, an unsubscribe's proof
    stays five years, and event types without a key of their own go after 400 days."""
    data = config.parent / "data"
    seed(
        data,
        Event(EventType.OPEN, None, "c", "Q", machine=False, at=days_ago(200)),
        Event(EventType.OPEN, None, "c", "Q", machine=False, at=days_ago(100)),
        Event(EventType.CLICK, None, "c", "Q", machine=False, at=days_ago(181)),
        Event(EventType.UNSUBSCRIBE, None, "c", "Q", at=days_ago(4 * 365)),
        Event(EventType.DEFERRED, None, "c", "Q", at=days_ago(31)),
        Event(EventType.WARNING, None, "c", "Q", at=days_ago(401)),
        Event(EventType.WARNING, None, "c", "Q", at=days_ago(399)),
    )
    dry = cli(config, "purge", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0] == (
        "would purge 4 events (1 open, 1 click, 1 deferred, 1 other),"
        " 0 contacts, 0 lapsed suppressions"
    )
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["open"] == ["1", "older", "than", "180d"]
    assert rows["click"] == ["1", "older", "than", "180d"]
    assert rows["unsubscribe"] == ["0", "older", "than", "5y"]
    assert rows["deferred"] == ["1", "older", "than", "30d"]
    assert rows["other"] == ["1", "older", "than", "400d"]
    assert rows["contacts"] == ["0", "unused", "for", "2y"]
    assert rows["lapsed"] == ["suppressions", "0"]
    assert len(event_types(data)) == 7  # a dry run deletes nothing

    purged = cli(config, "purge")
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.splitlines() == [
        "purged 4 events (1 open, 1 click, 1 deferred, 1 other), 0 contacts, 0 lapsed suppressions"
    ]
    assert event_types(data) == ["open", "unsubscribe", "warning"]
    assert cli(config, "purge").stdout.splitlines() == ["purged nothing"]


def test_forever_keeps_a_kind_and_the_dry_run_says_so(config: Path) -> None:
    data = config.parent / "data"
    seed(data, Event(EventType.OPEN, None, "c", "Q", machine=False, at=days_ago(3650)))
    config.write_text(config.read_text() + '[retention]\nopen = "forever"\n')
    dry = cli(config, "purge", "--dry-run", "--keep", "click=forever")
    assert dry.returncode == 0, dry.stderr
    rows = {line.split()[0]: line.split()[1:] for line in dry.stdout.splitlines()[1:]}
    assert rows["open"] == ["-", "kept", "for", "ever"]
    assert rows["click"] == ["-", "kept", "for", "ever"]
    assert dry.stdout.splitlines()[0] == "would purge nothing"
    cli(config, "purge")
    assert event_types(data) == ["open"]
