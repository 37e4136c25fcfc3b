"""`optout-relay`: a thin shell over the library, one library call per command.

Each command group lives in a module of its own, imported only when that command runs:
`suppress check` loads the suppression store, not the SMTP server, the HTTP app, the
rewrite engine or delivery.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError, MissingStore


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector runs again and again while modules make their classes
    (several dozen dataclasses), though none of it is garbage: paused while the CLI loads
    what a command needs, and what was loaded is then frozen (gc.freeze), never scanned
    again, as it lives as long as the process. About a fifth of `suppress check`'s
    start-up; a long command (serve) collects its own garbage as usual."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


with _collector_paused():
    from .common import CONFIG_ENV, PROG, remember_config

# name -> "module:attribute" of its click command, relative to this package.
COMMANDS = {
    "serve": "serve:serve",
    "suppress": "suppress:suppress",
    "subject": "subject:subject",
    "purge": "subject:purge_command",
    "events": "events:events",
    "queue": "queue:queue",
    "dkim": "dkim:dkim",
    "account": "account:account",
    "webhooks": "webhooks:webhooks",
    "stats": "stats:stats",
    "feedback": "feedback:feedback",
    "consent": "consent:consent",
    "storage": "storage:storage",
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use (click's documented pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        with _collector_paused():
            module = importlib.import_module(f".{module_name}", __name__)
        command = getattr(module, attribute)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="optout-relay", prog_name=PROG)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help=f"TOML config file, for every command (also accepted after the command;"
    f" default: ${CONFIG_ENV}, else the embedded defaults).",
)
def cli(config_path: Path | None) -> None:
    """Email marketing compliance relay: suppression, one-click unsubscribe, open tracking."""
    remember_config(config_path)


def _fail(message: str, code: int) -> None:
    click.echo(f"{PROG}: error: {message}", err=True)
    sys.exit(code)


def _known_error(exc: Exception) -> tuple[str, int] | None:
    """The one line and exit code for an error the library raises on purpose. Checked by
    module, so the CLI imports no store it did not use: an error of a module that is not
    loaded cannot have been raised."""
    if isinstance(exc, ConfigError):
        return f"config: {exc}", 2
    if isinstance(exc, MissingStore):
        return str(exc), 2
    suppression = sys.modules.get("suppression")
    if suppression is not None and isinstance(exc, suppression.SuppressionError):
        return str(exc), 2
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(exc, psycopg.Error):
        return f"the shared database cannot be used: {exc}", 1
    sqlite3 = sys.modules.get("sqlite3")
    if sqlite3 is not None and isinstance(exc, sqlite3.Error):
        return f"the data in the storage dir cannot be used: {exc}", 1
    if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError):
        return f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), 1
    return None


def main(argv: list[str] | None = None) -> None:
    """Entry point: every error is one line on stderr and an exit code, never a traceback."""
    try:
        result: Any = cli.main(args=argv, prog_name=PROG, standalone_mode=False)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        _fail(f"{exc.format_message()}{hint}", 2)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except click.Abort:
        _fail("aborted", 130)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (`| head`): what it wanted it has. Python would still try to
        # flush stdout at exit and complain; point it at /dev/null first (Python's own
        # advice for SIGPIPE).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    except Exception as exc:
        known = _known_error(exc)
        if known is None:
            raise
        _fail(*known)
    sys.exit(result if isinstance(result, int) else 0)
