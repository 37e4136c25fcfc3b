"""The feedback tables, read and written through the store database's threads."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from suppression import Connection, Engine, format_time, utc_now

PURGE_BATCH = 10_000


@dataclass(frozen=True, slots=True)
class CopyRecord:
    """What one copy's addresses name (feedback_copies)."""

    copy_id: bytes
    address_hash: str
    queue_id: str
    scope: str
    campaign: str | None = None
    message_id: str | None = None
    account: str | None = None
    recipient_domain: str | None = None

    def row(self, now: str) -> tuple[object, ...]:
        return (
            self.copy_id,
            self.address_hash,
            self.queue_id,
            self.message_id,
            self.campaign,
            self.scope,
            self.account,
            self.recipient_domain,
            now,
        )


_COPY_COLUMNS = (
    "copy_id, address_hash, queue_id, message_id, campaign, scope, account,"
    " recipient_domain, created_at"
)


def find_copy(db: Connection, copy_id: bytes) -> CopyRecord | None:
    """Within a database job: the copy `copy_id` names, if still known."""
    row = db.execute(
        "SELECT copy_id, address_hash, queue_id, scope, campaign, message_id, account,"
        " recipient_domain FROM feedback_copies WHERE copy_id = ?",
        [copy_id],
    ).fetchone()
    return None if row is None else CopyRecord(bytes(row[0]), *row[1:])


@dataclass(frozen=True, slots=True)
class Report:
    """A message the feedback listener accepted, waiting to be processed."""

    id: int
    received_at: str
    client: str | None
    mail_from: str
    recipients: tuple[str, ...]
    content: bytes


class FeedbackStore:
    def __init__(self, db: Engine) -> None:
        self._db = db

    @property
    def database(self) -> Engine:
        return self._db

    async def record_copies(self, copies: Sequence[CopyRecord]) -> None:
        """Before the copies go out: a bounce may come back before anything else is written.
        A copy sent again (a retry) keeps its first record."""
        now = utc_now()
        rows = [copy.row(now) for copy in copies]
        await self._db.write(
            lambda db: db.executemany(
                f"INSERT INTO feedback_copies ({_COPY_COLUMNS})"  # noqa: S608
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                rows,
            )
        )

    async def copy(self, copy_id: bytes) -> CopyRecord | None:
        return await self._db.read(lambda db: find_copy(db, copy_id))

    async def accept(
        self, mail_from: str, recipients: Sequence[str], content: bytes, client: str
    ) -> int:
        """Durably take a report (committed, fsynced); its id. Raises if it cannot."""
        values = [utc_now(), client, mail_from, json.dumps(list(recipients)), len(content), content]

        def insert(db: Connection) -> int:
            cursor = db.execute(
                "INSERT INTO feedback_reports"
                " (received_at, client, mail_from, recipients, size, content)"
                " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                values,
            )
            return int(cursor.fetchone()[0])

        return await self._db.write(insert)

    async def pending(self, limit: int, after: int = 0) -> list[Report]:
        """Reports not yet processed, oldest first."""

        def query(db: Connection) -> list[Report]:
            rows = db.execute(
                "SELECT id, received_at, client, mail_from, recipients, content"
                " FROM feedback_reports WHERE state = 'new' AND id > ? ORDER BY id LIMIT ?",
                [after, limit],
            ).fetchall()
            return [
                Report(r[0], r[1], r[2], r[3], tuple(json.loads(r[4])), bytes(r[5] or b""))
                for r in rows
            ]

        return await self._db.read(query)

    async def count_pending(self) -> int:
        return await self._db.read(
            lambda db: int(
                db.execute("SELECT COUNT(*) FROM feedback_reports WHERE state = 'new'").fetchone()[
                    0
                ]
            )
        )

    async def reports(self, state: str | None = None, limit: int = 100) -> list[dict[str, object]]:
        """Processed or waiting reports, newest first, without their content (the operator's
        view)."""

        def query(db: Connection) -> list[dict[str, object]]:
            return _report_rows(
                db,
                "WHERE (CAST(? AS TEXT) IS NULL OR state = ?) ORDER BY id DESC LIMIT ?",
                [state, state, limit],
            )

        return await self._db.read(query)

    async def report(self, report_id: int) -> tuple[dict[str, object], bytes] | None:
        """One report as the operator sees it, and the message as it arrived."""

        def query(db: Connection) -> tuple[dict[str, object], bytes] | None:
            found = _report_rows(db, "WHERE id = ?", [report_id])
            if not found:
                return None
            row = db.execute("SELECT content FROM feedback_reports WHERE id = ?", [report_id])
            return found[0], bytes(row.fetchone()[0] or b"")

        return await self._db.read(query)

    async def purge(
        self, keep_reports: timedelta, keep_copies: timedelta, now: datetime | None = None
    ) -> tuple[int, int]:
        """Processed reports and copy records past their age go; (reports, copies) removed.
        Reports still waiting are never purged."""
        moment = now or datetime.now(UTC)
        reports_before = format_time(moment - keep_reports)
        copies_before = format_time(moment - keep_copies)
        removed = [0, 0]
        for index, sql, cutoff in (
            (
                0,
                "DELETE FROM feedback_reports WHERE id IN (SELECT id FROM feedback_reports"
                " WHERE received_at < ? AND state != 'new' LIMIT ?)",
                reports_before,
            ),
            (
                1,
                "DELETE FROM feedback_copies WHERE copy_id IN (SELECT copy_id FROM"
                " feedback_copies WHERE created_at < ? LIMIT ?)",
                copies_before,
            ),
        ):
            while True:
                count = await self._db.write(functools.partial(_delete, sql, cutoff))
                removed[index] += count
                if count < PURGE_BATCH:
                    break
        return removed[0], removed[1]


def _delete(sql: str, cutoff: str, db: Connection) -> int:
    return int(db.execute(sql, [cutoff, PURGE_BATCH]).rowcount)


_REPORT_SELECT = (
    "SELECT id, received_at, client, mail_from, recipients, size, state, processed_at,"
    " outcome FROM feedback_reports "
)


def _report_rows(db: Connection, where: str, params: list[object]) -> list[dict[str, object]]:
    # `where` is one of this module's fixed clauses; values go in as parameters.
    rows = db.execute(_REPORT_SELECT + where, params).fetchall()
    return [
        {
            "id": r[0],
            "received_at": r[1],
            "client": r[2],
            "mail_from": r[3],
            "recipients": json.loads(r[4]),
            "size": r[5],
            "state": r[6],
            "processed_at": r[7],
            "outcome": json.loads(r[8]) if r[8] else None,
        }
        for r in rows
    ]
