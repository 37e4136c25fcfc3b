"""What the CLI's commands share: the --config, --actor and --note options, opening the
stores, input files and owner-only output files, how a change in an audit log reads."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from suppression.addresses import split_address

from ..config import load_settings
from ..settings import Settings
from ..stores import Stores

T = TypeVar("T")
PROG = "optout-relay"

CONFIG_ENV = "OPTOUT_RELAY_CONFIG"
_CONFIG_META = "optout_relay.config"

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help=f"TOML config file (also accepted before the command;"
    f" default: ${CONFIG_ENV}, else the embedded defaults).",
)
actor_option = click.option(
    "--actor",
    default=None,
    help="Who made the change, for the audit log (default: the OS user).",
)


def group_config_option(group: Callable[[], None]) -> Callable[..., None]:
    """`--config` on a command group (`suppress --config F list`), kept for its commands."""

    @config_option
    @functools.wraps(group)
    def with_config(config_path: Path | None) -> None:
        remember_config(config_path)
        group()

    return with_config


def remember_config(config_path: Path | None) -> None:
    """`--config` given before the command: kept for the command to find (`config_file`)."""
    context = click.get_current_context(silent=True)
    if context is not None and config_path is not None:
        before = context.meta.get(_CONFIG_META)
        if before is not None and before != config_path:
            raise click.UsageError(f"--config given twice: {before} and {config_path}")
        context.meta[_CONFIG_META] = config_path


def config_file(config_path: Path | None) -> Path | None:
    """The config file to read: `--config` after the command or before it (the same file
    if both), else $OPTOUT_RELAY_CONFIG, else none (the embedded defaults)."""
    context = click.get_current_context(silent=True)
    before = None if context is None else context.meta.get(_CONFIG_META)
    if config_path is not None and before is not None and config_path != before:
        raise click.UsageError(f"--config given twice: {before} and {config_path}")
    chosen = config_path or before
    if chosen is None and os.environ.get(CONFIG_ENV):
        chosen = Path(os.environ[CONFIG_ENV])
    return chosen


def settings_from(config_path: Path | None) -> Settings:
    return load_settings(config_file(config_path))


def with_stores(
    settings: Settings, action: Callable[[Stores], Awaitable[T]], *, create: bool = True
) -> T:
    """Run `action` on the opened stores (their normalisation checked) and close them.

    `create=False` for a command that only reads: no store is then MissingStore (exit 2),
    not a new empty one.
    """

    async def run() -> T:
        async with Stores(settings, create=create) as stores:
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


def _valid_address(_context: click.Context, _param: click.Parameter, value: str) -> str:
    """An address that can be one (InvalidAddress, one line and exit 2, otherwise), checked
    before any store is opened: bad input is told as such, wherever the store is."""
    split_address(value)
    return value


address_argument = click.argument("address", callback=_valid_address)

output_option = click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write to this file (created mode 0600) instead of stdout.",
)


MAX_NOTE = 1000


def note_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--note TEXT: free text kept with a change in the audit log."""
    return click.option(
        "--note", default=None, metavar="TEXT", callback=_checked_note, help=help_text
    )


def _checked_note(_context: click.Context, _param: click.Parameter, note: str | None) -> str | None:
    if note is not None and (len(note) > MAX_NOTE or not note.isprintable()):
        raise click.BadParameter(
            f"at most {MAX_NOTE} printable characters on one line", param_hint="'--note'"
        )
    return note or None


@contextlib.contextmanager
def open_input(file: str) -> Iterator[IO[bytes]]:
    """FILE as bytes, or standard input for `-`."""
    if file == "-":
        yield sys.stdin.buffer
        return
    with open(file, "rb") as raw:
        yield raw


def audit_line(change: dict[str, Any], words: list[str]) -> str:
    """One change of an audit log on one line: its time and action, the caller's `words`
    (scope, reason), then where it came from, who made it and its detail."""
    line = [change["at"], change["action"], *words]
    if change["source"]:
        line.append(f"via {change['source']}")
    if change["actor"]:
        line.append(f"by {change['actor']}")
    detail = {k: v for k, v in (change["detail"] or {}).items() if v is not None}
    if detail:
        line.append(json.dumps(detail, ensure_ascii=False, sort_keys=True))
    return " ".join(line)
