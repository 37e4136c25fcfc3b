"""`optout-relay consent ...`: recipients' consent to individual open and click tracking.

Consent is data with its proof: every change records when, from where (`cli`, `import:FILE`,
the recipient's own page) and by whom (`--actor`, default the OS user) in the audit log,
which `consent show` prints. Under `tracking.opens = "consented"` (or clicks) a recipient
with consent to that purpose is measured individually, everyone else in aggregate; a
withdrawal reaches mail already sent.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from suppression import PURPOSES, ConsentStore, Purpose, parse_purposes
from suppression.consent import State
from suppression.consent_import import ConsentImportReport, import_consent

from ..stores import Stores
from .common import (
    PROG,
    actor_of,
    actor_option,
    audit_line,
    config_option,
    group_config_option,
    note_option,
    open_input,
    settings_from,
    with_stores,
)

T = TypeVar("T")


@click.group()
@group_config_option
def consent() -> None:
    """Consent to individual open and click tracking, with its proof."""


purpose_option = click.option(
    "--purpose",
    "purposes",
    type=click.Choice(PURPOSES),
    multiple=True,
    help="opens or clicks; repeatable (default: both).",
)
with_note = note_option(
    "Free text kept in the audit log: where the consent was given, a ticket, ..."
)


def _purposes(purposes: tuple[str, ...]) -> frozenset[Purpose]:
    return parse_purposes(purposes) if purposes else frozenset(Purpose)


def _detail(note: str | None) -> dict[str, str] | None:
    return None if note is None else {"note": note}


def _with_consents(
    config_path: Path | None,
    action: Callable[[ConsentStore], Awaitable[T]],
    *,
    create: bool = False,
) -> T:
    async def run(stores: Stores) -> T:
        return await action(stores.consents)

    return with_stores(settings_from(config_path), run, create=create)


def _listed(purposes: list[Purpose] | frozenset[Purpose]) -> str:
    return ", ".join(sorted(p.value for p in purposes))


@consent.command("add")
@config_option
@purpose_option
@with_note
@actor_option
@click.argument("addresses", nargs=-1, required=True)
def consent_add(
    config_path: Path | None,
    purposes: tuple[str, ...],
    note: str | None,
    actor: str | None,
    addresses: tuple[str, ...],
) -> None:
    """Record that ADDRESSES consented to individual tracking of --purpose (default: both).

    This also lifts an earlier withdrawal: record it only on the recipient's new word.
    """
    _record(config_path, State.GRANTED, purposes, note, actor, addresses)


@consent.command("remove")
@config_option
@purpose_option
@with_note
@actor_option
@click.argument("addresses", nargs=-1, required=True)
def consent_remove(
    config_path: Path | None,
    purposes: tuple[str, ...],
    note: str | None,
    actor: str | None,
    addresses: tuple[str, ...],
) -> None:
    """Record that ADDRESSES withdrew consent to --purpose (default: both).

    From now on their opens (clicks) are counted in aggregate only, those of mail already
    sent included. Recorded even without an earlier consent: it is the proof of the word.
    """
    _record(config_path, State.WITHDRAWN, purposes, note, actor, addresses)


# What `add` and `remove` say of each address: (changed now, as it was already).
_SAID = {
    State.GRANTED: ("consent recorded", "already consented"),
    State.WITHDRAWN: ("withdrawal recorded", "already withdrawn"),
}


def _record(
    config_path: Path | None,
    state: State,
    purposes: tuple[str, ...],
    note: str | None,
    actor: str | None,
    addresses: tuple[str, ...],
) -> None:
    wanted = _purposes(purposes)
    detail = _detail(note)

    async def record(store: ConsentStore) -> list[list[Purpose]]:
        change = store.grant if state is State.GRANTED else store.withdraw
        return [
            await change(a, wanted, source="cli", actor=actor_of(actor), detail=detail)
            for a in addresses
        ]

    changed_now, as_it_was = _SAID[state]
    outcomes = _with_consents(config_path, record, create=True)
    for address, changed in zip(addresses, outcomes, strict=True):
        if changed:
            click.echo(f"{changed_now}: {address} ({_listed(changed)})")
        else:
            click.echo(f"{as_it_was}: {address} ({_listed(wanted)})")


@consent.command("show")
@config_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Readable text, or one JSON document (state per purpose, history).",
)
@click.argument("address")
def consent_show(config_path: Path | None, fmt: str, address: str) -> int:
    """Show ADDRESS's consent per purpose and every change to it (when, how, by whom).

    Exits 0 when ADDRESS consents to some purpose now, 1 when not.
    """
    record = _with_consents(config_path, lambda store: store.show(address))
    consented = bool(record.consent.granted)
    if fmt == "json":
        document = {
            "address": record.address,
            "address_hash": record.address_hash,
            "consent": {entry.purpose.value: entry.as_dict() for entry in record.entries},
            "history": [change.as_dict() for change in record.history],
        }
        click.echo(json.dumps(document, ensure_ascii=False, indent=2))
        return 0 if consented else 1
    click.echo(f"address: {record.address}")
    click.echo(f"key: {record.address_hash}")
    states = {entry.purpose: entry for entry in record.entries}
    for purpose in Purpose:
        entry = states.get(purpose)
        if entry is None:
            click.echo(f"{purpose.value}: no record")
            continue
        who = f" by {entry.actor}" if entry.actor else ""
        click.echo(f"{purpose.value}: {entry.state.value} since {entry.at} via {entry.source}{who}")
    click.echo("history:")
    for change in record.history:
        click.echo(f"  {_change_line(change.as_dict())}")
    if not record.history:
        click.echo("  (none)")
    return 0 if consented else 1


def _change_line(change: dict[str, Any]) -> str:
    return audit_line(change, [change["scope"].removeprefix("tracking:")])


@consent.command("import")
@config_option
@purpose_option
@click.option(
    "--withdraw",
    is_flag=True,
    help="The file lists withdrawals, not consents.",
)
@click.option(
    "--encoding",
    default=None,
    metavar="CODEC",
    help="The file's encoding (default: from its byte-order mark, else UTF-8, else Latin-1).",
)
@actor_option
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
def consent_import(
    config_path: Path | None,
    purposes: tuple[str, ...],
    withdraw: bool,
    encoding: str | None,
    actor: str | None,
    file: str,
) -> int:
    """Record the consents (or, with --withdraw, withdrawals) listed in FILE ('-': stdin).

    A CSV with an address column (email, address, ...) and, if it has them, a purposes
    column ("opens clicks"; default: --purpose, else both) and when and how the consent was
    given (consented_at, source: kept in the audit log); or one address per line. Bad rows
    are reported with their line numbers and skipped; the exit code is then 1.
    """
    name = "stdin" if file == "-" else Path(file).name
    state = State.WITHDRAWN if withdraw else State.GRANTED

    async def run(store: ConsentStore) -> ConsentImportReport:
        with open_input(file) as raw:
            return await import_consent(
                store,
                raw,
                name,
                purposes=_purposes(purposes),
                state=state,
                actor=actor_of(actor),
                encoding=encoding,
            )

    report = _with_consents(config_path, run, create=True)
    for bad in report.bad_rows:
        click.echo(f"{PROG}: {name}:{bad.line}: {bad.message}", err=True)
    verb = "withdrawn" if withdraw else "consented"
    click.echo(
        f"imported {name}: {report.rows} rows, {report.changed} {verb} now,"
        f" {report.unchanged} already {verb}, {report.bad} bad"
    )
    return 1 if report.bad else 0
