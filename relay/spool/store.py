"""The spool: accepted messages and their pending per-recipient deliveries, durably in SQLite.

A message is written (and fsynced, with group commit) before the client hears 250. Each
recipient is a delivery row that leaves the spool when it is delivered or fails for good.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import sqlite_utils

from suppression import Database, Migration, row_dicts, utc_now

from .incoming import INCOMING, Spilled, sweep_incoming

log = logging.getLogger("optout.spool")


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


def _add_kind_and_arrival(db: sqlite_utils.Database) -> None:
    # kind: "mail" is decorated per recipient; "dsn" (our own reports) goes out as it is.
    db.execute("ALTER TABLE messages ADD COLUMN kind TEXT NOT NULL DEFAULT 'mail'")
    db.execute("ALTER TABLE messages ADD COLUMN received_ts REAL")
    db.execute("UPDATE messages SET received_ts = (julianday(received_at) - 2440587.5) * 86400.0")


def _add_account(db: sqlite_utils.Database) -> None:
    # The authenticated sender account, whose defaults (topic, tracking) apply at delivery.
    db.execute("ALTER TABLE messages ADD COLUMN account TEXT")


MIGRATIONS = (
    Migration("spool/0001-messages-and-deliveries", _create_spool),
    Migration("spool/0002-kind-and-arrival-time", _add_kind_and_arrival),
    Migration("spool/0003-account", _add_account),
)

MAIL = "mail"
DSN = "dsn"
# An erasure reads this much of each waiting message to find its recipient header fields
# (the front door refuses a header section over 1 MiB).
ERASURE_HEAD_BYTES = 1024 * 1024 + 4


# Message contents pass through the spool once (in, then out): caching their pages would
# only hold memory, up to the default 64 MiB per connection, with a flood of big messages.
SPOOL_CACHE_KIB = 2048


@dataclass(frozen=True, slots=True)
class Partition:
    """Which messages one of several delivery processes owns: by the queue id's last hex
    digit, so that no two processes ever send the same message."""

    index: int = 0
    count: int = 1

    # Fixed SQL with placeholders only, filled by `params` in this order: count = 1, or the
    # last hex digit of the queue id (deliveries aliased `d`) mod count = index.
    WHERE: ClassVar[str] = (
        "(? = 1 OR (instr('0123456789ABCDEF', substr(d.queue_id, -1)) - 1) % ? = ?)"
    )

    @property
    def params(self) -> list[int]:
        return [self.count, self.count, self.index]


WHOLE = Partition()


def iso_utc(moment: float) -> str:
    """A spool time (seconds since the epoch, as next_attempt_at) in ISO 8601 UTC to the
    second: as the queue listing and deferral events both show when a delivery is next due."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


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
    received_ts: float
    kind: str
    content: bytes
    deliveries: tuple[Delivery, ...]
    account: str | None = None
    client: str | None = None  # "HELO[IP]" as the front door saw it, for the Received field


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


# A message in memory is bound as a parameter; a spilled one is reserved at its size (and
# written through sqlite3's incremental blob I/O, in bounded pieces).
_INSERT = (
    "INSERT INTO messages (queue_id, mail_from, received_at, received_ts, client,"
    " size, kind, content, account) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_RESERVED = (
    "INSERT INTO messages (queue_id, mail_from, received_at, received_ts, client,"
    " size, kind, content, account) VALUES (?, ?, ?, ?, ?, ?, ?, zeroblob(?), ?)"
)


class Spool:
    def __init__(self, db: Database, waiting: int) -> None:
        self._db = db
        self._waiting = waiting
        self.incoming = db.path.parent / INCOMING

    @classmethod
    async def open(cls, path: Path, *, receiving: bool = False) -> Spool:
        """`receiving`: the spool of the process that takes messages over SMTP, which
        starts by removing what a stopped one left half-received in `incoming/`."""
        if receiving:
            removed = await asyncio.to_thread(sweep_incoming, path.parent / INCOMING)
            if removed:
                log.info("removed %d partly received messages from %s", removed, INCOMING)
        db = await Database.open(path, MIGRATIONS, cache_kib=SPOOL_CACHE_KIB)
        waiting = await db.read(
            lambda conn: int(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        )
        return cls(db, waiting)

    async def recount(self) -> None:
        """Count waiting messages again, when another process also takes them out."""
        self._waiting = await self._db.read(
            lambda conn: int(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        )

    @property
    def waiting(self) -> int:
        """Messages in the spool not yet fully delivered (kept in memory for back-pressure)."""
        return self._waiting

    async def close(self) -> None:
        await self._db.close()

    async def accept(
        self,
        mail_from: str,
        recipients: Sequence[str],
        content: bytes | Spilled,
        client: str,
        *,
        kind: str = MAIL,
        account: str | None = None,
    ) -> str:
        """Durably take a message; its queue id once committed. Raises if it cannot be.

        A spilled message is copied from its file into the spool in the writer thread, in
        the same transaction; the file is the caller's to discard afterwards.
        """
        queue_id = new_queue_id()
        now = time.time()

        def insert(db: sqlite_utils.Database) -> str:
            value: bytes | int
            if isinstance(content, bytes):
                sql, size, value = _INSERT, len(content), content
            else:
                sql, size, value = _INSERT_RESERVED, content.size, content.size
            cursor = db.execute(
                sql, [queue_id, mail_from, utc_now(), now, client, size, kind, value, account]
            )
            if isinstance(content, Spilled):
                assert cursor.lastrowid is not None
                with db.conn.blobopen("messages", "content", cursor.lastrowid) as blob:
                    content.file.copy_to(blob.write)
            db.conn.executemany(
                "INSERT INTO deliveries (queue_id, recipient, attempts, next_attempt_at)"
                " VALUES (?, ?, 0, ?)",
                [(queue_id, rcpt, now) for rcpt in recipients],
            )
            return queue_id

        queue_id = await self._db.write(insert)
        self._waiting += 1
        return queue_id

    async def due(
        self,
        now: float,
        exclude: Iterable[str] = (),
        limit: int = 100,
        partition: Partition = WHOLE,
    ) -> list[tuple[str, int]]:
        """(queue id, size) of messages with a delivery due by `now`, oldest first."""
        excluded = set(exclude)

        def query(db: sqlite_utils.Database) -> list[tuple[str, int]]:
            rows = db.execute(
                "SELECT d.queue_id, m.size, MIN(d.next_attempt_at) AS first FROM deliveries d"  # noqa: S608
                " JOIN messages m USING (queue_id) WHERE d.next_attempt_at <= ?"
                f" AND {Partition.WHERE} GROUP BY d.queue_id ORDER BY first LIMIT ?",
                [now, *partition.params, limit + len(excluded)],
            ).fetchall()
            return [(row[0], int(row[1])) for row in rows if row[0] not in excluded][:limit]

        return await self._db.read(query)

    async def load(self, queue_id: str, now: float) -> SpooledMessage | None:
        """The message with those of its deliveries that are due."""

        def query(db: sqlite_utils.Database) -> SpooledMessage | None:
            row = db.execute(
                "SELECT mail_from, received_at, received_ts, kind, content, account, client"
                " FROM messages WHERE queue_id = ?",
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
            mail_from, received_at, received_ts, kind, content, account, client = row
            return SpooledMessage(
                queue_id,
                mail_from,
                received_at,
                received_ts,
                kind,
                content,
                deliveries,
                account,
                client,
            )

        return await self._db.read(query)

    async def next_attempt_at(self, partition: Partition = WHOLE) -> float | None:
        def query(db: sqlite_utils.Database) -> float | None:
            row = db.execute(
                f"SELECT MIN(next_attempt_at) FROM deliveries d WHERE {Partition.WHERE}",  # noqa: S608
                partition.params,
            ).fetchone()
            return None if row is None else row[0]

        return await self._db.read(query)

    async def finish(self, delivery: Delivery) -> None:
        """Drop a delivery that is done (delivered, failed for good or suppressed)."""

        def drop(db: sqlite_utils.Database) -> bool:
            db.execute("DELETE FROM deliveries WHERE id = ?", [delivery.id])
            return bool(
                db.execute(
                    "DELETE FROM messages WHERE queue_id = ? AND NOT EXISTS"
                    " (SELECT 1 FROM deliveries WHERE queue_id = ?)",
                    [delivery.queue_id, delivery.queue_id],
                ).rowcount
            )

        if await self._db.write(drop):
            self._waiting -= 1

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

    async def for_recipient(self, matches: Callable[[str], bool]) -> list[dict[str, object]]:
        """Spooled deliveries to one person, for data exports. `matches` tells their
        addresses in any spelling (the suppression store's normalised form: SQLite's
        lower() folds ASCII only)."""

        def query(db: sqlite_utils.Database) -> list[dict[str, object]]:
            cursor = db.execute(
                "SELECT d.queue_id, d.recipient, d.attempts, d.last_reply, m.mail_from,"
                " m.received_at, m.size FROM deliveries d JOIN messages m USING (queue_id)"
                " ORDER BY d.id"
            )
            return [row for row in row_dicts(cursor) if matches(str(row["recipient"]))]

        return await self._db.read(query)

    async def erase_recipient(
        self,
        matches: Callable[[str], bool],
        redact: Callable[[bytes], tuple[int, bytes] | None],
    ) -> tuple[int, int]:
        """Erasure of one person (`matches` tells their addresses): every pending delivery
        to them is dropped (messages left empty go too), and messages still waiting for
        others get the header section `redact` makes of their first bytes (the person's
        mailbox out of To/Cc). (Deliveries dropped, messages rewritten.)

        Found with a read, then changed in one short write, so a running relay's writes
        are not held up while every waiting message's headers are read.
        """

        def find(db: sqlite_utils.Database) -> tuple[list[int], dict[str, tuple[int, bytes]]]:
            doomed = [
                id_
                for id_, recipient in db.execute("SELECT id, recipient FROM deliveries")
                if matches(recipient)
            ]
            edits = {}
            for queue_id, rowid, size in db.execute(
                "SELECT queue_id, rowid, size FROM messages WHERE kind = ?", [MAIL]
            ).fetchall():
                with db.conn.blobopen("messages", "content", rowid, readonly=True) as blob:
                    head = blob.read(min(size, ERASURE_HEAD_BYTES))
                edit = redact(head)
                if edit is not None:
                    edits[queue_id] = edit
            return doomed, edits

        doomed, edits = await self._db.read(find)

        def erase(db: sqlite_utils.Database) -> tuple[int, int, int]:
            removed = db.conn.executemany(
                "DELETE FROM deliveries WHERE id = ?", [(id_,) for id_ in doomed]
            ).rowcount
            emptied = db.execute(
                "DELETE FROM messages WHERE NOT EXISTS"
                " (SELECT 1 FROM deliveries d WHERE d.queue_id = messages.queue_id)"
            ).rowcount
            rewritten = 0
            for queue_id, (length, header) in edits.items():
                row = db.execute(
                    "SELECT content FROM messages WHERE queue_id = ?", [queue_id]
                ).fetchone()
                if row is None:
                    continue  # delivered meanwhile, or only the erased person was waiting
                content = header + bytes(row[0])[length:]
                db.execute(
                    "UPDATE messages SET content = ?, size = ? WHERE queue_id = ?",
                    [content, len(content), queue_id],
                )
                rewritten += 1
            return max(int(removed), 0), int(emptied), rewritten

        removed, emptied, rewritten = await self._db.write(erase)
        self._waiting -= emptied
        return removed, rewritten

    # ---- operator commands (optout-relay queue ...) ----

    async def entries(self, queue_id: str | None = None) -> list[QueueEntry]:
        """Waiting messages, oldest first (or just `queue_id`)."""

        def query(db: sqlite_utils.Database) -> list[QueueEntry]:
            rows = db.execute(
                "SELECT m.queue_id, m.mail_from, m.received_at, m.size, m.kind,"
                " group_concat(d.recipient, char(10)), MAX(d.attempts), MIN(d.next_attempt_at),"
                " (SELECT last_reply FROM deliveries x WHERE x.queue_id = m.queue_id"
                "  AND x.last_reply IS NOT NULL ORDER BY x.attempts DESC LIMIT 1)"
                " FROM messages m JOIN deliveries d USING (queue_id)"
                " WHERE (? IS NULL OR m.queue_id = ?)"
                " GROUP BY m.queue_id ORDER BY m.received_ts",
                [queue_id, queue_id],
            ).fetchall()
            return [
                QueueEntry(r[0], r[1], r[2], r[3], r[4], tuple(r[5].split("\n")), r[6], r[7], r[8])
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
        """Make deliveries due at once (all, or of one message); how many were changed."""
        now = time.time()
        params: list[object]
        if queue_id is None:
            sql, params = "UPDATE deliveries SET next_attempt_at = ?", [now]
        else:
            sql = "UPDATE deliveries SET next_attempt_at = ? WHERE queue_id = ?"
            params = [now, queue_id]
        return await self._db.write(lambda db: int(db.execute(sql, params).rowcount))

    async def delete(self, queue_id: str) -> int:
        """Drop a message and its deliveries (operator's decision); deliveries removed."""

        def drop(db: sqlite_utils.Database) -> int:
            removed = db.execute("DELETE FROM deliveries WHERE queue_id = ?", [queue_id]).rowcount
            db.execute("DELETE FROM messages WHERE queue_id = ?", [queue_id])
            return int(removed)

        removed = await self._db.write(drop)
        if removed:
            self._waiting -= 1
        return removed

    async def oldest_age(self, now: float) -> float | None:
        def query(db: sqlite_utils.Database) -> float | None:
            row = db.execute("SELECT MIN(received_ts) FROM messages").fetchone()
            return None if row is None or row[0] is None else now - float(row[0])

        return await self._db.read(query)
