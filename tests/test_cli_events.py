"""`optout-relay events`: filtered by time, type and campaign; JSON lines or CSV."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from relay.config import load_settings
from relay.stores import Stores
from suppression import format_time
from tests.helpers import cli
from tracking.events import Event, EventType

AN_HOUR_AGO = datetime.now(UTC) - timedelta(hours=1)


def recorded(config: Path) -> None:
    """A month of events of two campaigns, one with a name a spreadsheet would run."""

    async def record() -> None:
        async with Stores(load_settings(config)) as stores:
            await stores.suppressions.remember(["ann@example.org"])
            ann = stores.suppressions.hasher.hash("ann@example.org")
            await stores.events.record(
                Event(
                    EventType.DELIVERED,
                    ann,
                    "spring",
                    "Q1",
                    at="2026-03-01T09:00:00.000Z",
                    message_id="<s@shop.example>",
                ),
                Event(
                    EventType.OPEN,
                    ann,
                    "spring",
                    "Q1",
                    machine=False,
                    at="2026-03-02T10:00:00.000Z",
                ),
                Event(
                    EventType.DELIVERED, ann, '=HYPERLINK("x")', "Q2", at="2026-03-15T09:00:00.000Z"
                ),
                Event(
                    EventType.UNSUBSCRIBE,
                    ann,
                    "spring",
                    "Q1",
                    detail={"method": "page"},
                    at="2026-03-31T23:59:59.999Z",
                ),
                Event(EventType.BOUNCED, ann, "summer", "Q3", at=format_time(AN_HOUR_AGO)),
            )

    asyncio.run(record())


def jsonl(config: Path, *options: str) -> list[tuple[str, str, str]]:
    result = cli(config, "events", *options)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    return [(e["type"], e["at"][:10], e["campaign"]) for e in events]


def test_filters_by_time_type_and_campaign(config: Path) -> None:
    recorded(config)
    assert len(jsonl(config)) == 5
    assert jsonl(config, "--since", "2026-03-02", "--until", "2026-03-31") == [
        ("open", "2026-03-02", "spring"),
        ("delivered", "2026-03-15", '=HYPERLINK("x")'),
    ]
    # A time with an offset is the moment it names; an until is exclusive.
    assert jsonl(
        config, "--since", "2026-03-02T11:00+01:00", "--until", "2026-03-02T10:00:00.001Z"
    ) == [
        ("open", "2026-03-02", "spring"),
    ]
    assert jsonl(config, "--since", "1d") == [
        ("bounced", AN_HOUR_AGO.strftime("%Y-%m-%d"), "summer")
    ]
    assert jsonl(
        config, "--type", "delivered", "--type", "unsubscribe", "--campaign", "spring"
    ) == [
        ("delivered", "2026-03-01", "spring"),
        ("unsubscribe", "2026-03-31", "spring"),
    ]
    assert jsonl(config, "--campaign", "autumn") == []


def test_csv_has_a_header_and_no_formula_cells(config: Path) -> None:
    recorded(config)
    result = cli(config, "events", "--format", "csv", "--until", "2026-04-01")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == [
        "type",
        "at",
        "recipient",
        "campaign",
        "queue_id",
        "message_id",
        "machine",
        "count",
        "last_at",
        "detail",
    ]
    assert [(r["type"], r["campaign"], r["machine"]) for r in rows] == [
        ("delivered", "spring", ""),
        ("open", "spring", "false"),
        ("delivered", '\'=HYPERLINK("x")', ""),
        ("unsubscribe", "spring", ""),
    ]
    assert rows[0]["message_id"] == rows[1]["message_id"] == "<s@shop.example>"
    assert rows[3]["detail"] == '{"method": "page"}'
    assert all(r["recipient"] == "ann@example.org" for r in rows)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--since", "last tuesday"), "'--since': 'last tuesday' is neither a date or time"),
        (("--until", "6m"), "'--until': '6m' is neither a date or time"),
        (("--type", "opened"), "'--type': 'opened' is not one of"),
    ],
)
def test_a_bad_filter_is_one_line_and_exit_2(
    config: Path, options: tuple[str, ...], message: str
) -> None:
    recorded(config)
    result = cli(config, "events", *options)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr
