"""`optout-relay suppress|subject|purge`: the suppression list and data-subject requests.

Every command that changes a suppression records who ran it (`--actor`, default the OS
user) in the audit log that `suppress show` prints.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import getpass
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from suppression import (
    GLOBAL,
    BadRow,
    DataHolder,
    ImportOptions,
    ImportReport,
    Outcome,
    Reason,
    Suppression,
    SuppressionStore,
    erase_subject,
    export_subject,
    import_file,
    parse_age,
    utc_now,
)
from suppression.formats import Format
from suppression.holders import outbox_holder, spool_holder
from tracking.events import Retention, purge

from .cli_common import PROG, config_option, settings_from, with_stores
from .config import Settings
from .runtime import OUTBOX_DIR, SPOOL_FILE, Stores
from .spool import Spool

T = TypeVar("T")


@click.group()
def suppress() -> None:
    """Manage the suppression list."""


@click.group()
def subject() -> None:
    """Data-subject requests: export or erase everything held about an address."""


scope_option = click.option(
    "--scope",
    default=GLOBAL,
    show_default=True,
    help="'global', 'topic:NAME' or 'sender:DOMAIN'.",
)
actor_option = click.option(
    "--actor",
    default=None,
    help="Who made the change, for the audit log (default: the OS user).",
)
expires_option = click.option(
    "--expires",
    default=None,
    metavar="AGE",
    help="Lapse after AGE (e.g. 90d); only for hard_bounce, manual and import.",
)


def _actor(actor: str | None) -> str:
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _expires_at(expires: str | None) -> datetime | None:
    return None if expires is None else datetime.now(UTC) + parse_age(expires)


def _with_store(config_path: Path | None, action: Callable[[SuppressionStore], Awaitable[T]]) -> T:
    async def run(stores: Stores) -> T:
        await stores.suppressions.verify_normalization()
        return await action(stores.suppressions)

    return with_stores(settings_from(config_path), run)


def _describe(entry: Suppression) -> str:
    parts = [entry.scope, f"{entry.reason} via {entry.source}", f"since {entry.created_at}"]
    if entry.expires_at:
        parts.append(f"until {entry.expires_at}")
    if entry.key_kind != "hmac":
        parts.append(f"{entry.key_kind} hashed-list entry")
    return ", ".join(parts)


# ---- suppress -------------------------------------------------------------------------------


@suppress.command("add")
@config_option
@scope_option
@click.option(
    "--reason",
    type=click.Choice([r.value for r in Reason]),
    default=Reason.MANUAL.value,
    show_default=True,
)
@expires_option
@actor_option
@click.argument("addresses", nargs=-1, required=True)
def suppress_add(
    config_path: Path | None,
    scope: str,
    reason: str,
    expires: str | None,
    actor: str | None,
    addresses: tuple[str, ...],
) -> None:
    """Suppress ADDRESSES (an existing suppression is only ever made stronger)."""
    expires_at = _expires_at(expires)

    async def add(store: SuppressionStore) -> list[Outcome]:
        return [
            await store.suppress(
                a,
                scope=scope,
                reason=Reason(reason),
                source="cli",
                actor=_actor(actor),
                expires_at=expires_at,
            )
            for a in addresses
        ]

    words = {
        Outcome.ADDED: "suppressed",
        Outcome.STRENGTHENED: "strengthened",
        Outcome.UNCHANGED: "already suppressed",
    }
    for address, outcome in zip(addresses, _with_store(config_path, add), strict=True):
        click.echo(f"{words[outcome]}: {address} ({scope})")


@suppress.command("remove")
@config_option
@click.option("--scope", default=None, help="Only this scope (default: every scope).")
@actor_option
@click.argument("address")
def suppress_remove(
    config_path: Path | None, scope: str | None, actor: str | None, address: str
) -> int:
    """Lift the suppression of ADDRESS. Exits 1 when there was none."""
    removed = _with_store(
        config_path,
        lambda s: s.remove(address, scope=scope, source="cli", actor=_actor(actor)),
    )
    click.echo(f"removed {removed} suppression{'s' if removed != 1 else ''} of {address}")
    return 0 if removed else 1


@suppress.command("check")
@config_option
@scope_option
@click.argument("address")
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
    "--format", "fmt", type=click.Choice(["text", "jsonl"]), default="text", show_default=True
)
def suppress_list(config_path: Path | None, scope: str | None, fmt: str) -> None:
    """List suppressions, oldest first."""

    async def run(store: SuppressionStore) -> None:
        async for entry in store.entries(scope=scope):
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
    SES and Postmark. Nothing already suppressed is ever weakened; running an import again
    changes nothing. Bad rows are reported with their line numbers and skipped; the exit code
    is then 1.
    """
    options = ImportOptions(
        format=Format(fmt),
        scope=scope,
        reason=None if reason is None else Reason(reason),
        expires_at=_expires_at(expires),
        actor=_actor(actor),
        batch_size=batch_size,
    )
    name = "stdin" if file == "-" else Path(file).name

    def bad_row(row: BadRow) -> None:
        click.echo(f"{PROG}: {name}:{row.line}: {row.message}", err=True)

    async def run(store: SuppressionStore) -> ImportReport:
        with _open_input(file) as raw, _progress(raw, f"importing {name}") as progress:
            return await import_file(
                store, raw, name, options, on_bad_row=bad_row, on_progress=progress
            )

    # This process only imports: the cyclic collector would spend a tenth of a million-row
    # import scanning fresh tuples that can never form a cycle.
    gc.disable()
    try:
        report = _with_store(config_path, run)
    finally:
        gc.enable()
    click.echo(
        f"imported {name} ({report.format}): {report.rows} rows, {report.added} added,"
        f" {report.strengthened} strengthened, {report.unchanged} unchanged, {report.bad} bad"
    )
    return 1 if report.bad else 0


@contextlib.contextmanager
def _open_input(file: str) -> Iterator[IO[bytes]]:
    if file == "-":
        yield sys.stdin.buffer
        return
    with open(file, "rb") as raw:
        yield raw


@contextlib.contextmanager
def _progress(raw: IO[bytes], label: str) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr for a large file read from a terminal session, else nothing."""
    try:
        size = os.fstat(raw.fileno()).st_size
    except (OSError, ValueError):
        size = 0
    if size < 1 << 20 or not sys.stderr.isatty():
        yield None
        return
    with click.progressbar(length=size, label=label, file=sys.stderr) as bar:
        done = 0

        def advance(position: int) -> None:
            nonlocal done
            bar.update(position - done)
            done = position

        yield advance


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
    "--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write to this file (created mode 0600) instead of stdout.",
)
def suppress_export(
    config_path: Path | None, scope: str | None, fmt: str, output: Path | None
) -> None:
    """Export the suppression list; the CSV can be imported again as it is."""

    async def run(store: SuppressionStore) -> int:
        with _open_output(output) as out:
            total = await store.count(scope=scope) if output is not None else 0
            return await _write_entries(store.entries(scope=scope), out, fmt, total)

    count = _with_store(config_path, run)
    if output is not None:
        click.echo(f"exported {count} suppressions to {output}")


@contextlib.contextmanager
def _open_output(output: Path | None) -> Iterator[IO[str]]:
    if output is None:
        yield sys.stdout
        return
    # Suppression lists and data-subject exports are personal data: owner-only from the start.
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w", encoding="utf-8", newline="") as out:
        yield out


async def _write_entries(
    entries: AsyncIterator[Suppression], out: IO[str], fmt: str, total: int
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
    with bar if bar is not None else contextlib.nullcontext():
        async for entry in entries:
            row = entry.as_dict()
            if fmt == "csv":
                writer.writerow(["" if row[c] is None else row[c] for c in EXPORT_COLUMNS])
            else:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
            if bar is not None and count % 1000 == 0:
                bar.update(1000)
    return count


@suppress.command("show")
@config_option
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.argument("address")
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
    words = [change["at"], change["action"]]
    if change["scope"]:
        words.append(change["scope"])
    if change["reason"]:
        words.append(change["reason"])
    if change["source"]:
        words.append(f"via {change['source']}")
    if change["actor"]:
        words.append(f"by {change['actor']}")
    detail = change["detail"]
    if detail:
        words.append(json.dumps(detail, ensure_ascii=False, sort_keys=True))
    return " ".join(words)


# ---- subject --------------------------------------------------------------------------------


async def _with_holders(stores: Stores, action: Callable[[list[DataHolder]], Awaitable[T]]) -> T:
    """The event log, the spool (when there is one) and the outbox, for a subject request."""
    settings: Settings = stores.settings
    await stores.suppressions.verify_normalization()
    holders = [stores.events.holder()]
    spool_path = settings.storage.dir / SPOOL_FILE
    spool = await Spool.open(spool_path) if spool_path.exists() else None
    try:
        if spool is not None:
            holders.append(spool_holder(spool, spool_path))
        holders.append(outbox_holder(settings.storage.dir / OUTBOX_DIR))
        return await action(holders)
    finally:
        if spool is not None:
            await spool.close()


@subject.command("export")
@config_option
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write to this file (created mode 0600) instead of stdout.",
)
@actor_option
@click.argument("address")
def subject_export(
    config_path: Path | None, output: Path | None, actor: str | None, address: str
) -> None:
    """Print everything held about ADDRESS as JSON (GDPR Art. 15)."""

    async def run(stores: Stores) -> dict[str, Any]:
        return await _with_holders(
            stores,
            lambda holders: export_subject(
                stores.suppressions, address, holders, actor=_actor(actor)
            ),
        )

    document = with_stores(settings_from(config_path), run)
    with _open_output(output) as out:
        out.write(json.dumps(document, ensure_ascii=False, indent=2, default=str) + "\n")


@subject.command("erase")
@config_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@actor_option
@click.argument("address")
def subject_erase(config_path: Path | None, yes: bool, actor: str | None, address: str) -> None:
    """Erase the personal data of ADDRESS everywhere (GDPR Art. 17); keep it suppressed.

    Suppressions, events, spooled mail and outbox files: the plain address goes, a keyed hash
    stays as a global suppression, and the erasure is recorded.
    """
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("erasure cannot be undone: pass --yes to confirm")
        click.confirm(f"Erase all personal data of {address}?", abort=True)

    async def run(stores: Stores) -> Any:
        return await _with_holders(
            stores,
            lambda holders: erase_subject(
                stores.suppressions, address, holders, actor=_actor(actor)
            ),
        )

    report = with_stores(settings_from(config_path), run)
    tombstone = "added" if report.tombstone is Outcome.ADDED else "already there"
    click.echo(f"erased {address} (key {report.address_hash}):")
    click.echo(
        f"  suppressions: {report.suppressions_kept} kept by key only"
        f" (global tombstone {tombstone})"
    )
    click.echo(f"  contact: {'deleted' if report.contact_deleted else 'none'}")
    for name, count in report.erased.items():
        click.echo(f"  {name}: {count} removed")
    if not report.checkpointed:
        click.echo(
            f"{PROG}: warning: a running process kept old pages in the WAL;"
            " run the erasure again once it is idle",
            err=True,
        )


# ---- purge ----------------------------------------------------------------------------------


def _keep(values: tuple[str, ...]) -> Retention:
    table: dict[str, object] = {}
    for value in values:
        kind, sep, age = value.partition("=")
        if not sep:
            raise click.BadParameter(f"{value!r} is not KIND=AGE", param_hint="'--keep'")
        table[kind.strip()] = age.strip()
    try:
        return Retention.parse(table)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--keep'") from None


@click.command("purge")
@config_option
@click.option(
    "--keep",
    multiple=True,
    metavar="KIND=AGE",
    help="Keep KIND (open, click, delivered, ..., contacts) for AGE, e.g. open=180d;"
    " overrides [retention] in the config. Repeatable.",
)
def purge_command(config_path: Path | None, keep: tuple[str, ...]) -> None:
    """Delete events and contacts older than their retention, and lapsed suppressions."""
    override = _keep(keep)
    settings = settings_from(config_path)
    configured = getattr(settings, "retention", None)
    retention = (configured if isinstance(configured, Retention) else Retention()).merged(override)

    async def run(stores: Stores) -> Any:
        await stores.suppressions.verify_normalization()
        return await purge(stores.events, stores.suppressions, retention)

    report = with_stores(settings, run)
    if not retention.event_ages() and retention.contacts is None:
        click.echo("no retention configured ([retention] in the config or --keep KIND=AGE)")
    events = ", ".join(f"{n} {kind}" for kind, n in report.events.items()) or "none"
    click.echo(
        f"purged: events {events}; contacts {report.contacts};"
        f" lapsed suppressions {report.expired_suppressions}"
    )


def register(cli: click.Group) -> None:
    """Add this module's commands to the top-level group."""
    cli.add_command(suppress)
    cli.add_command(subject)
    cli.add_command(purge_command)
