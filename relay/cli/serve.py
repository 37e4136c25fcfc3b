"""`optout-relay serve`: the relay itself."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from ..app import serve as run_relay
from ..logs import LogFormat, setup_logging
from .common import config_option, settings_from


@click.command()
@config_option
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines on stderr: Postfix-like text, or JSON for log shippers.",
)
def serve(config_path: Path | None, log_format: LogFormat) -> None:
    """Run the SMTP relay, the tracking endpoint and the delivery worker."""
    settings = settings_from(config_path)
    setup_logging(log_format)
    asyncio.run(run_relay(settings, log_format))
