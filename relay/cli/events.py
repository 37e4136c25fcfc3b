"""`optout-relay events`: the event log as JSON lines or CSV, filtered by time, type and
campaign."""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from suppression import InvalidAge, format_time, parse_age
from suppression.formats import escape_cell
from tracking.events import EventFilter, EventType

from ..stores import Stores
from .common import config_option, settings_from, with_stores

CSV_COLUMNS = (
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
)


def _moment(value: str | None, option: str) -> str | None:
    """An ISO 8601 date or time (UTC unless it says otherwise), or an age back from now
    (`7d`, `12h`), in the events' time format."""
    if value is None:
        return None
    try:
        return format_time(datetime.now(UTC) - parse_age(value))
    except InvalidAge:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is neither a date or time (2026-03-01, 2026-03-01T12:00Z) nor an"
            " age (7d, 12h)",
            param_hint=f"'{option}'",
        ) from None
    return format_time(moment if moment.tzinfo else moment.replace(tzinfo=UTC))


def _csv_row(event: dict[str, Any]) -> list[str]:
    cells = []
    for column in CSV_COLUMNS:
        value = event.get(column)
        if value is None:
            cells.append("")
        elif column == "detail":
            cells.append(json.dumps(value, ensure_ascii=False, sort_keys=True))
        elif isinstance(value, bool):
            cells.append("true" if value else "false")
        else:
            # Campaign names and addresses come from senders: no formula reaches a sheet.
            cells.append(escape_cell(str(value)))
    return cells


@click.command()
@config_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "csv"]),
    default="jsonl",
    show_default=True,
    help="One JSON object per line, or CSV with a header row (cells a spreadsheet would run"
    " as formulas begin with an apostrophe).",
)
@click.option(
    "--since",
    metavar="WHEN",
    help="Only events at or after WHEN: a date or time (2026-03-01, 2026-03-01T12:00Z; UTC"
    " unless it says otherwise) or an age (7d, 12h).",
)
@click.option("--until", metavar="WHEN", help="Only events before WHEN (as --since).")
@click.option(
    "--type",
    "types",
    multiple=True,
    type=click.Choice(sorted(t.value for t in EventType)),
    help="Only events of this type; repeatable.",
)
@click.option("--campaign", "campaigns", multiple=True, help="Only this campaign; repeatable.")
def events(
    config_path: Path | None,
    fmt: str,
    since: str | None,
    until: str | None,
    types: tuple[str, ...],
    campaigns: tuple[str, ...],
) -> None:
    """Print the event log, oldest first.

    Each event has type, at (UTC), recipient (null once erased), campaign, queue_id (the
    relay's), message_id (the message's Message-ID), and for opens and clicks machine and
    count.
    """
    only = EventFilter(_moment(since, "--since"), _moment(until, "--until"), types, campaigns)
    writer = csv.writer(sys.stdout, lineterminator="\n")

    async def export(stores: Stores) -> None:
        if fmt == "csv":
            writer.writerow(CSV_COLUMNS)
        # aclosing: a reader that stops early (`| head`) ends the export here.
        async with contextlib.aclosing(stores.events.export(only)) as found:
            async for event in found:
                if fmt == "csv":
                    writer.writerow(_csv_row(event))
                else:
                    click.echo(json.dumps(event, ensure_ascii=False))

    with_stores(settings_from(config_path), export, create=False)
