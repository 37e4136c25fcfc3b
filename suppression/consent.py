"""Consent to individual open and click tracking, per recipient and purpose, with its proof.

A recipient's state per purpose (opens, clicks) is `granted` (an operator recorded their
consent: `consent add`, an import) or `withdrawn` (`consent remove`, or the recipient's own
click on the unsubscribe or preference page); no row is no word either way. Rows are keyed
by the keyed hash, never the plain address, so an erasure leaves nothing to find; every
change is in the suppression audit log (time, source, actor), which outlives it.

The delivery worker reads a recipient's state in the same read as their suppression check
(`recipient_state`), and the open and click recorder reads who withdrew when an open
arrives (`withdrawn_among`), so a withdrawal reaches mail already sent.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from . import audit
from .addresses import AddressHasher
from .audit import AuditRecord
from .database import Migration, SqliteConnection, utc_now
from .engine import Connection, Engine

if TYPE_CHECKING:
    from .subject import DataHolder, Subject

# The audit log's actions and the prefix of its scope column for consent changes.
GRANT_ACTION = "consent-grant"
WITHDRAW_ACTION = "consent-withdraw"
AUDIT_SCOPE = "tracking:"


class Purpose(StrEnum):
    """What a recipient consents to, or withdraws from, one at a time."""

    OPENS = "opens"
    CLICKS = "clicks"


PURPOSES = tuple(purpose.value for purpose in Purpose)
ALL_PURPOSES = frozenset(Purpose)


class State(StrEnum):
    GRANTED = "granted"
    WITHDRAWN = "withdrawn"


def parse_purposes(text: str | Iterable[str]) -> frozenset[Purpose]:
    """`opens, clicks` (a header's or an option's spelling) as purposes; ValueError names
    the first word that is none."""
    words = text.replace(",", " ").split() if isinstance(text, str) else list(text)
    found = set()
    for word in words:
        try:
            found.add(Purpose(word.strip().lower()))
        except ValueError:
            raise ValueError(f"{word!r} is not a purpose ({', '.join(PURPOSES)})") from None
    return frozenset(found)


@dataclass(frozen=True, slots=True)
class Consent:
    """A recipient's word on tracking: the purposes consented to and withdrawn from."""

    granted: frozenset[Purpose] = frozenset()
    withdrawn: frozenset[Purpose] = frozenset()


NO_WORD = Consent()


@dataclass(frozen=True, slots=True)
class ConsentEntry:
    purpose: Purpose
    state: State
    at: str
    source: str
    actor: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "purpose": self.purpose.value,
            "state": self.state.value,
            "at": self.at,
            "source": self.source,
            "actor": self.actor,
        }


@dataclass(frozen=True, slots=True)
class ConsentRecord:
    """Everything held about one address's consent: the state per purpose and its proof."""

    address: str
    address_hash: str
    entries: list[ConsentEntry]
    history: list[AuditRecord] = field(default_factory=list)

    @property
    def consent(self) -> Consent:
        return consent_from(self.entries)


def consent_from(entries: Iterable[ConsentEntry]) -> Consent:
    granted = frozenset(e.purpose for e in entries if e.state is State.GRANTED)
    withdrawn = frozenset(e.purpose for e in entries if e.state is State.WITHDRAWN)
    return Consent(granted, withdrawn)


_CREATE = """CREATE TABLE tracking_consent (
    address_hash TEXT NOT NULL,  -- the keyed hash: never the plain address
    purpose TEXT NOT NULL,       -- opens | clicks
    state TEXT NOT NULL,         -- granted | withdrawn
    at TEXT NOT NULL,            -- since when
    source TEXT NOT NULL,        -- cli, import:FILE, page, erasure, ...
    actor TEXT,                  -- who recorded it, when known
    PRIMARY KEY (address_hash, purpose)
)"""


def _create(db: SqliteConnection) -> None:
    db.execute(_CREATE + " WITHOUT ROWID")


# Listed by both the suppression store and the event log, which reads it when an open
# arrives: a database opened by either has it (`Database` applies a name once).
CONSENT_MIGRATION = Migration("suppression/0005-tracking-consent", _create, [_CREATE])

_ENTRIES = "SELECT purpose, state, at, source, actor FROM tracking_consent WHERE address_hash = ?"


def entries_of(db: Connection, address_hash: str) -> list[ConsentEntry]:
    return [
        ConsentEntry(Purpose(row[0]), State(row[1]), row[2], row[3], row[4])
        for row in db.execute(_ENTRIES + " ORDER BY purpose", [address_hash])
    ]


def consent_of(db: Connection, address_hash: str) -> Consent:
    """One recipient's word (one primary-key range probe)."""
    return consent_from(entries_of(db, address_hash))


def withdrawn_among(db: Connection, address_hashes: Iterable[str]) -> set[tuple[str, Purpose]]:
    """(recipient, purpose) pairs withdrawn among `address_hashes`: one query for a batch."""
    keys = sorted(set(address_hashes))
    if not keys:
        return set()
    rows = db.execute(
        "SELECT address_hash, purpose FROM tracking_consent"  # noqa: S608 - a fixed fragment
        f" WHERE address_hash IN (SELECT value FROM {db.dialect.json_each})"
        " AND state = 'withdrawn'",
        [json.dumps(keys)],
    )
    return {(row[0], Purpose(row[1])) for row in rows}


def record_consent(
    db: Connection,
    address_hash: str,
    purposes: Iterable[Purpose],
    state: State,
    *,
    source: str,
    actor: str | None = None,
    detail: Mapping[str, Any] | None = None,
    at: str | None = None,
) -> list[Purpose]:
    """Set `state` for each purpose (in the caller's transaction), audited; the purposes
    whose state changed (the same word again changes and records nothing)."""
    now = at or utc_now()
    changed = []
    for purpose in sorted(set(purposes)):
        row = db.execute(
            "SELECT state FROM tracking_consent WHERE address_hash = ? AND purpose = ?",
            [address_hash, purpose.value],
        ).fetchone()
        if row is not None and row[0] == state.value:
            continue
        db.execute(
            "INSERT INTO tracking_consent (address_hash, purpose, state, at, source, actor)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (address_hash, purpose) DO UPDATE SET"
            " state = excluded.state, at = excluded.at, source = excluded.source,"
            " actor = excluded.actor",
            [address_hash, purpose.value, state.value, now, source, actor],
        )
        audit.record(
            db,
            GRANT_ACTION if state is State.GRANTED else WITHDRAW_ACTION,
            address_hash=address_hash,
            scope=AUDIT_SCOPE + purpose.value,
            source=source,
            actor=actor,
            detail={**(detail or {}), **({"previous": row[0]} if row else {})},
            at=now,
        )
        changed.append(purpose)
    return changed


def history_of(db: Connection, address_hash: str) -> list[AuditRecord]:
    """The consent changes in the audit log under this key, oldest first."""
    return [
        change
        for change in audit.history(db, [address_hash])
        if change.action in (GRANT_ACTION, WITHDRAW_ACTION)
    ]


def erase_consent(db: Connection, address_hash: str) -> int:
    """An erased person is tracked individually no more: whatever they said, every purpose
    becomes withdrawn (keyed by hash only, like the suppression kept after an erasure), so
    an old copy's pixel names nobody. How many purposes changed."""
    return len(record_consent(db, address_hash, ALL_PURPOSES, State.WITHDRAWN, source="erasure"))


@dataclass(frozen=True, slots=True)
class ConsentRow:
    """One row of an import: an address (or a problem with it), the purposes, the detail."""

    line: int
    address_hash: str
    purposes: frozenset[Purpose]
    detail: Mapping[str, Any] = field(default_factory=dict)


class ConsentStore:
    """Async access to the consent table, in the suppression store's database."""

    def __init__(self, db: Engine, hasher: AddressHasher) -> None:
        self._db = db
        self.hasher = hasher

    async def grant(
        self,
        address: str,
        purposes: Iterable[Purpose],
        *,
        source: str = "cli",
        actor: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> list[Purpose]:
        """Record consent to `purposes`; the purposes that were not granted already."""
        return await self._record(address, purposes, State.GRANTED, source, actor, detail)

    async def withdraw(
        self,
        address: str,
        purposes: Iterable[Purpose],
        *,
        source: str = "cli",
        actor: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> list[Purpose]:
        """Record that consent to `purposes` is withdrawn; the purposes that changed."""
        return await self._record(address, purposes, State.WITHDRAWN, source, actor, detail)

    async def _record(
        self,
        address: str,
        purposes: Iterable[Purpose],
        state: State,
        source: str,
        actor: str | None,
        detail: Mapping[str, Any] | None,
    ) -> list[Purpose]:
        key = self.hasher.hash(address)
        wanted = list(purposes)
        return await self._db.write(
            lambda db: record_consent(
                db, key, wanted, state, source=source, actor=actor, detail=detail
            )
        )

    async def apply(
        self, rows: Sequence[ConsentRow], state: State, *, source: str, actor: str | None
    ) -> tuple[int, int]:
        """Record a batch of import rows in one transaction: how many rows changed
        something, and how many purposes changed in all."""

        def write(db: Connection) -> tuple[int, int]:
            now = utc_now()
            rows_changed = purposes_changed = 0
            for row in rows:
                changed = record_consent(
                    db,
                    row.address_hash,
                    row.purposes,
                    state,
                    source=source,
                    actor=actor,
                    detail={**row.detail, "line": row.line},
                    at=now,
                )
                rows_changed += bool(changed)
                purposes_changed += len(changed)
            return rows_changed, purposes_changed

        return await self._db.write(write)

    async def record_import(self, source: str, actor: str | None, summary: dict[str, Any]) -> None:
        """The import as a whole, in the audit log (its file's digest, counts)."""
        await self._db.write(
            lambda db: audit.record(
                db, "consent-import", source=source, actor=actor, detail=summary
            )
        )

    async def show(self, address: str) -> ConsentRecord:
        normalized = self.hasher.normalize(address)
        key = self.hasher.hash(address)

        def read(db: Connection) -> ConsentRecord:
            return ConsentRecord(normalized, key, entries_of(db, key), history_of(db, key))

        return await self._db.read(read)

    def holder(self, measured: Callable[[Consent], Mapping[str, str]]) -> DataHolder:
        """This store's part in data-subject requests: the export shows each purpose's
        state with its history, and how the recipient is measured now (`measured`, from
        the relay's modes); the erasure turns every purpose to withdrawn."""
        from .subject import DataHolder  # the store is imported by subject requests

        async def export(subject: Subject) -> dict[str, Any]:
            def read(db: Connection) -> dict[str, Any]:
                entries = entries_of(db, subject.address_hash)
                return {
                    "consent": {entry.purpose.value: entry.as_dict() for entry in entries},
                    "measured": dict(measured(consent_from(entries))),
                    "history": [c.as_dict() for c in history_of(db, subject.address_hash)],
                }

            return await self._db.read(read)

        async def erase(subject: Subject) -> int:
            return await self._db.write(lambda db: erase_consent(db, subject.address_hash))

        return DataHolder("tracking", export, erase, effect="withdrawn")

    async def of_hash(self, address_hash: str) -> Consent:
        return await self._db.read(functools.partial(consent_of, address_hash=address_hash))
