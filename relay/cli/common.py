"""What the CLI's commands share: the --config and --actor options, opening the stores,
and owner-only output files."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO, TypeVar

import click

from ..config import load_settings
from ..settings import Settings
from ..stores import Stores

T = TypeVar("T")
PROG = "optout-relay"

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="TOML config file (default: the embedded defaults).",
)
actor_option = click.option(
    "--actor",
    default=None,
    help="Who made the change, for the audit log (default: the OS user).",
)


def settings_from(config_path: Path | None) -> Settings:
    return load_settings(config_path)


def with_stores(settings: Settings, action: Callable[[Stores], Awaitable[T]]) -> T:
    """Run `action` on the opened stores (their normalisation checked) and close them."""

    async def run() -> T:
        async with Stores(settings) as stores:
            return await action(stores)

    return asyncio.run(run())


def actor_of(actor: str | None) -> str:
    """Who ran the command, for the audit log."""
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@contextlib.contextmanager
def open_output(output: Path | None) -> Iterator[IO[str]]:
    """`output` created mode 0600, or stdout."""
    if output is None:
        yield sys.stdout
        return
    # Suppression lists and data-subject exports are personal data: owner-only from the start.
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w", encoding="utf-8", newline="") as out:
        yield out


output_option = click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write to this file (created mode 0600) instead of stdout.",
)
