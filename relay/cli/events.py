"""`optout-relay events`: the event log as JSON lines."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..stores import Stores
from .common import config_option, settings_from, with_stores


@click.command()
@config_option
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl", show_default=True)
def events(config_path: Path | None, fmt: str) -> None:
    """Print the event log, one JSON object per line, oldest first."""

    async def export(stores: Stores) -> None:
        async for event in stores.events.export():
            click.echo(json.dumps(event, ensure_ascii=False))

    with_stores(settings_from(config_path), export, create=False)
