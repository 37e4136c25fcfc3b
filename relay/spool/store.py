"""The spool: accepted messages and their pending per-recipient deliveries, durably in SQLite.

A message is written (and fsynced, with group commit) before the client hears 250. Each
recipient is a delivery row that leaves the spool when it is delivered or fails for good.
What happened to it (an event for the event log) is written in the same transaction, into
the spool's journal, and copied to the event log from there: the spool is the one source of
truth for what was sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import sqlite_utils

from suppression import Database, row_dicts, utc_now

from ..errors import RelayError
from ._operator import OperatorCommands
from ._schema import MIGRATIONS
from .incoming import INCOMING, Spilled, sweep_incoming
from .reserve import RESERVE_FILE, DiskReserve
from .watermark import MARK_FILE, AcceptedMark

log = logging.getLogger("optout.spool")
T = TypeVar("T")

MAIL = "mail"
DSN = "dsn"
# An erasure reads this much of each waiting message to find its recipient header fields
# (the front door refuses a header section over 1 MiB).
ERASURE_HEAD_BYTES = 1024 * 1024 + 4
# next_attempt_at of a held message's deliveries: never due (held_at is what says held).
HELD = float("inf")
# Space kept free for draining when no size is configured (storage.reserve).
DEFAULT_RESERVE = 32 * 1024 * 1024

# Message contents pass through the spool once (in, then out): caching their pages would
# only hold memory, up to the default 64 MiB per connection, with a flood of big messages.
SPOOL_CACHE_KIB = 2048

Record = Mapping[str, Any]


class SpoolFull(RelayError):
    """The disk under the spool has no room for new mail (its reserve is in use)."""


@dataclass(frozen=True, slots=True)
class Partition:
    """Which messages one of several delivery processes owns: by the queue id's last hex
    digit, so that no two processes ever send the same message."""

    index: int = 0
    count: int = 1

    # Fixed SQL with placeholders only, filled by `params` in this order: count = 1, or the
    # last hex digit of the queue id (rows aliased `d`) mod count = index.
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


def is_disk_full(exc: BaseException) -> bool:
    return (
        isinstance(exc, sqlite3.OperationalError)
        and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    )


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
    # False: the content no longer has the digest it was accepted with (a damaged file).
    intact: bool = True
    # Delivery processes that died while working on it (see relay.delivery.guard).
    crashes: int = 0


@dataclass(frozen=True, slots=True)
class Report:
    """A delivery status notification to spool with the outcome it reports."""

    recipient: str
    content: bytes


# A message in memory is bound as a parameter; a spilled one is reserved at its size (and
# written through sqlite3's incremental blob I/O, in bounded pieces).
_INSERT = (
    "INSERT INTO messages (queue_id, mail_from, received_at, received_ts, client,"
    " size, kind, content, account, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_RESERVED = (
    "INSERT INTO messages (queue_id, mail_from, received_at, received_ts, client,"
    " size, kind, content, account, digest) VALUES (?, ?, ?, ?, ?, ?, ?, zeroblob(?), ?, ?)"
)


def _insert_message(
    db: sqlite_utils.Database,
    queue_id: str,
    mail_from: str,
    recipients: Sequence[str],
    content: bytes | Spilled,
    client: str,
    kind: str,
    account: str | None,
    now: float,
) -> None:
    """On the writer thread: the message, its digest and its deliveries; one more accepted."""
    value: bytes | int
    if isinstance(content, bytes):
        sql, size, value = _INSERT, len(content), content
        digest: str | None = hashlib.sha256(content).hexdigest()
    else:
        sql, size, value, digest = _INSERT_RESERVED, content.size, content.size, None
    cursor = db.execute(
        sql, [queue_id, mail_from, utc_now(), now, client, size, kind, value, account, digest]
    )
    if isinstance(content, Spilled):
        assert cursor.lastrowid is not None
        hasher = hashlib.sha256()
        with db.conn.blobopen("messages", "content", cursor.lastrowid) as blob:

            def write(piece: bytes) -> None:
                hasher.update(piece)
                blob.write(piece)

            content.file.copy_to(write)
        db.execute(
            "UPDATE messages SET digest = ? WHERE rowid = ?", [hasher.hexdigest(), cursor.lastrowid]
        )
    db.conn.executemany(
        "INSERT INTO deliveries (queue_id, recipient, attempts, next_attempt_at)"
        " VALUES (?, ?, 0, ?)",
        [(queue_id, rcpt, now) for rcpt in recipients],
    )
    db.execute("UPDATE counters SET value = value + 1 WHERE name = 'accepted'")


def insert_records(db: sqlite_utils.Database, queue_id: str, records: Iterable[Record]) -> None:
    db.conn.executemany(
        "INSERT INTO journal (queue_id, record) VALUES (?, ?)",
        [(queue_id, json.dumps(dict(r), separators=(",", ":"))) for r in records],
    )


def accepted_count(db: sqlite_utils.Database) -> int:
    row = db.execute("SELECT value FROM counters WHERE name = 'accepted'").fetchone()
    return 0 if row is None else int(row[0])


def _identity(db: sqlite_utils.Database) -> int:
    return int(db.execute("SELECT value FROM counters WHERE name = 'identity'").fetchone()[0])


class _Commits:
    """After a commit that accepted mail: the high-water mark (on the writer thread)."""

    def __init__(self, mark: AcceptedMark) -> None:
        self.mark = mark
        self.accepted = False

    def after_commit(self, db: sqlite_utils.Database) -> None:
        if not self.accepted:
            return
        self.accepted = False
        try:
            count = accepted_count(db)
        except sqlite3.Error as exc:
            log.error("cannot read the accepted count: %s", exc)
            return
        self.mark.advance(count)


async def _count_waiting(db: Database) -> int:
    return await db.read(
        lambda conn: int(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
    )


class Spool(OperatorCommands):
    def __init__(
        self,
        db: Database,
        waiting: int,
        reserve: DiskReserve,
        commits: _Commits,
        identity: int = 0,
    ) -> None:
        self._db = db
        # A random number chosen when the spool was made: names its journal in an event
        # log that several nodes' spools record into.
        self.identity = identity
        self._waiting = waiting
        self._reserve = reserve
        self._commits = commits
        self.incoming = db.path.parent / INCOMING
        # What the start-up checks found (lost frames, an unreadable mark), for /healthz.
        self.problems: list[str] = []

    @classmethod
    async def open(
        cls, path: Path, *, receiving: bool = False, reserve: int = DEFAULT_RESERVE
    ) -> Spool:
        """`receiving`: the spool of the process that takes messages over SMTP, which
        starts by removing what a stopped one left half-received in `incoming/`, and by
        checking that every acknowledged message is still there. `reserve`: bytes kept
        free so the spool can always drain (see relay.spool.reserve)."""
        if receiving:
            removed = await asyncio.to_thread(sweep_incoming, path.parent / INCOMING)
            if removed:
                log.info("removed %d partly received messages from %s", removed, INCOMING)
        commits = _Commits(AcceptedMark(path.with_name(MARK_FILE)))
        db = await Database.open(
            path, MIGRATIONS, cache_kib=SPOOL_CACHE_KIB, after_commit=commits.after_commit
        )
        spool = cls(
            db,
            await _count_waiting(db),
            DiskReserve(path.with_name(RESERVE_FILE), reserve),
            commits,
            await db.read(_identity),
        )
        if receiving:
            try:
                await spool._check_mark()
                await asyncio.to_thread(spool._reserve.ensure)
            except BaseException:
                await db.close()
                raise
        return spool

    async def _check_mark(self) -> None:
        """Compare the acknowledged count kept outside the WAL with the spool's own."""
        mark = self._commits.mark
        counted = await self._db.read(accepted_count)
        try:
            acknowledged = await asyncio.to_thread(mark.read)
        except ValueError as exc:
            self.problems.append(f"cannot check for lost mail: {exc}")
            log.error("spool: %s", self.problems[-1])
            await asyncio.to_thread(mark.reset, counted)
            return
        if acknowledged is None or acknowledged <= counted:
            await asyncio.to_thread(mark.advance, counted)
            return
        lost = acknowledged - counted
        problem = (
            f"{lost} acknowledged message{'s' if lost > 1 else ''} missing from the spool:"
            f" {mark.path.name} counts {acknowledged} accepted, {self._db.path.name} only"
            f" {counted} (committed transactions were lost from its WAL; mail accepted"
            " since then is gone, unless it had already been delivered)"
        )
        self.problems.append(problem)
        log.error("spool: %s", problem)
        # Said once: the spool counts on from what was acknowledged.
        await self._db.write(
            lambda db: db.execute(
                "UPDATE counters SET value = ? WHERE name = 'accepted'", [acknowledged]
            )
        )

    async def recount(self) -> None:
        """Count waiting messages again, when another process also takes them out."""
        self._waiting = await _count_waiting(self._db)

    @property
    def waiting(self) -> int:
        """Messages in the spool not yet fully delivered (kept in memory for back-pressure)."""
        return self._waiting

    @property
    def path(self) -> Path:
        return self._db.path

    async def close(self) -> None:
        await self._db.close()

    async def quick_check(self) -> list[str]:
        """SQLite's PRAGMA quick_check: what is wrong with the file ([] when nothing)."""
        return await self._db.quick_check()

    async def probe_write(self) -> None:
        """Raises when the spool cannot take a write now."""
        await self._db.probe_write()

    def reserve_in_place(self) -> bool:
        """Whether the disk reserve exists (file I/O: call in a thread)."""
        return self._reserve.ensure()

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
        """Durably take a message; its queue id once committed. Raises if it cannot be
        (SpoolFull when only the disk reserve is left).

        A spilled message is copied from its file into the spool in the writer thread, in
        the same transaction; the file is the caller's to discard afterwards.
        """
        queue_id = new_queue_id()
        now = time.time()
        commits = self._commits
        reserve = self._reserve

        def insert(db: sqlite_utils.Database) -> str:
            if not reserve.ensure():
                raise SpoolFull("the disk under the spool is full")
            _insert_message(
                db, queue_id, mail_from, recipients, content, client, kind, account, now
            )
            commits.accepted = True
            return queue_id

        queue_id = await self._db.write(insert)
        self._waiting += 1
        return queue_id

    async def _drain(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        """A write that takes mail out of the spool (or says what became of it): on a full
        disk, the reserve is given up and the write tried again."""
        try:
            return await self._db.write(fn)
        except sqlite3.OperationalError as exc:
            if not is_disk_full(exc) or not await asyncio.to_thread(self._reserve.release):
                raise
        return await self._db.write(fn)

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
                f" AND m.held_at IS NULL AND {Partition.WHERE}"
                " GROUP BY d.queue_id ORDER BY first LIMIT ?",
                [now, *partition.params, limit + len(excluded)],
            ).fetchall()
            return [(row[0], int(row[1])) for row in rows if row[0] not in excluded][:limit]

        return await self._db.read(query)

    async def load(self, queue_id: str, now: float) -> SpooledMessage | None:
        """The message with those of its deliveries that are due, its digest checked."""

        def query(db: sqlite_utils.Database) -> SpooledMessage | None:
            row = db.execute(
                "SELECT mail_from, received_at, received_ts, kind, content, account, client,"
                " digest, crashes FROM messages WHERE queue_id = ?",
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
            mail_from, received_at, received_ts, kind, content, account, client = row[:7]
            digest, crashes = row[7:]
            intact = digest is None or hashlib.sha256(content).hexdigest() == digest
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
                intact,
                crashes,
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

    async def finish(
        self, delivery: Delivery, *, record: Record | None = None, report: Report | None = None
    ) -> str | None:
        """Drop a delivery that is done (delivered, failed for good or suppressed), with
        the `record` of what happened and the `report` to its sender, all in one
        transaction. The report's queue id, if there is one."""
        now = time.time()
        report_id = new_queue_id() if report is not None else None

        def drop(db: sqlite_utils.Database) -> bool:
            if report is not None and report_id is not None:
                _insert_message(
                    db, report_id, "", [report.recipient], report.content, "local", DSN, None, now
                )
            if record is not None:
                insert_records(db, delivery.queue_id, [record])
            db.execute("DELETE FROM deliveries WHERE id = ?", [delivery.id])
            return bool(
                db.execute(
                    "DELETE FROM messages WHERE queue_id = ? AND NOT EXISTS"
                    " (SELECT 1 FROM deliveries WHERE queue_id = ?)",
                    [delivery.queue_id, delivery.queue_id],
                ).rowcount
            )

        if await self._drain(drop):
            self._waiting -= 1
        if report_id is not None:
            self._waiting += 1
        return report_id

    async def defer(
        self, delivery: Delivery, retry_at: float, reply: str, *, record: Record | None = None
    ) -> None:
        def update(db: sqlite_utils.Database) -> None:
            if record is not None:
                insert_records(db, delivery.queue_id, [record])
            db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ?,"
                " last_reply = ? WHERE id = ?",
                [retry_at, reply, delivery.id],
            )

        await self._drain(update)

    async def record(self, queue_id: str, records: Sequence[Record]) -> None:
        """Journal `records` about a message without changing it."""
        if records:
            await self._drain(lambda db: insert_records(db, queue_id, records))

    async def strike(self, queue_id: str, retry_at: float) -> int:
        """A delivery process died while working on the message: count it, and make its
        deliveries wait until `retry_at` so other mail goes first. The count so far (0: the
        message is gone)."""

        def count(db: sqlite_utils.Database) -> int:
            row = db.execute(
                "UPDATE messages SET crashes = crashes + 1 WHERE queue_id = ? RETURNING crashes",
                [queue_id],
            ).fetchone()
            if row is None:
                return 0
            db.execute(
                "UPDATE deliveries SET next_attempt_at = max(next_attempt_at, ?)"
                " WHERE queue_id = ?",
                [retry_at, queue_id],
            )
            return int(row[0])

        return await self._drain(count)

    async def hold(
        self, queue_id: str | None, reason: str, records: Sequence[Record] = ()
    ) -> list[str]:
        """Set messages aside (one, or every waiting one for None): no delivery until
        released. `records` (about the one message) are journalled with it. The queue ids
        held now (not those held already)."""

        def set_aside(db: sqlite_utils.Database) -> list[str]:
            ids = [
                row[0]
                for row in db.execute(
                    "UPDATE messages SET held_at = ?, held_reason = ?"
                    " WHERE held_at IS NULL AND (? IS NULL OR queue_id = ?) RETURNING queue_id",
                    [utc_now(), reason, queue_id, queue_id],
                ).fetchall()
            ]
            db.conn.executemany(
                "UPDATE deliveries SET next_attempt_at = ? WHERE queue_id = ?",
                [(HELD, held) for held in ids],
            )
            if ids and queue_id is not None:
                insert_records(db, queue_id, records)
            return ids

        return await self._drain(set_aside)

    async def release(self, queue_id: str | None) -> list[str]:
        """Put held messages (one, or all for None) back in line, due now, their crash
        count cleared. The queue ids released."""
        now = time.time()

        def put_back(db: sqlite_utils.Database) -> list[str]:
            ids = [
                row[0]
                for row in db.execute(
                    "UPDATE messages SET held_at = NULL, held_reason = NULL, crashes = 0"
                    " WHERE held_at IS NOT NULL AND (? IS NULL OR queue_id = ?)"
                    " RETURNING queue_id",
                    [queue_id, queue_id],
                ).fetchall()
            ]
            db.conn.executemany(
                "UPDATE deliveries SET next_attempt_at = ? WHERE queue_id = ?",
                [(now, released) for released in ids],
            )
            return ids

        return await self._drain(put_back)

    # ---- the journal: outcomes on their way to the event log ----

    async def pending_records(
        self, partition: Partition = WHOLE, limit: int = 500
    ) -> list[tuple[int, Record]]:
        """Journalled records of this partition, oldest first, with their ids."""

        def query(db: sqlite_utils.Database) -> list[tuple[int, Record]]:
            rows = db.execute(
                f"SELECT id, record FROM journal d WHERE {Partition.WHERE}"  # noqa: S608
                " ORDER BY id LIMIT ?",
                [*partition.params, limit],
            ).fetchall()
            return [(int(row[0]), json.loads(row[1])) for row in rows]

        return await self._db.read(query)

    async def forget_records(self, ids: Sequence[int]) -> None:
        """Drop journalled records the event log now has."""
        if ids:
            await self._drain(
                lambda db: db.conn.executemany(
                    "DELETE FROM journal WHERE id = ?", [(id_,) for id_ in ids]
                )
            )

    async def forget_records_through(self, through: int, partition: Partition = WHOLE) -> None:
        """Drop this partition's journalled records up to id `through`."""
        await self._drain(
            lambda db: db.execute(
                f"DELETE FROM journal AS d WHERE id <= ? AND {Partition.WHERE}",  # noqa: S608
                [through, *partition.params],
            )
        )

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
        mailbox out of To/Cc), and a new digest. (Deliveries dropped, messages rewritten.)

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
                    "UPDATE messages SET content = ?, size = ?, digest = ? WHERE queue_id = ?",
                    [content, len(content), hashlib.sha256(content).hexdigest(), queue_id],
                )
                rewritten += 1
            return max(int(removed), 0), int(emptied), rewritten

        removed, emptied, rewritten = await self._drain(erase)
        self._waiting -= emptied
        return removed, rewritten

    async def oldest_age(self, now: float) -> float | None:
        def query(db: sqlite_utils.Database) -> float | None:
            row = db.execute("SELECT MIN(received_ts) FROM messages").fetchone()
            return None if row is None or row[0] is None else now - float(row[0])

        return await self._db.read(query)
