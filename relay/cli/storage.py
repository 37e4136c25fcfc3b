"""`optout-relay storage migrate|copy`: the store's schema, and moving to a shared store."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import click

from .common import config_option, settings_from


@click.group()
def storage() -> None:
    """The store: upgrade its schema, or copy an SQLite store into PostgreSQL."""


@storage.command()
@config_option
def migrate(config_path: Path | None) -> None:
    """Create or upgrade the configured store's schema in place (serve does it at start)."""
    from ..storage import migrate as run

    where, applied = asyncio.run(run(settings_from(config_path)))
    if applied:
        click.echo(f"{where}: applied {len(applied)} migrations: {', '.join(applied)}")
    else:
        click.echo(f"{where}: up to date")


@storage.command()
@config_option
@click.option(
    "--to",
    "url",
    required=True,
    metavar="postgresql://...",
    help="The PostgreSQL database to copy the data dir's SQLite store (and keys) into.",
)
def copy(config_path: Path | None, url: str) -> None:
    """Copy the SQLite store in storage.dir into a PostgreSQL database: idempotent and
    resumable (run it again after a stop). Then set storage.database to that URL."""
    from suppression.postgres import redacted

    from ..storage import CopyRefused, copy_to

    bar: Any = None

    def on_total(total: int) -> None:
        nonlocal bar
        bar = click.progressbar(length=total, label="copying", file=sys.stderr)
        bar.__enter__()

    def advance(count: int) -> None:
        if bar is not None:
            bar.update(count)

    try:
        report = asyncio.run(
            copy_to(settings_from(config_path), url, on_total=on_total, advance=advance)
        )
    except CopyRefused as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    for name, (read, added) in report.tables.items():
        click.echo(f"{name}: {read} rows, {added} added")
    click.echo(f"copied into {redacted(url)}; set storage.database to use it")
