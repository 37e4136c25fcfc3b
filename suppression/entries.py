"""Writing suppressions so that nothing ever weakens one: the merge shared by add and import.

An entry that exists is only ever made stronger (a stronger reason, a later or no expiry);
its first `created_at` stays as the proof of when the opt-out began. Each change is audited
in the same transaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from operator import itemgetter
from typing import Any, NamedTuple

from .audit import NumberedAuditRow, dumps, next_id, record_numbered
from .engine import Connection
from .reasons import stronger

COLUMNS = (
    "address_hash, address, scope, reason, source, created_at, expires_at, updated_at, added_by"
)
# One suppressions row, in COLUMNS order. added_by: the id of the audit record that created
# it, which also orders entries by creation when created_at ties (a batch shares one time).
RowValues = tuple[str, str | None, str, str, str, str, str | None, str, int]


class Outcome(StrEnum):
    ADDED = "added"
    STRENGTHENED = "strengthened"
    UNCHANGED = "unchanged"


class Entry(NamedTuple):
    """One suppression to apply. `detail` is the audit detail as JSON (e.g. an import line).

    A tuple because an import makes one per row: a million of them.
    """

    key: str
    scope: str
    reason: str
    source: str
    address: str | None = None
    expires_at: str | None = None
    detail: str | None = None


@dataclass(slots=True)
class _Row:
    address_hash: str
    address: str | None
    scope: str
    reason: str
    source: str
    created_at: str
    expires_at: str | None
    updated_at: str
    added_by: int

    def values(self) -> RowValues:
        return (
            self.address_hash,
            self.address,
            self.scope,
            self.reason,
            self.source,
            self.created_at,
            self.expires_at,
            self.updated_at,
            self.added_by,
        )


def _in_json(db: Connection, column: str) -> str:
    # One parameter for any number of keys (no SQLITE_MAX_VARIABLE_NUMBER limit); the
    # planner probes the primary key once per key. `column` is always a literal of ours.
    return f"{column} IN (SELECT value FROM {db.dialect.json_each})"  # noqa: S608


# A whole row replaced. SQLite's REPLACE is a delete and an insert, and the webhook trigger
# on insert sees it as one; PostgreSQL's trigger fires on this upsert's update of these
# columns (tracking/webhooks/schema.py).
_REPLACE = {
    "sqlite": f"REPLACE INTO suppressions ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
    "postgresql": f"INSERT INTO suppressions ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
    " ON CONFLICT (address_hash, scope) DO UPDATE SET address = excluded.address,"
    " reason = excluded.reason, source = excluded.source, created_at = excluded.created_at,"
    " expires_at = excluded.expires_at, updated_at = excluded.updated_at,"
    " added_by = excluded.added_by",
}


def apply_entries(
    db: Connection, entries: Sequence[Entry], *, actor: str | None, now: str
) -> list[Outcome]:
    """Apply `entries` in order; the outcome of each. Runs inside the caller's transaction.

    Built for batches of 100,000 import rows, most of them new: the first entry of each
    (key, scope) is inserted optimistically (ON CONFLICT DO NOTHING, one probe each); only when
    something was already there, or listed twice, are the rows read back and merged.
    """
    first_id = next_id(db)
    erased = _erased(db, entries)
    firsts: dict[tuple[str, str], int] = {}  # slot -> index of its first entry
    for index, entry in enumerate(entries):
        firsts.setdefault((entry.key, entry.scope), index)
    # Audit ids are handed out here, so that each row can name the record of its creation.
    ids = {slot: first_id + n for n, slot in enumerate(firsts)}
    fresh = [_fresh(entries[index], erased, now, ids[slot]) for slot, index in firsts.items()]
    fresh.sort(key=itemgetter(0, 2))  # key order: neighbouring inserts share B-tree pages
    inserted = db.executemany(
        f"INSERT INTO suppressions ({COLUMNS})"  # noqa: S608
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        fresh,
    ).rowcount
    if inserted == len(entries):
        record_numbered(
            db, [_added(ids[slot], entries[index], actor, now) for slot, index in firsts.items()]
        )
        return [Outcome.ADDED] * len(entries)
    return _merge_all(db, entries, firsts, ids, erased, actor=actor, now=now)


def _erased(db: Connection, entries: Sequence[Entry]) -> set[str]:
    if not db.execute("SELECT EXISTS (SELECT 1 FROM suppression_erasures)").fetchone()[0]:
        return set()
    keys = json.dumps(list({e.key for e in entries}))
    return {
        hit[0]
        for hit in db.execute(
            f"SELECT address_hash FROM suppression_erasures WHERE {_in_json(db, 'address_hash')}",  # noqa: S608
            [keys],
        )
    }


def _merge_all(
    db: Connection,
    entries: Sequence[Entry],
    firsts: dict[tuple[str, str], int],
    ids: dict[tuple[str, str], int],
    erased: set[str],
    *,
    actor: str | None,
    now: str,
) -> list[Outcome]:
    """The general case: read every row of the batch back and apply entries in order."""
    keys = json.dumps(list({e.key for e in entries}))
    stored: dict[tuple[str, str], _Row] = {
        (found[0], found[2]): _Row(*found)
        for found in db.execute(
            f"SELECT {COLUMNS} FROM suppressions WHERE {_in_json(db, 'address_hash')}",  # noqa: S608
            [keys],
        )
    }
    next_audit = max(ids.values(), default=0) + 1
    audit: list[NumberedAuditRow] = []
    outcomes: list[Outcome] = []
    updates: dict[tuple[str, str], _Row] = {}
    for index, entry in enumerate(entries):
        slot = (entry.key, entry.scope)
        current = stored[slot]
        if firsts[slot] == index and current.added_by == ids[slot]:
            # Inserted by the optimistic pass just now.
            audit.append(_added(ids[slot], entry, actor, now))
            outcomes.append(Outcome.ADDED)
            continue
        if current.expires_at is not None and current.expires_at <= now:
            # Lapsed: replaced by a fresh entry.
            stored[slot] = updates[slot] = _Row(*_fresh(entry, erased, now, next_audit))
            audit.append(_added(next_audit, entry, actor, now))
            next_audit += 1
            outcomes.append(Outcome.ADDED)
            continue
        outcome, change = _merge(current, entry, now)
        outcomes.append(outcome)
        if change is not None:
            audit.append(
                _audit(next_audit, "strengthen", entry, current.reason, actor, now, change)
            )
            next_audit += 1
            updates[slot] = current
    if updates:
        db.executemany(
            _REPLACE[db.dialect.name],
            [row.values() for row in updates.values()],
        )
    if audit:
        record_numbered(db, audit)
    return outcomes


def _fresh(entry: Entry, erased: set[str], now: str, audit_id: int) -> RowValues:
    # An erased person's plain address is never stored again, even when a list carries it.
    address = None if erased and entry.key in erased else entry.address
    return (
        entry.key,
        address,
        entry.scope,
        entry.reason,
        entry.source,
        now,
        entry.expires_at,
        now,
        audit_id,
    )


def _added(audit_id: int, entry: Entry, actor: str | None, now: str) -> NumberedAuditRow:
    detail = entry.detail
    if entry.expires_at is not None:
        detail = dumps({**_loads(detail), "expires_at": entry.expires_at})
    return _audit(audit_id, "add", entry, entry.reason, actor, now, detail)


def _merge(current: _Row, entry: Entry, now: str) -> tuple[Outcome, str | None]:
    """Strengthen `current` in place by `entry`; the audit detail of the change, if any."""
    reason = stronger(current.reason, entry.reason)
    expires_at = (
        None
        if current.expires_at is None or entry.expires_at is None
        else max(current.expires_at, entry.expires_at)
    )
    if reason == current.reason and expires_at == current.expires_at:
        return Outcome.UNCHANGED, None
    previous: dict[str, Any] = {"reason": current.reason, "expires_at": current.expires_at}
    if reason != current.reason:
        current.reason = reason
        current.source = entry.source
    current.expires_at = expires_at
    current.updated_at = now
    change = {**_loads(entry.detail), "previous": previous, "expires_at": expires_at}
    return Outcome.STRENGTHENED, dumps(change)


def _loads(detail: str | None) -> dict[str, Any]:
    return dict(json.loads(detail)) if detail else {}


def _audit(
    audit_id: int,
    action: str,
    entry: Entry,
    reason: str,
    actor: str | None,
    now: str,
    detail: str | None,
) -> NumberedAuditRow:
    return (audit_id, now, action, entry.key, entry.scope, reason, entry.source, actor, detail)
