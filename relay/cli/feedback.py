"""`optout-relay feedback ...`: what the feedback listener took, as the operator sees it.

Reports that matched no copy, auto-replies and anything else that changed nothing are kept
(state `kept`) for a person to read; these commands are how they are found and read."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..stores import Stores
from .common import config_option, settings_from, with_stores

STATES = ("new", "done", "kept")


def _line(report: dict[str, object]) -> str:
    outcome = report["outcome"]
    action = outcome.get("action", "") if isinstance(outcome, dict) else ""
    why = outcome.get("why", "") if isinstance(outcome, dict) else ""
    recipients = report["recipients"]
    to = ",".join(str(r) for r in recipients) if isinstance(recipients, list) else ""
    summary = f"{action}: {why}" if why else str(action)
    return (
        f"{report['id']:>8}  {report['state']:<4}  {report['received_at']}"
        f"  from=<{report['mail_from']}> to=<{to}> size={report['size']}  {summary}"
    ).rstrip()


@click.group()
def feedback() -> None:
    """Bounces, complaint reports and mailto: unsubscribes the feedback listener took."""


@feedback.command("list")
@config_option
@click.option(
    "--state",
    type=click.Choice(STATES),
    default=None,
    help="Only reports in this state: new (waiting), done (acted on), kept (for you to read).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="At most this many reports, newest first.",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "jsonl"]),
    default="text",
    show_default=True,
    help="text: one line each; jsonl: one JSON object each.",
)
def feedback_list(
    config_path: Path | None, state: str | None, limit: int, output_format: str
) -> None:
    """Reports taken, newest first, with what processing them did."""

    async def read(stores: Stores) -> list[dict[str, object]]:
        return await stores.feedback.reports(state, limit)

    reports = with_stores(settings_from(config_path), read, create=False)
    for report in reports:
        click.echo(json.dumps(report) if output_format == "jsonl" else _line(report))
    if output_format == "text" and not reports:
        click.echo("No feedback reports" + (f" in state {state}" if state else ""))


@feedback.command("show")
@config_option
@click.argument("report_id", type=int)
def feedback_show(config_path: Path | None, report_id: int) -> int:
    """One report: what was done with it, then the message as it arrived (exit 1 if there
    is no such report)."""
    found = with_stores(
        settings_from(config_path), lambda stores: stores.feedback.report(report_id), create=False
    )
    if found is None:
        click.echo(f"No feedback report {report_id}", err=True)
        return 1
    report, content = found
    click.echo(_line(report))
    click.echo(f"outcome: {json.dumps(report['outcome'])}")
    click.echo("")
    sys.stdout.flush()
    sys.stdout.buffer.write(content)
    sys.stdout.buffer.flush()
    return 0
