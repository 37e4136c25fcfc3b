"""The event log: what happened to each message and recipient, for marketers and auditors."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import sqlite_utils

from suppression import Database, Migration, utc_now


class EventType(StrEnum):
    OPEN = "open"
    CLICK = "click"
    UNSUBSCRIBE = "unsubscribe"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    SUPPRESSED = "suppressed"


_MACHINE_VERDICT = {EventType.OPEN, EventType.CLICK}


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    address_hash: str | None
    campaign: str | None = None
    message_id: str | None = None
    machine: bool | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)
    at: str = field(default_factory=utc_now)


def _create_events(db: sqlite_utils.Database) -> None:
    db.table("events").create(
        {
            "id": int,
            "type": str,
            "at": str,
            "address_hash": str,
            "campaign": str,
            "message_id": str,
            "machine": int,
            "detail": str,
        },
        pk="id",
        not_null={"type", "at"},
    )
    db.table("events").create_index(["at"])
    db.table("events").create_index(["address_hash"])
    db.table("events").create_index(["campaign", "type"])


MIGRATIONS = (Migration("tracking/0001-events", _create_events),)

PAGE_SIZE = 1000


class EventStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def record(self, *events: Event) -> None:
        await self._db.write(lambda db: insert_events(db, events))

    async def export(self) -> AsyncIterator[dict[str, Any]]:
        """Every event, oldest first, as the documented JSON object (recipient resolved)."""
        after = 0
        while True:
            rows = await self._db.read(functools.partial(_page, after=after))
            for row in rows:
                yield _as_public(row)
            if len(rows) < PAGE_SIZE:
                return
            after = rows[-1]["id"]


def insert_events(db: sqlite_utils.Database, events: Iterable[Event]) -> None:
    db.conn.executemany(
        "INSERT INTO events (type, at, address_hash, campaign, message_id, machine, detail)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (
                str(e.type),
                e.at,
                e.address_hash,
                e.campaign,
                e.message_id,
                None if e.machine is None else int(e.machine),
                json.dumps(dict(e.detail), separators=(",", ":")) if e.detail else None,
            )
            for e in events
        ],
    )


def _page(db: sqlite_utils.Database, *, after: int) -> list[dict[str, Any]]:
    # contacts belongs to the suppression package; an erased contact shows as null.
    cursor = db.execute(
        "SELECT e.id, e.type, e.at, c.address AS recipient, e.campaign, e.message_id,"
        " e.machine, e.detail FROM events e LEFT JOIN contacts c USING (address_hash)"
        " WHERE e.id > ? ORDER BY e.id LIMIT ?",
        [after, PAGE_SIZE],
    )
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _as_public(row: dict[str, Any]) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": row["type"],
        "at": row["at"],
        "recipient": row["recipient"],
        "campaign": row["campaign"],
        "message_id": row["message_id"],
    }
    if row["type"] in _MACHINE_VERDICT:
        event["machine"] = bool(row["machine"])
    if row["detail"]:
        event["detail"] = json.loads(row["detail"])
    return event
