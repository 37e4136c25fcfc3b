"""`optout-relay`: a thin shell over the library, one library call per command."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import click

from suppression import SuppressionError

from . import cli_account, cli_dkim, cli_queue, cli_suppress
from .app import serve
from .cli_common import PROG, config_option, settings_from, with_stores
from .errors import ConfigError
from .logs import LogFormat, setup_logging
from .runtime import Stores


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="optout-relay", prog_name=PROG)
def cli() -> None:
    """Email marketing compliance relay: suppression, one-click unsubscribe, open tracking."""


@cli.command()
@config_option
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines on stderr: Postfix-like text, or JSON for log shippers.",
)
def serve_command(config_path: Path | None, log_format: LogFormat) -> None:
    """Run the SMTP relay, the tracking endpoint and the delivery worker."""
    settings = settings_from(config_path)
    setup_logging(log_format)
    asyncio.run(serve(settings, log_format))


serve_command.name = "serve"


@cli.command()
@config_option
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl", show_default=True)
def events(config_path: Path | None, fmt: str) -> None:
    """Print the event log, one JSON object per line, oldest first."""

    async def export(stores: Stores) -> None:
        async for event in stores.events.export():
            click.echo(json.dumps(event, ensure_ascii=False))

    with_stores(settings_from(config_path), export)


cli_suppress.register(cli)
cli_queue.register(cli)
cli_dkim.register(cli)
cli_account.register(cli)


def _fail(message: str, code: int) -> None:
    click.echo(f"{PROG}: error: {message}", err=True)
    sys.exit(code)


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
    except ConfigError as exc:
        _fail(f"config: {exc}", 2)
    except SuppressionError as exc:
        _fail(str(exc), 2)
    except sqlite3.Error as exc:
        _fail(f"the data in the storage dir cannot be used: {exc}", 1)
    except OSError as exc:
        _fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), 1)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(0)
    sys.exit(result if isinstance(result, int) else 0)
