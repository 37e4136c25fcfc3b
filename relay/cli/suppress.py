"""`optout-relay suppress ...`: the suppression list.

Every command that changes a suppression records who ran it (`--actor`, default the OS
user) in the audit log that `suppress show` prints.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import json
import os
import stat
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from suppression import (
    GLOBAL,
    BadRow,
    ImportOptions,
    ImportReport,
    Outcome,
    Reason,
    Suppression,
    SuppressionStore,
    import_file,
    parse_age,
    utc_now,
)
from suppression.formats import Format, escape_cell
from suppression.imports import LATIN1

from ..stores import Stores
from .common import (
    PROG,
    actor_of,
    actor_option,
    address_argument,
    audit_line,
    config_option,
    group_config_option,
    note_option,
    open_input,
    open_output,
    output_option,
    settings_from,
    with_stores,
)

T = TypeVar("T")


@click.group()
@group_config_option
def suppress() -> None:
    """Manage the suppression list."""


scope_option = click.option(
    "--scope",
    default=GLOBAL,
    show_default=True,
    help="'global', 'topic:NAME' or 'sender:DOMAIN'.",
)
with_note = note_option(
    "Free text kept with this change in the audit log (why, ticket number, ...)."
)


expires_option = click.option(
    "--expires",
    default=None,
    metavar="AGE",
    help="Lapse after AGE (e.g. 90d); only for hard_bounce, manual and import.",
)


def _expires_at(expires: str | None) -> datetime | None:
    return None if expires is None else datetime.now(UTC) + parse_age(expires)


def _with_store(
    config_path: Path | None,
    action: Callable[[SuppressionStore], Awaitable[T]],
    *,
    create: bool = False,
) -> T:
    """Run `action` on the suppression store; only `add` and `import` create a missing one."""

    async def run(stores: Stores) -> T:
        return await action(stores.suppressions)

    return with_stores(settings_from(config_path), run, create=create)


def _describe(entry: Suppression) -> str:
    parts = [entry.scope, f"{entry.reason} via {entry.source}", f"since {entry.created_at}"]
    if entry.expires_at:
        parts.append(f"until {entry.expires_at}")
    if entry.key_kind != "hmac":
        parts.append(f"{entry.key_kind} hashed-list entry")
    return ", ".join(parts)


@suppress.command("add")
@config_option
@scope_option
@click.option(
    "--reason",
    type=click.Choice([r.value for r in Reason]),
    default=Reason.MANUAL.value,
    show_default=True,
    help="Why: one of the fixed kinds (free text goes in --note).",
)
@expires_option
@with_note
@actor_option
@click.argument("addresses", nargs=-1, required=True)
def suppress_add(
    config_path: Path | None,
    scope: str,
    reason: str,
    expires: str | None,
    note: str | None,
    actor: str | None,
    addresses: tuple[str, ...],
) -> None:
    """Suppress ADDRESSES (an existing suppression is only ever made stronger)."""
    expires_at = _expires_at(expires)
    detail = {"note": note} if note else None

    async def add(store: SuppressionStore) -> list[Outcome]:
        return [
            await store.suppress(
                a,
                scope=scope,
                reason=Reason(reason),
                source="cli",
                actor=actor_of(actor),
                expires_at=expires_at,
                detail=detail,
            )
            for a in addresses
        ]

    words = {
        Outcome.ADDED: "suppressed",
        Outcome.STRENGTHENED: "strengthened",
        Outcome.UNCHANGED: "already suppressed",
    }
    outcomes = _with_store(config_path, add, create=True)
    for address, outcome in zip(addresses, outcomes, strict=True):
        click.echo(f"{words[outcome]}: {address} ({scope})")


@suppress.command("remove")
@config_option
@click.option("--scope", default=None, help="Only this scope (default: every scope).")
@click.option(
    "--force",
    is_flag=True,
    help="Lift it even though the recipient made it (an unsubscribe, a complaint) or was"
    " erased; recorded as forced in the audit log.",
)
@with_note
@actor_option
@address_argument
def suppress_remove(
    config_path: Path | None,
    scope: str | None,
    force: bool,
    note: str | None,
    actor: str | None,
    address: str,
) -> int:
    """Lift the suppression of ADDRESS. Exits 1 when there was none.

    What a recipient made stays made: an unsubscribe or a complaint, and the suppression
    kept after an erasure, are lifted only with --force (exit 2 otherwise, nothing
    removed). Only the recipient's own undo, on the page they unsubscribed on, needs none.
    """
    removed = _with_store(
        config_path,
        lambda s: s.remove(
            address, scope=scope, source="cli", actor=actor_of(actor), force=force, note=note
        ),
    )
    click.echo(f"removed {removed} suppression{'s' if removed != 1 else ''} of {address}")
    return 0 if removed else 1


@suppress.command("check")
@config_option
@scope_option
@address_argument
def suppress_check(config_path: Path | None, scope: str, address: str) -> int:
    """Exit 0 when ADDRESS is suppressed (globally or in --scope), 1 when not."""
    found = _with_store(config_path, lambda s: s.check(address, (GLOBAL, scope)))
    if found is None:
        click.echo(f"not suppressed: {address}")
        return 1
    click.echo(f"suppressed: {address} ({_describe(found)})")
    return 0


def _label(entry: Suppression) -> str:
    if entry.address:
        return entry.address
    if entry.key_kind != "hmac":
        return f"({entry.address_hash})"
    return f"(erased {entry.address_hash})"


@suppress.command("list")
@config_option
@click.option("--scope", default=None, help="Only this scope.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "jsonl"]),
    default="text",
    show_default=True,
    help="Tab-separated lines (address or key, scope, reason, source, since), or JSON lines.",
)
def suppress_list(config_path: Path | None, scope: str | None, fmt: str) -> None:
    """List suppressions, oldest first."""

    async def run(store: SuppressionStore) -> None:
        # aclosing: a reader that stops early (`| head`) closes the listing while the store
        # is still open.
        async with contextlib.aclosing(store.entries(scope=scope)) as entries:
            async for entry in entries:
                if fmt == "jsonl":
                    click.echo(json.dumps(entry.as_dict(), ensure_ascii=False))
                else:
                    fields = [_label(entry), entry.scope, entry.reason, entry.source]
                    click.echo("\t".join([*fields, entry.created_at]))

    _with_store(config_path, run)


@suppress.command("import")
@config_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice([f.value for f in Format]),
    default=Format.AUTO.value,
    show_default=True,
    help="auto: tell from the header and first rows.",
)
@click.option(
    "--encoding",
    default=None,
    metavar="CODEC",
    help="The file's encoding, e.g. utf-16-le or cp1252 (default: from its byte-order mark,"
    " else UTF-8, else Latin-1).",
)
@scope_option
@click.option(
    "--reason",
    type=click.Choice([r.value for r in Reason]),
    default=None,
    help="Every row's reason (default: the ESP's own reason per row, else 'import').",
)
@expires_option
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=100_000, show_default=True, hidden=True
)
@actor_option
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
def suppress_import(
    config_path: Path | None,
    fmt: str,
    encoding: str | None,
    scope: str,
    reason: str | None,
    expires: str | None,
    batch_size: int,
    actor: str | None,
    file: str,
) -> int:
    """Import a suppression list from FILE ('-' for stdin).

    CSV with an address column, plain lists (one address per line), hashed lists (MD5 or
    SHA-256 of the lowercased address) and suppression exports of SendGrid, Mailgun, Amazon
    SES and Postmark; any line ending, UTF-8, UTF-16/32 with a byte-order mark, or Latin-1.
    Nothing already suppressed is ever weakened; running an import again changes nothing.
    Bad rows are reported with their line numbers and skipped; the exit code is then 1.
    A long import shows its progress on stderr.
    """
    options = ImportOptions(
        format=Format(fmt),
        scope=scope,
        reason=None if reason is None else Reason(reason),
        expires_at=_expires_at(expires),
        actor=actor_of(actor),
        batch_size=batch_size,
        encoding=encoding,
    )
    name = "stdin" if file == "-" else Path(file).name

    def bad_row(row: BadRow) -> None:
        click.echo(f"{PROG}: {name}:{row.line}: {row.message}", err=True)

    async def run(store: SuppressionStore) -> ImportReport:
        with open_input(file) as raw, _progress(raw, f"importing {name}") as progress:
            return await import_file(
                store, raw, name, options, on_bad_row=bad_row, on_progress=progress
            )

    # This process only imports: the cyclic collector would spend a tenth of a million-row
    # import scanning fresh tuples that can never form a cycle.
    gc.disable()
    try:
        report = _with_store(config_path, run, create=True)
    finally:
        gc.enable()
    kind = report.format
    if report.encoding not in ("utf-8", "utf-8-sig", ""):
        kind += f", {report.encoding}"
    if encoding is None and report.encoding == LATIN1:
        click.echo(
            f"{PROG}: {name}: not UTF-8, read as Latin-1 (--encoding to choose another)",
            err=True,
        )
    click.echo(
        f"imported {name} ({kind}): {report.rows} rows, {report.added} added,"
        f" {report.strengthened} strengthened, {report.unchanged} already suppressed,"
        f" {report.bad} bad"
    )
    return 1 if report.bad else 0


Progress = Callable[[int, ImportReport], None]
BAR_FROM_BYTES = 1 << 20


@contextlib.contextmanager
def _progress(raw: IO[bytes], label: str) -> Iterator[Progress]:
    """How far an import is, on stderr: a bar on a terminal (a row count for a pipe, whose
    size is unknown); elsewhere (a log) a line after each batch but the last."""
    try:
        status = os.fstat(raw.fileno())
        size = status.st_size if stat.S_ISREG(status.st_mode) else 0
    except (OSError, ValueError):
        size = 0
    if not sys.stderr.isatty():

        def line(position: int, report: ImportReport) -> None:
            if 0 < position < size:
                click.echo(f"{label}: {position * 100 // size}% ({report.rows:,} rows)", err=True)

        yield line
        return
    if size >= BAR_FROM_BYTES:
        with click.progressbar(length=size, label=label, file=sys.stderr) as bar:
            done = 0

            def advance(position: int, _report: ImportReport) -> None:
                nonlocal done
                bar.update(position - done)
                done = position

            yield advance
        return
    counted = False

    def count(_position: int, report: ImportReport) -> None:
        nonlocal counted
        if size == 0:
            click.echo(f"\r{label}: {report.rows:,} rows", err=True, nl=False)
            counted = True

    try:
        yield count
    finally:
        if counted:
            click.echo("", err=True)


EXPORT_COLUMNS = (
    "address",
    "address_hash",
    "scope",
    "reason",
    "source",
    "created_at",
    "expires_at",
)


@suppress.command("export")
@config_option
@click.option("--scope", default=None, help="Only this scope.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    default="csv",
    show_default=True,
    help="CSV that 'suppress import' reads back, or JSON lines.",
)
@output_option
def suppress_export(
    config_path: Path | None, scope: str | None, fmt: str, output: Path | None
) -> None:
    """Export the suppression list; the CSV can be imported again as it is.

    A CSV cell that a spreadsheet would run as a formula (one beginning with = + - @, a tab
    or a CR) is written with a leading apostrophe, as OWASP recommends; import takes it off.
    """

    async def run(store: SuppressionStore) -> int:
        with open_output(output) as out:
            total = await store.count(scope=scope) if output is not None else 0
            return await _write_entries(store.entries(scope=scope), out, fmt, total)

    count = _with_store(config_path, run)
    if output is not None:
        click.echo(f"exported {count} suppressions to {output}")


async def _write_entries(
    entries: AsyncGenerator[Suppression, None], out: IO[str], fmt: str, total: int
) -> int:
    bar = (
        click.progressbar(length=total, label="exporting", file=sys.stderr)
        if total > 10_000 and sys.stderr.isatty()
        else None
    )
    writer = csv.writer(out, lineterminator="\n")
    if fmt == "csv":
        writer.writerow(EXPORT_COLUMNS)
    count = 0
    async with contextlib.aclosing(entries):
        with bar if bar is not None else contextlib.nullcontext():
            async for entry in entries:
                row = entry.as_dict()
                if fmt == "csv":
                    writer.writerow(
                        ["" if row[c] is None else escape_cell(row[c]) for c in EXPORT_COLUMNS]
                    )
                else:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
                if bar is not None and count % 1000 == 0:
                    bar.update(1000)
    return count


@suppress.command("show")
@config_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Readable text, or one JSON document (entries, history, erasure).",
)
@address_argument
def suppress_show(config_path: Path | None, fmt: str, address: str) -> int:
    """Prove when and how ADDRESS opted out: its entries and every change to them.

    Exits 0 when ADDRESS is suppressed in some scope now, 1 when not.
    """
    record = _with_store(config_path, lambda s: s.show(address))
    now = utc_now()
    in_force = [e for e in record.suppressions if e.expires_at is None or e.expires_at > now]
    if fmt == "json":
        document = {
            "address": record.address,
            "address_hash": record.address_hash,
            "suppressions": [e.as_dict() for e in record.suppressions],
            "history": [change.as_dict() for change in record.history],
            "erased_at": record.erased_at,
        }
        click.echo(json.dumps(document, ensure_ascii=False, indent=2))
        return 0 if in_force else 1
    click.echo(f"address: {record.address}")
    click.echo(f"key: {record.address_hash}")
    if record.erased_at:
        click.echo(f"erased: {record.erased_at} (personal data deleted, kept suppressed by key)")
    if in_force:
        click.echo("suppressed:")
        for entry in in_force:
            click.echo(f"  {_describe(entry)}")
    else:
        click.echo("suppressed: no")
    click.echo("history:")
    for change in record.history:
        click.echo(f"  {_change_line(change.as_dict())}")
    if not record.history:
        click.echo("  (none)")
    return 0 if in_force else 1


def _change_line(change: dict[str, Any]) -> str:
    return audit_line(change, [word for word in (change["scope"], change["reason"]) if word])
