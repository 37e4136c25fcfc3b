"""`optout-relay suppress ...`: the suppression list from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import click

from suppression import GLOBAL, Reason

from .app import Stores
from .cli_common import config_option, settings_from, with_stores


@click.group()
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

    for address, added in zip(addresses, with_stores(settings_from(config_path), add), strict=True):
        click.echo(f"{'suppressed' if added else 'already suppressed'}: {address} ({scope})")


@suppress.command("remove")
@config_option
@click.option("--scope", default=None, help="Only this scope (default: every scope).")
@click.argument("address")
def suppress_remove(config_path: Path | None, scope: str | None, address: str) -> int:
    """Lift the suppression of ADDRESS. Exits 1 when there was none."""
    removed = with_stores(
        settings_from(config_path), lambda s: s.suppressions.remove(address, scope=scope)
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
    found = with_stores(settings_from(config_path), lambda s: s.suppressions.check(address, scopes))
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
    entries = with_stores(settings_from(config_path), lambda s: s.suppressions.list(scope=scope))
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


def register(cli: click.Group) -> None:
    """Add this module's commands to the top-level group."""
    cli.add_command(suppress)
