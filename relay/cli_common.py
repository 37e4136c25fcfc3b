"""What every CLI command shares: the --config option and opening the stores."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import click

from .config import Settings, load_settings
from .runtime import Stores

T = TypeVar("T")
PROG = "optout-relay"

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="TOML config file (default: the embedded defaults).",
)


def settings_from(config_path: Path | None) -> Settings:
    return load_settings(config_path)


def with_stores(settings: Settings, action: Callable[[Stores], Awaitable[T]]) -> T:
    async def run() -> T:
        async with Stores(settings) as stores:
            return await action(stores)

    return asyncio.run(run())
