"""The spool as an operator sees and manages it (`optout-relay queue ...`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import sqlite_utils

from suppression import Database

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """One waiting message as an operator sees it (`optout-relay queue list`)."""

    queue_id: str
    mail_from: str
    received_at: str
    size: int
    kind: str
    recipients: tuple[str, ...]
    attempts: int
    next_attempt_at: float
    last_reply: str | None
    held_reason: str | None = None  # None: not held
    crashes: int = 0

    @property
    def held(self) -> bool:
        return self.held_reason is not None


class OperatorCommands:
    """The operator's commands of `Spool` (which supplies the database and its writes)."""

    _db: Database
    _waiting: int

    async def _drain(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        raise NotImplementedError

    async def entries(self, queue_id: str | None = None) -> list[QueueEntry]:
        """Waiting messages, oldest first (or just `queue_id`)."""

        def query(db: sqlite_utils.Database) -> list[QueueEntry]:
            rows = db.execute(
                "SELECT m.queue_id, m.mail_from, m.received_at, m.size, m.kind,"
                " group_concat(d.recipient, char(10)), MAX(d.attempts), MIN(d.next_attempt_at),"
                " (SELECT last_reply FROM deliveries x WHERE x.queue_id = m.queue_id"
                "  AND x.last_reply IS NOT NULL ORDER BY x.attempts DESC LIMIT 1),"
                " CASE WHEN m.held_at IS NULL THEN NULL ELSE coalesce(m.held_reason, '') END,"
                " m.crashes"
                " FROM messages m JOIN deliveries d USING (queue_id)"
                " WHERE (? IS NULL OR m.queue_id = ?)"
                " GROUP BY m.queue_id ORDER BY m.received_ts",
                [queue_id, queue_id],
            ).fetchall()
            return [
                QueueEntry(
                    r[0],
                    r[1],
                    r[2],
                    r[3],
                    r[4],
                    tuple(r[5].split("\n")),
                    r[6],
                    r[7],
                    r[8],
                    r[9],
                    r[10],
                )
                for r in rows
            ]

        return await self._db.read(query)

    async def content(self, queue_id: str) -> bytes | None:
        def query(db: sqlite_utils.Database) -> bytes | None:
            row = db.execute(
                "SELECT content FROM messages WHERE queue_id = ?", [queue_id]
            ).fetchone()
            return None if row is None else bytes(row[0])

        return await self._db.read(query)

    async def retry_now(self, queue_id: str | None = None) -> int:
        """Make deliveries due at once (all, or of one message); how many were changed.
        Held messages stay held: `release` puts them back."""
        now = time.time()

        def make_due(db: sqlite_utils.Database) -> int:
            return int(
                db.execute(
                    "UPDATE deliveries SET next_attempt_at = ? WHERE (? IS NULL OR queue_id = ?)"
                    " AND queue_id NOT IN (SELECT queue_id FROM messages"
                    " WHERE held_at IS NOT NULL)",
                    [now, queue_id, queue_id],
                ).rowcount
            )

        return await self._drain(make_due)

    async def delete(self, queue_id: str | None) -> tuple[int, int]:
        """Drop a message (or every one, for None) and its deliveries: the operator's
        decision. (messages, deliveries) removed."""

        def drop(db: sqlite_utils.Database) -> tuple[int, int]:
            removed = db.execute(
                "DELETE FROM deliveries WHERE (? IS NULL OR queue_id = ?)", [queue_id, queue_id]
            ).rowcount
            messages = db.execute(
                "DELETE FROM messages WHERE (? IS NULL OR queue_id = ?)", [queue_id, queue_id]
            ).rowcount
            return int(messages), int(removed)

        messages, removed = await self._drain(drop)
        self._waiting -= messages
        return messages, removed

    async def depth(self) -> tuple[int, int]:
        """(messages, deliveries) waiting in the spool."""

        def query(db: sqlite_utils.Database) -> tuple[int, int]:
            messages = db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
            deliveries = db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
            return int(messages), int(deliveries)

        return await self._db.read(query)
