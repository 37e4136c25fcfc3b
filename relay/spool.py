"""The spool: accepted messages and their pending per-recipient deliveries, durably in SQLite.

A message is written (and fsynced, with group commit) before the client hears 250. Each
recipient is a delivery row that leaves the spool when it is delivered or fails for good.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from suppression import Database, Migration, utc_now


def _create_spool(db: sqlite_utils.Database) -> None:
    db.table("messages").create(
        {
            "queue_id": str,
            "mail_from": str,
            "received_at": str,
            "client": str,
            "size": int,
            "content": bytes,
        },
        pk="queue_id",
        not_null={"mail_from", "received_at", "content"},
    )
    db.table("deliveries").create(
        {
            "id": int,
            "queue_id": str,
            "recipient": str,
            "attempts": int,
            "next_attempt_at": float,
            "last_reply": str,
        },
        pk="id",
        foreign_keys=[("queue_id", "messages", "queue_id")],
        not_null={"queue_id", "recipient", "attempts", "next_attempt_at"},
        defaults={"attempts": 0},
    )
    db.table("deliveries").create_index(["next_attempt_at"])
    db.table("deliveries").create_index(["queue_id"])


MIGRATIONS = (Migration("spool/0001-messages-and-deliveries", _create_spool),)


def new_queue_id() -> str:
    """A short, unique, Postfix-like queue id for logs and events."""
    return secrets.token_hex(6).upper()


@dataclass(frozen=True, slots=True)
class Delivery:
    id: int
    queue_id: str
    recipient: str
    attempts: int


@dataclass(frozen=True, slots=True)
class SpooledMessage:
    queue_id: str
    mail_from: str
    received_at: str
    content: bytes
    deliveries: tuple[Delivery, ...]


class Spool:
    def __init__(self, db: Database) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: Path) -> Spool:
        return cls(await Database.open(path, MIGRATIONS))

    async def close(self) -> None:
        await self._db.close()

    async def accept(
        self, mail_from: str, recipients: Sequence[str], content: bytes, client: str
    ) -> str:
        """Durably take a message; its queue id once committed. Raises if it cannot be."""
        queue_id = new_queue_id()
        now = time.time()

        def insert(db: sqlite_utils.Database) -> str:
            db.execute(
                "INSERT INTO messages (queue_id, mail_from, received_at, client, size, content)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [queue_id, mail_from, utc_now(), client, len(content), content],
            )
            db.conn.executemany(
                "INSERT INTO deliveries (queue_id, recipient, attempts, next_attempt_at)"
                " VALUES (?, ?, 0, ?)",
                [(queue_id, rcpt, now) for rcpt in recipients],
            )
            return queue_id

        return await self._db.write(insert)

    async def due(self, now: float, exclude: Iterable[str] = (), limit: int = 100) -> list[str]:
        """Queue ids with a delivery due by `now`, oldest first, not in `exclude`."""
        excluded = set(exclude)

        def query(db: sqlite_utils.Database) -> list[str]:
            rows = db.execute(
                "SELECT queue_id, MIN(next_attempt_at) AS first FROM deliveries"
                " WHERE next_attempt_at <= ? GROUP BY queue_id ORDER BY first LIMIT ?",
                [now, limit + len(excluded)],
            ).fetchall()
            return [row[0] for row in rows if row[0] not in excluded][:limit]

        return await self._db.read(query)

    async def load(self, queue_id: str, now: float) -> SpooledMessage | None:
        """The message with those of its deliveries that are due."""

        def query(db: sqlite_utils.Database) -> SpooledMessage | None:
            row = db.execute(
                "SELECT mail_from, received_at, content FROM messages WHERE queue_id = ?",
                [queue_id],
            ).fetchone()
            if row is None:
                return None
            deliveries = tuple(
                Delivery(id_, queue_id, rcpt, attempts)
                for id_, rcpt, attempts in db.execute(
                    "SELECT id, recipient, attempts FROM deliveries"
                    " WHERE queue_id = ? AND next_attempt_at <= ? ORDER BY id",
                    [queue_id, now],
                ).fetchall()
            )
            return SpooledMessage(queue_id, row[0], row[1], row[2], deliveries)

        return await self._db.read(query)

    async def next_attempt_at(self) -> float | None:
        def query(db: sqlite_utils.Database) -> float | None:
            row = db.execute("SELECT MIN(next_attempt_at) FROM deliveries").fetchone()
            return None if row is None else row[0]

        return await self._db.read(query)

    async def finish(self, delivery: Delivery) -> None:
        """Drop a delivery that is done (delivered, failed for good or suppressed)."""

        def delete(db: sqlite_utils.Database) -> None:
            db.execute("DELETE FROM deliveries WHERE id = ?", [delivery.id])
            db.execute(
                "DELETE FROM messages WHERE queue_id = ? AND NOT EXISTS"
                " (SELECT 1 FROM deliveries WHERE queue_id = ?)",
                [delivery.queue_id, delivery.queue_id],
            )

        await self._db.write(delete)

    async def defer(self, delivery: Delivery, retry_at: float, reply: str) -> None:
        await self._db.write(
            lambda db: db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ?,"
                " last_reply = ? WHERE id = ?",
                [retry_at, reply, delivery.id],
            )
        )

    async def depth(self) -> tuple[int, int]:
        """(messages, deliveries) waiting in the spool."""

        def query(db: sqlite_utils.Database) -> tuple[int, int]:
            messages = db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
            deliveries = db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
            return int(messages), int(deliveries)

        return await self._db.read(query)

    async def for_recipient(self, address: str) -> list[dict[str, object]]:
        """Spooled deliveries to `address` (compared case-insensitively), for data exports."""

        def query(db: sqlite_utils.Database) -> list[dict[str, object]]:
            cursor = db.execute(
                "SELECT d.queue_id, d.recipient, d.attempts, d.last_reply, m.mail_from,"
                " m.received_at, m.size FROM deliveries d JOIN messages m USING (queue_id)"
                " WHERE lower(d.recipient) = lower(?) ORDER BY d.id",
                [address],
            )
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

        return await self._db.read(query)

    async def erase_recipient(self, address: str) -> int:
        """Drop every pending delivery to `address` (erasure); messages left empty go too."""

        def delete(db: sqlite_utils.Database) -> int:
            removed = db.execute(
                "DELETE FROM deliveries WHERE lower(recipient) = lower(?)", [address]
            ).rowcount
            db.execute(
                "DELETE FROM messages WHERE NOT EXISTS"
                " (SELECT 1 FROM deliveries d WHERE d.queue_id = messages.queue_id)"
            )
            return int(removed)

        return await self._db.write(delete)
