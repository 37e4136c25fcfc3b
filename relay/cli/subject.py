"""`optout-relay subject ...` and `purge`: data-subject requests (GDPR Arts. 15 and 17)
and retention."""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from suppression import DataHolder, Outcome, erase_subject, export_subject
from suppression.holders import outbox_holder, spool_holder
from tracking.modes import measured
from tracking.retention import PurgeReport, Retention, purge

from ..spool import Spool
from ..stores import OUTBOX_DIR, SPOOL_FILE, Stores
from .common import (
    PROG,
    actor_of,
    actor_option,
    address_argument,
    config_option,
    group_config_option,
    open_output,
    output_option,
    settings_from,
    with_stores,
)

T = TypeVar("T")


@click.group()
@group_config_option
def subject() -> None:
    """Data-subject requests: export or erase everything held about an address."""


async def _with_holders(stores: Stores, action: Callable[[list[DataHolder]], Awaitable[T]]) -> T:
    """The event log, the spool (when there is one) and the outbox, for a subject request."""
    settings = stores.settings
    holders = [
        stores.events.holder(),
        stores.consents.holder(measured(settings.tracking_modes())),
        stores.webhooks.holder(),
    ]
    spool_path = settings.storage.dir / SPOOL_FILE
    spool = await Spool.open(spool_path) if spool_path.exists() else None
    try:
        if spool is not None:
            holders.append(spool_holder(spool, spool_path))
        holders.append(outbox_holder(settings.storage.dir / OUTBOX_DIR))
        return await action(holders)
    finally:
        if spool is not None:
            await spool.close()


@subject.command("export")
@config_option
@output_option
@actor_option
@address_argument
def subject_export(
    config_path: Path | None, output: Path | None, actor: str | None, address: str
) -> None:
    """Print everything held about ADDRESS as JSON (GDPR Art. 15)."""

    async def run(stores: Stores) -> dict[str, Any]:
        return await _with_holders(
            stores,
            lambda holders: export_subject(
                stores.suppressions, address, holders, actor=actor_of(actor)
            ),
        )

    document = with_stores(settings_from(config_path), run, create=False)
    with open_output(output) as out:
        out.write(json.dumps(document, ensure_ascii=False, indent=2, default=str) + "\n")


@subject.command("erase")
@config_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@actor_option
@address_argument
def subject_erase(config_path: Path | None, yes: bool, actor: str | None, address: str) -> None:
    """Erase the personal data of ADDRESS everywhere (GDPR Art. 17); keep it suppressed.

    The plain address leaves the suppression list and the contacts; its events are
    anonymised (they still count in their campaigns); deliveries to it waiting in the spool
    are cancelled, and messages waiting for others lose it from To/Cc; outbox files that
    mention it are deleted. A keyed hash stays as a global suppression, so mail to it is
    still refused, and the erasure is recorded. Without --yes, asks on a terminal and
    refuses anywhere else.
    """
    if not yes:
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            raise click.UsageError("erasure cannot be undone: pass --yes to confirm")
        click.confirm(f"Erase all personal data of {address}? It cannot be undone", abort=True)

    async def run(stores: Stores) -> Any:
        return await _with_holders(
            stores,
            lambda holders: erase_subject(
                stores.suppressions, address, holders, actor=actor_of(actor)
            ),
        )

    report = with_stores(settings_from(config_path), run)
    tombstone = "added" if report.tombstone is Outcome.ADDED else "already there"
    click.echo(f"erased {address} (key {report.address_hash}):")
    click.echo(
        f"  suppressions: {report.suppressions_kept} kept, by key only, address deleted"
        f" (global suppression by key {tombstone}: mail to it stays refused)"
    )
    click.echo(f"  contact: {'deleted' if report.contact_deleted else 'none held'}")
    for name, effects in report.effects.items():
        done = ", ".join(f"{count} {effect}" for effect, count in effects.items())
        click.echo(f"  {name}: {done}")
    if report.effects.get("events", {}).get("anonymised"):
        click.echo("  (anonymised events keep their campaign counts, without the address)")
    if not report.checkpointed:
        click.echo(
            f"{PROG}: warning: a running process kept old pages in the WAL;"
            " run the erasure again once it is idle",
            err=True,
        )


def _keep(values: tuple[str, ...], base: Retention) -> Retention:
    table: dict[str, object] = {}
    for value in values:
        kind, sep, age = value.partition("=")
        if not sep:
            raise click.BadParameter(f"{value!r} is not KIND=AGE", param_hint="'--keep'")
        table[kind.strip()] = age.strip()
    try:
        return Retention.parse(table, base)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--keep'") from None


@click.command("purge")
@config_option
@click.option(
    "--keep",
    multiple=True,
    metavar="KIND=AGE",
    help="Keep KIND (open, click, delivered, ..., other, contacts) for AGE, e.g. open=180d"
    " or open=forever; overrides [retention] in the config. Repeatable.",
)
@click.option(
    "--dry-run", is_flag=True, help="Show what would be deleted, per kind; delete nothing."
)
def purge_command(config_path: Path | None, keep: tuple[str, ...], dry_run: bool) -> None:
    """Delete events and contacts older than their retention, and lapsed suppressions."""
    settings = settings_from(config_path)
    retention = _keep(keep, settings.retention)

    async def run(stores: Stores) -> PurgeReport:
        return await purge(
            stores.events,
            stores.suppressions,
            retention,
            dry_run=dry_run,
            keep_last_open_only=settings.tracking.keep_last_open_only,
        )

    report = with_stores(settings, run)
    click.echo(report.summary())
    if dry_run:
        click.echo("\n".join(report.table()))
