"""`optout-relay stats`: campaign numbers, rates and warnings, from the rolled-up counts."""

from __future__ import annotations

import csv
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from suppression import InvalidAge, parse_age
from tracking.statistics import CampaignStats, GroupBy, Selection

from ..stores import Stores
from .common import config_option, settings_from, with_stores

# Text columns: (heading, key of the JSON object, width).
_COLUMNS = (
    ("sent", "sent", 9),
    ("deliv", "delivered", 9),
    ("defer", "deferred", 7),
    ("hard", "bounced_hard", 6),
    ("soft", "bounced_soft", 6),
    ("compl", "complaints", 6),
    ("unsub", "unsubscribes", 6),
    ("open-h", "opens_human", 8),
    ("open-m", "opens_machine", 8),
    ("click-h", "clicks_human", 8),
)
_RATES = (
    ("delivered", "delivery_rate"),
    ("hard bounces", "hard_bounce_rate"),
    ("complaints", "complaint_rate"),
    ("unsubscribes", "unsubscribe_rate"),
    ("human opens", "open_rate_human"),
    ("human clicks", "click_rate_human"),
)


_MEASURED = (
    ("human opens", "opens_human"),
    ("machine opens", "opens_machine"),
    ("human clicks", "clicks_human"),
    ("machine clicks", "clicks_machine"),
)


def _name(row: dict[str, Any], group_by: GroupBy) -> str:
    value = row[group_by]
    return "(none)" if value is None else str(value)


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.2f}%"


def _text(rows: list[dict[str, Any]], group_by: GroupBy) -> None:
    if not rows:
        click.echo("No statistics yet")
        return
    width = max(12, *(len(_name(row, group_by)) for row in rows))
    heading = f"{group_by:<{width}}" + "".join(f"{h:>{w}}" for h, _, w in _COLUMNS)
    click.echo(heading)
    for row in rows:
        click.echo(
            f"{_name(row, group_by):<{width}}"
            + "".join(f"{row[key]:>{w}}" for _, key, w in _COLUMNS)
        )
        rates = ", ".join(f"{label} {_percent(row[key])}" for label, key in _RATES)
        click.echo(f"{'':<{width}}  {rates}")
        aggregate = ", ".join(
            f"{label} {row[key + '_aggregate']}"
            for label, key in _MEASURED
            if row[key + "_aggregate"]
        )
        if aggregate:
            click.echo(f"{'':<{width}}  of which in aggregate, naming nobody: {aggregate}")
        for warning in row["warnings"]:
            click.echo(f"{'':<{width}}  WARNING: {warning}")


def _csv(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "warnings": "; ".join(row["warnings"])})


def _since(age: str | None) -> datetime | None:
    if age is None:
        return None
    try:
        return datetime.now(UTC) - parse_age(age)
    except InvalidAge:
        raise click.BadParameter(f"{age!r} is not an age such as 7d, 24h or 12w") from None


@click.command()
@config_option
@click.option("--campaign", default=None, help="Only this campaign.")
@click.option("--since", "age", default=None, help="Only the last AGE (7d, 24h, 12w), by hour.")
@click.option(
    "--by",
    "group_by",
    type=click.Choice(["campaign", "domain"]),
    default="campaign",
    show_default=True,
    help="One line per campaign, or per sending (From) domain.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "csv"]),
    default="text",
    show_default=True,
    help="A table to read, a JSON list of objects, or CSV with one column per figure.",
)
def stats(
    config_path: Path | None, campaign: str | None, age: str | None, group_by: GroupBy, fmt: str
) -> None:
    """Sent, delivered, bounced, complaints, unsubscribes, human and machine opens and
    clicks (unique per recipient where measured individually, plus those counted in
    aggregate; JSON and CSV give each part), their rates, and warnings past Gmail's
    complaint lines (0.1%, 0.3%) or 2% hard bounces."""
    selection = Selection.since(_since(age), campaign, group_by)

    async def read(stores: Stores) -> list[CampaignStats]:
        return await stores.statistics.report(selection)

    rows = [one.as_dict() for one in with_stores(settings_from(config_path), read)]
    if fmt == "json":
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
    elif fmt == "csv":
        _csv(rows)
    else:
        _text(rows, group_by)
