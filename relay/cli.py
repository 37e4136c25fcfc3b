"""`optout-relay`: a thin shell over the library, one library call per command."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from suppression import GLOBAL, Reason, SuppressionError

from .app import Stores, serve
from .config import Settings, load_settings
from .errors import ConfigError
from .logs import LogFormat, setup_logging

T = TypeVar("T")
PROG = "optout-relay"

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="TOML config file (default: the embedded defaults).",
)


def _settings(config_path: Path | None) -> Settings:
    return load_settings(config_path)


def _with_stores(settings: Settings, action: Callable[[Stores], Awaitable[T]]) -> T:
    async def run() -> T:
        async with Stores(settings) as stores:
            return await action(stores)

    return asyncio.run(run())


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
    settings = _settings(config_path)
    setup_logging(log_format)
    asyncio.run(serve(settings))


serve_command.name = "serve"


@cli.group()
def suppress() -> None:
    """Manage the suppression list."""


scope_option = click.option(
    "--scope",
    default=GLOBAL,
    show_default=True,
    help="'global', 'topic:NAME' or 'sender:DOMAIN'.",
)


@suppress.command("add")
@config_option
@scope_option
@click.option(
    "--reason",
    type=click.Choice([r.value for r in Reason]),
    default=Reason.MANUAL.value,
    show_default=True,
)
@click.argument("addresses", nargs=-1, required=True)
def suppress_add(
    config_path: Path | None, scope: str, reason: str, addresses: tuple[str, ...]
) -> None:
    """Suppress ADDRESSES (an existing suppression is kept as it is)."""

    async def add(stores: Stores) -> list[bool]:
        return [
            await stores.suppressions.add(a, scope=scope, reason=Reason(reason), source="cli")
            for a in addresses
        ]

    for address, added in zip(addresses, _with_stores(_settings(config_path), add), strict=True):
        click.echo(f"{'suppressed' if added else 'already suppressed'}: {address} ({scope})")


@suppress.command("remove")
@config_option
@click.option("--scope", default=None, help="Only this scope (default: every scope).")
@click.argument("address")
def suppress_remove(config_path: Path | None, scope: str | None, address: str) -> int:
    """Lift the suppression of ADDRESS. Exits 1 when there was none."""
    removed = _with_stores(
        _settings(config_path), lambda s: s.suppressions.remove(address, scope=scope)
    )
    click.echo(f"removed {removed} suppression{'s' if removed != 1 else ''} of {address}")
    return 0 if removed else 1


@suppress.command("check")
@config_option
@scope_option
@click.argument("address")
def suppress_check(config_path: Path | None, scope: str, address: str) -> int:
    """Exit 0 when ADDRESS is suppressed (globally or in --scope), 1 when not."""
    scopes = (GLOBAL, scope)
    found = _with_stores(_settings(config_path), lambda s: s.suppressions.check(address, scopes))
    if found is None:
        click.echo(f"not suppressed: {address}")
        return 1
    click.echo(
        f"suppressed: {address} ({found.scope}, {found.reason} via {found.source},"
        f" since {found.created_at})"
    )
    return 0


@suppress.command("list")
@config_option
@click.option("--scope", default=None, help="Only this scope.")
@click.option(
    "--format", "fmt", type=click.Choice(["text", "jsonl"]), default="text", show_default=True
)
def suppress_list(config_path: Path | None, scope: str | None, fmt: str) -> None:
    """List suppressions, oldest first."""
    entries = _with_stores(_settings(config_path), lambda s: s.suppressions.list(scope=scope))
    for entry in entries:
        if fmt == "jsonl":
            click.echo(
                json.dumps(
                    {
                        "address": entry.address,
                        "address_hash": entry.address_hash,
                        "scope": entry.scope,
                        "reason": entry.reason,
                        "source": entry.source,
                        "created_at": entry.created_at,
                    }
                )
            )
        else:
            click.echo(
                "\t".join(
                    [
                        entry.address or f"(erased {entry.address_hash})",
                        entry.scope,
                        entry.reason,
                        entry.source,
                        entry.created_at,
                    ]
                )
            )


@cli.command()
@config_option
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl", show_default=True)
def events(config_path: Path | None, fmt: str) -> None:
    """Print the event log, one JSON object per line, oldest first."""

    async def export(stores: Stores) -> None:
        async for event in stores.events.export():
            click.echo(json.dumps(event, ensure_ascii=False))

    _with_stores(_settings(config_path), export)


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
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(0)
    sys.exit(result if isinstance(result, int) else 0)
