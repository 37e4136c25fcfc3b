"""`optout-relay queue ...`: the spool as an operator sees it, like Postfix's mailq/postsuper."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import click

from ..spool import QueueEntry, Spool, iso_utc
from ..stores import SPOOL_FILE, ensure_private_dir
from .common import PROG, config_option, settings_from

T = TypeVar("T")


def _with_spool(config_path: Path | None, action: Callable[[Spool], Awaitable[T]]) -> T:
    settings = settings_from(config_path)
    if settings.storage.database is not None:
        # The store is shared, the spool is not: say whose mail this is.
        click.echo(
            f"{PROG}: queue of this node only ({settings.storage.dir}); every node keeps its own",
            err=True,
        )

    async def run() -> T:
        ensure_private_dir(settings.storage.dir)
        spool = await Spool.open(settings.storage.dir / SPOOL_FILE)
        try:
            return await action(spool)
        finally:
            await spool.close()

    return asyncio.run(run())


def _describe(entry: QueueEntry) -> list[str]:
    sender = entry.mail_from or "<>"
    lines = [
        f"{entry.queue_id}  {entry.size:>9}  {entry.received_at}  {sender}"
        f"{'  (delivery report)' if entry.kind == 'dsn' else ''}"
    ]
    if entry.last_reply:
        lines.append(f"    ({entry.last_reply})")
    lines.append(f"    next attempt {iso_utc(entry.next_attempt_at)}, attempts {entry.attempts}")
    lines.extend(f"    {recipient}" for recipient in entry.recipients)
    return lines


@click.group()
def queue() -> None:
    """Inspect and manage mail waiting for delivery (in this node's spool)."""


@queue.command("list")
@config_option
def queue_list(config_path: Path | None) -> None:
    """Waiting messages, oldest first, with their recipients and last reply."""
    entries = _with_spool(config_path, lambda spool: spool.entries())
    if not entries:
        click.echo("Mail queue is empty")
        return
    for entry in entries:
        click.echo("\n".join(_describe(entry)))
    total = sum(len(e.recipients) for e in entries)
    click.echo(f"-- {len(entries)} messages, {total} recipients waiting")


@queue.command("show")
@config_option
@click.argument("queue_id")
def queue_show(config_path: Path | None, queue_id: str) -> int:
    """Print one waiting message as it was received. Exits 1 when there is no such message."""

    async def read(spool: Spool) -> tuple[list[QueueEntry], bytes | None]:
        return await spool.entries(queue_id), await spool.content(queue_id)

    entries, content = _with_spool(config_path, read)
    if not entries or content is None:
        click.echo(f"no such message in the queue: {queue_id}", err=True)
        return 1
    click.echo("\n".join(_describe(entries[0])))
    click.echo("")
    sys.stdout.flush()
    sys.stdout.buffer.write(content)
    sys.stdout.buffer.flush()
    return 0


@queue.command("retry")
@config_option
@click.argument("queue_id", required=False)
def queue_retry(config_path: Path | None, queue_id: str | None) -> int:
    """Make QUEUE_ID (or every message) due now; the running relay picks it up within seconds."""
    changed = _with_spool(config_path, lambda spool: spool.retry_now(queue_id))
    click.echo(f"{changed} deliveries due now")
    return 0 if changed or queue_id is None else 1


@queue.command("delete")
@config_option
@click.argument("queue_id")
def queue_delete(config_path: Path | None, queue_id: str) -> int:
    """Drop QUEUE_ID without delivering it or telling its sender. Exits 1 when not found."""
    removed = _with_spool(config_path, lambda spool: spool.delete(queue_id))
    if not removed:
        click.echo(f"no such message in the queue: {queue_id}", err=True)
        return 1
    click.echo(f"deleted {queue_id} ({removed} deliveries)")
    return 0
