"""The append-only record of every suppression change: the proof of when and how."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .database import utc_now
from .engine import Connection

# (at, action, address_hash, scope, reason, source, actor, detail JSON)
AuditRow = tuple[str, str, str | None, str | None, str | None, str | None, str | None, str | None]

# With its id given: the entry it creates refers to it (suppressions.added_by).
NumberedAuditRow = tuple[
    int, str, str, str | None, str | None, str | None, str | None, str | None, str | None
]

_INSERT_NUMBERED = (
    "INSERT INTO suppression_audit"
    " (id, at, action, address_hash, scope, reason, source, actor, detail)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    at: str
    action: str
    address_hash: str | None
    scope: str | None
    reason: str | None
    source: str | None
    actor: str | None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "action": self.action,
            "address_hash": self.address_hash,
            "scope": self.scope,
            "reason": self.reason,
            "source": self.source,
            "actor": self.actor,
            "detail": dict(self.detail),
        }


# Anything that looks like an address. The audit log outlives erasure, so a detail (an SMTP
# reply quoting the recipient, say) must never carry one in.
_ADDRESS_LIKE = re.compile(r"[^\s<>\"'(),;:\[\]]+@[^\s<>\"'(),;:\[\]]+")


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return _ADDRESS_LIKE.sub("[address]", value) if "@" in value else value
    if isinstance(value, Mapping):
        return {key: _redacted(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(item) for item in value]
    return value


def dumps(detail: Mapping[str, Any] | None) -> str | None:
    """Audit detail as JSON, with anything address-like redacted."""
    if not detail:
        return None
    return json.dumps(_redacted(detail), separators=(",", ":"), sort_keys=True)


def record_rows(db: Connection, rows: Iterable[AuditRow]) -> None:
    # Ids given here, never by the engine: a batch of entries numbers its own records (see
    # entries.py), and one PostgreSQL sequence beside that numbering would fall behind.
    # Writes are serialised (suppression.engine), so MAX + 1 is free.
    first = next_id(db)
    record_numbered(db, [(first + n, *row) for n, row in enumerate(rows)])


def next_id(db: Connection) -> int:
    """The id the next audit record gets (MAX of a rowid is one B-tree descent)."""
    return int(db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM suppression_audit").fetchone()[0])


def record_numbered(db: Connection, rows: Iterable[NumberedAuditRow]) -> None:
    db.executemany(_INSERT_NUMBERED, rows)


def record(
    db: Connection,
    action: str,
    *,
    address_hash: str | None = None,
    scope: str | None = None,
    reason: str | None = None,
    source: str | None = None,
    actor: str | None = None,
    detail: Mapping[str, Any] | None = None,
    at: str | None = None,
) -> None:
    record_rows(
        db, [(at or utc_now(), action, address_hash, scope, reason, source, actor, dumps(detail))]
    )


def history(db: Connection, keys: Sequence[str]) -> list[AuditRecord]:
    """Every change recorded under any of `keys`, oldest first."""
    marks = ", ".join("?" for _ in keys)
    rows = db.execute(
        "SELECT at, action, address_hash, scope, reason, source, actor, detail"  # noqa: S608
        f" FROM suppression_audit WHERE address_hash IN ({marks}) ORDER BY id",
        list(keys),
    ).fetchall()
    return [
        AuditRecord(
            at=row[0],
            action=row[1],
            address_hash=row[2],
            scope=row[3],
            reason=row[4],
            source=row[5],
            actor=row[6],
            detail=json.loads(row[7]) if row[7] else {},
        )
        for row in rows
    ]
