"""`optout-relay queue ...`: the spool as an operator sees it, like Postfix's mailq/postsuper.

Commands that act on messages take queue ids, `ALL` for every message, or `-` to read ids
from standard input, one per line (the first word of each line, so `queue list` output
piped through grep works, as with `postsuper -d -`).
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import click

from ..errors import MissingStore
from ..spool import QueueEntry, Spool, iso_utc
from ..spool.state import Pause, current_pause
from ..stores import SPOOL_FILE
from .common import PROG, config_option, settings_from

T = TypeVar("T")
ALL = "ALL"
# A queue id as `queue list` prints it, with Postfix's status marks allowed after it.
_QUEUE_ID = re.compile(r"^([0-9A-F]{12})[!*]?$")


def _with_spool(config_path: Path | None, action: Callable[[Spool], Awaitable[T]]) -> T:
    """Run `action` on the spool of the data dir; MissingStore (exit 2) when there is none:
    only `serve` creates it."""
    settings = settings_from(config_path)
    path = settings.storage.dir / SPOOL_FILE
    if settings.storage.database is not None:
        # The store is shared, the spool is not: say whose mail this is (or is not).
        click.echo(
            f"{PROG}: queue of this node only ({settings.storage.dir}); every node keeps its own",
            err=True,
        )
    if not path.exists():
        raise MissingStore(path)

    async def run() -> T:
        spool = await Spool.open(path, reserve=settings.storage.reserve)
        try:
            return await action(spool)
        finally:
            await spool.close()

    return asyncio.run(run())


def _pause(config_path: Path | None) -> Pause | None:
    return current_pause(settings_from(config_path).storage.dir)


def _describe(entry: QueueEntry) -> list[str]:
    sender = entry.mail_from or "<>"
    mark = "!" if entry.held else ""  # as Postfix's mailq marks the hold queue
    lines = [
        f"{entry.queue_id}{mark}  {entry.size:>9}  {entry.received_at}  {sender}"
        f"{'  (delivery report)' if entry.kind == 'dsn' else ''}"
    ]
    if entry.held:
        lines.append(f"    (held: {entry.held_reason or 'by the operator'})")
    if entry.last_reply:
        lines.append(f"    ({entry.last_reply})")
    if entry.held:
        lines.append(f"    not tried while held, attempts {entry.attempts}")
    else:
        lines.append(
            f"    next attempt {iso_utc(entry.next_attempt_at)}, attempts {entry.attempts}"
        )
    lines.extend(f"    {recipient}" for recipient in entry.recipients)
    return lines


def _pause_line(pause: Pause) -> str:
    return f"delivery is paused until {iso_utc(pause.until)}: next hop unreachable ({pause.reason})"


def _targets(ids: Sequence[str]) -> list[str] | None:
    """The queue ids named (None: ALL). `-` reads them from standard input."""
    if not ids:
        raise click.UsageError("name queue ids, ALL, or - to read them from standard input")
    if ALL in ids:
        if len(ids) > 1:
            raise click.UsageError("ALL stands alone")
        return None
    named: list[str] = []
    for item in ids:
        if item == "-":
            for line in sys.stdin:
                words = line.split()
                found = _QUEUE_ID.match(words[0]) if words else None
                if found:
                    named.append(found.group(1))
        else:
            named.append(item.rstrip("!*"))
    return list(dict.fromkeys(named))


@click.group()
def queue() -> None:
    """Inspect and manage mail waiting for delivery (in this node's spool)."""


@queue.command("list")
@config_option
def queue_list(config_path: Path | None) -> None:
    """Waiting messages, oldest first, with their recipients and last reply. Held
    messages are marked `!` after their queue id."""
    entries = _with_spool(config_path, lambda spool: spool.entries())
    pause = _pause(config_path)
    if pause is not None:
        click.echo(_pause_line(pause))
    if not entries:
        click.echo("Mail queue is empty")
        return
    for entry in entries:
        click.echo("\n".join(_describe(entry)))
    total = sum(len(e.recipients) for e in entries)
    held = sum(1 for e in entries if e.held)
    summary = f"-- {len(entries)} messages, {total} recipients waiting"
    click.echo(summary + (f", {held} held" if held else ""))


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
@click.argument("queue_ids", nargs=-1)
def queue_retry(config_path: Path | None, queue_ids: tuple[str, ...]) -> int:
    """Make the named messages (default: ALL) due now; the running relay picks them up
    within seconds, unless delivery is paused because the next hop does not answer, which
    it says. Held messages stay held (`queue release`). Exits 1 if a named one is missing."""
    targets = _targets(queue_ids or (ALL,))

    async def retry(spool: Spool) -> tuple[int, list[str]]:
        if targets is None:
            return await spool.retry_now(None), []
        changed, missing = 0, []
        for queue_id in targets:
            count = await spool.retry_now(queue_id)
            changed += count
            if not count:
                missing.append(queue_id)
        return changed, missing

    changed, missing = _with_spool(config_path, retry)
    click.echo(f"{changed} deliveries due now")
    pause = _pause(config_path)
    if pause is not None and changed:
        click.echo(f"{_pause_line(pause)}; they go out then")
    for queue_id in missing:
        click.echo(f"no such message waiting (or it is held): {queue_id}", err=True)
    return 1 if missing else 0


def _each(
    config_path: Path | None,
    queue_ids: tuple[str, ...],
    act: Callable[[Spool, str | None], Awaitable[list[str]]],
) -> tuple[list[str], list[str]]:
    """Run `act` for ALL or for each named id: (ids acted on, ids named but not acted on)."""
    targets = _targets(queue_ids)

    async def run(spool: Spool) -> tuple[list[str], list[str]]:
        if targets is None:
            return await act(spool, None), []
        done: list[str] = []
        missing: list[str] = []
        for queue_id in targets:
            acted = await act(spool, queue_id)
            (done if acted else missing).append(queue_id)
        return done, missing

    return _with_spool(config_path, run)


@queue.command("hold")
@config_option
@click.argument("queue_ids", nargs=-1)
def queue_hold(config_path: Path | None, queue_ids: tuple[str, ...]) -> int:
    """Set messages aside (QUEUE_ID..., ALL, or - for ids on stdin): no delivery until
    released, as Postfix's `postsuper -h`. Exits 1 if a named one is missing or held."""

    async def hold(spool: Spool, queue_id: str | None) -> list[str]:
        return await spool.hold(queue_id, "by the operator")

    held, missing = _each(config_path, queue_ids, hold)
    for queue_id in held:
        click.echo(f"held {queue_id}")
    click.echo(f"{len(held)} messages held")
    for queue_id in missing:
        click.echo(f"no such message waiting (or it is held already): {queue_id}", err=True)
    return 1 if missing else 0


@queue.command("release")
@config_option
@click.argument("queue_ids", nargs=-1)
def queue_release(config_path: Path | None, queue_ids: tuple[str, ...]) -> int:
    """Put held messages back in line, due now (QUEUE_ID..., ALL, or -), as Postfix's
    `postsuper -H`; a message the relay held gets its crash count cleared. Exits 1 if a
    named one is not held."""
    released, missing = _each(config_path, queue_ids, lambda spool, q: spool.release(q))
    for queue_id in released:
        click.echo(f"released {queue_id}")
    click.echo(f"{len(released)} messages released")
    for queue_id in missing:
        click.echo(f"no such held message: {queue_id}", err=True)
    return 1 if missing else 0


@queue.command("delete")
@config_option
@click.argument("queue_ids", nargs=-1)
def queue_delete(config_path: Path | None, queue_ids: tuple[str, ...]) -> int:
    """Drop messages (QUEUE_ID..., ALL, or - for ids on stdin) without delivering them or
    telling their senders, as Postfix's `postsuper -d`. Exits 1 if a named one is missing."""
    targets = _targets(queue_ids)

    async def delete(spool: Spool) -> tuple[list[tuple[str, int]], int, int]:
        if targets is None:
            messages, deliveries = await spool.delete(None)
            return [], messages, deliveries
        deleted = []
        for queue_id in targets:
            messages, deliveries = await spool.delete(queue_id)
            deleted.append((queue_id, deliveries if messages else -1))
        return deleted, 0, 0

    deleted, all_messages, all_deliveries = _with_spool(config_path, delete)
    if targets is None:
        click.echo(f"deleted {all_messages} messages ({all_deliveries} deliveries)")
        return 0
    missing = False
    for queue_id, deliveries in deleted:
        if deliveries < 0:
            click.echo(f"no such message in the queue: {queue_id}", err=True)
            missing = True
        else:
            click.echo(f"deleted {queue_id} ({deliveries} deliveries)")
    return 1 if missing else 0
