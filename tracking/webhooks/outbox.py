"""The webhook outbox in optout.db: what waits to be POSTed, what went, what failed."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from suppression import Connection, DataHolder, Engine, Subject, format_time

from .endpoints import WebhookEndpoint

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
STATES = (PENDING, DELIVERED, FAILED)

_COLUMNS = (
    "id, webhook_id, url, type, at, payload, state, attempts, created_at, next_attempt_at,"
    " expires_at, last_attempt_at, last_status, delivered_at"
)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    webhook_id: str
    url: str
    type: str
    at: str
    payload: str
    state: str
    attempts: int
    created_at: float
    next_attempt_at: float
    expires_at: float
    last_attempt_at: float | None
    last_status: str | None
    delivered_at: float | None

    def body(self) -> bytes:
        """The POST body, the same bytes on every try: {"type", "timestamp", "data"}."""
        document = {"type": self.type, "timestamp": self.at, "data": json.loads(self.payload)}
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class EndpointHealth:
    url: str
    failing_since: float | None
    last_success_at: float | None
    last_failure_at: float | None
    last_status: str | None


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one POST came to: `ok` for a 2xx; `status` says what happened ('HTTP 500')."""

    ok: bool
    status: str
    at: float


class WebhookOutbox:
    def __init__(self, db: Engine) -> None:
        self._db = db

    async def leading(self) -> bool:
        """Whether this node drains the outbox now: one node at a time, so a webhook is
        sent by one (and again by the next only if the first died before recording it)."""
        return await self._db.hold("webhook-outbox")

    async def subscribe(self, endpoints: Sequence[WebhookEndpoint], give_up_after: float) -> None:
        """Make the triggers queue webhooks for exactly these endpoints from now on."""
        rows = [
            (kind, endpoint.url, give_up_after) for endpoint in endpoints for kind in endpoint.types
        ]

        def replace(db: Connection) -> None:
            db.execute("DELETE FROM webhook_subscriptions")
            db.executemany(
                "INSERT INTO webhook_subscriptions (type, url, give_up_after)"
                " VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                rows,
            )

        await self._db.write(replace)

    async def due(
        self, now: float, limit: int, urls: Sequence[str], skip: Sequence[int] = ()
    ) -> list[OutboxRow]:
        """Pending webhooks whose time has come, oldest due first; only to `urls` (the
        configured endpoints), leaving out `skip` (those in flight)."""

        def query(db: Connection) -> list[OutboxRow]:
            values = db.dialect.json_each
            cursor = db.execute(
                f"SELECT {_COLUMNS} FROM webhook_outbox"  # noqa: S608
                " WHERE state = 'pending' AND next_attempt_at <= ?"
                f" AND url IN (SELECT value FROM {values})"
                f" AND id NOT IN (SELECT CAST(value AS BIGINT) FROM {values})"
                " ORDER BY next_attempt_at LIMIT ?",
                [now, json.dumps(list(urls)), json.dumps(list(skip)), limit],
            )
            return [OutboxRow(*row) for row in cursor.fetchall()]

        return await self._db.read(query)

    async def next_due(self, urls: Sequence[str]) -> float | None:
        def query(db: Connection) -> float | None:
            row = db.execute(
                "SELECT MIN(next_attempt_at) FROM webhook_outbox WHERE state = 'pending'"  # noqa: S608
                f" AND url IN (SELECT value FROM {db.dialect.json_each})",
                [json.dumps(list(urls))],
            ).fetchone()
            return None if row[0] is None else float(row[0])

        return await self._db.read(query)

    async def record(self, row: OutboxRow, attempt: Attempt, retry_at: float | None) -> str:
        """Record a try: delivered, pending until `retry_at`, or failed for good (None).
        The endpoint's health follows. The row's new state."""
        if attempt.ok:
            state = DELIVERED
        elif retry_at is not None:
            state = PENDING
        else:
            state = FAILED

        def write(db: Connection) -> None:
            db.execute(
                "UPDATE webhook_outbox SET attempts = attempts + 1, last_attempt_at = ?,"
                " last_status = ?, state = ?, next_attempt_at = COALESCE(?, next_attempt_at),"
                " delivered_at = ? WHERE id = ? AND state = 'pending'",
                [
                    attempt.at,
                    attempt.status,
                    state,
                    retry_at,
                    attempt.at if attempt.ok else None,
                    row.id,
                ],
            )
            if attempt.ok:
                db.execute(
                    "INSERT INTO webhook_endpoints (url, failing_since, last_success_at)"
                    " VALUES (?, NULL, ?) ON CONFLICT (url) DO UPDATE SET failing_since = NULL,"
                    " last_success_at = excluded.last_success_at",
                    [row.url, attempt.at],
                )
            else:
                db.execute(
                    "INSERT INTO webhook_endpoints (url, failing_since, last_failure_at,"
                    " last_status) VALUES (?, ?, ?, ?) ON CONFLICT (url) DO UPDATE SET"
                    " failing_since = COALESCE(failing_since, excluded.failing_since),"
                    " last_failure_at = excluded.last_failure_at,"
                    " last_status = excluded.last_status",
                    [row.url, attempt.at, attempt.at, attempt.status],
                )

        await self._db.write(write)
        return state

    async def health(self) -> list[EndpointHealth]:
        def query(db: Connection) -> list[EndpointHealth]:
            cursor = db.execute(
                "SELECT url, failing_since, last_success_at, last_failure_at, last_status"
                " FROM webhook_endpoints ORDER BY url"
            )
            return [EndpointHealth(*row) for row in cursor.fetchall()]

        return await self._db.read(query)

    async def rows(
        self, states: Sequence[str] = (PENDING, FAILED), limit: int = 1000
    ) -> list[OutboxRow]:
        """Webhooks in `states`, oldest first."""

        def query(db: Connection) -> list[OutboxRow]:
            cursor = db.execute(
                f"SELECT {_COLUMNS} FROM webhook_outbox"  # noqa: S608
                f" WHERE state IN (SELECT value FROM {db.dialect.json_each}) ORDER BY id LIMIT ?",
                [json.dumps(list(states)), limit],
            )
            return [OutboxRow(*row) for row in cursor.fetchall()]

        return await self._db.read(query)

    async def counts(self) -> dict[str, int]:
        """How many webhooks are in each state."""

        def query(db: Connection) -> dict[str, int]:
            found = dict.fromkeys(STATES, 0)
            for state, count in db.execute(
                "SELECT state, COUNT(*) FROM webhook_outbox GROUP BY state"
            ):
                found[state] = count
            return found

        return await self._db.read(query)

    async def retry(self, webhook_id: str | None, now: float, give_up_after: float) -> int:
        """Make a pending or failed webhook (or every one) due now, with a fresh
        `give_up_after` to retry in; the number changed. Its webhook-id stays."""

        def update(db: Connection) -> int:
            where, params = ("AND webhook_id = ?", [webhook_id]) if webhook_id else ("", [])
            return int(
                db.execute(
                    "UPDATE webhook_outbox SET state = 'pending', next_attempt_at = ?,"  # noqa: S608
                    f" expires_at = ? WHERE state IN ('pending', 'failed') {where}",
                    [now, now + give_up_after, *params],
                ).rowcount
            )

        return await self._db.write(update)

    async def sweep(self, now: float, keep_delivered: float, keep_failed: float) -> int:
        """Forget webhooks delivered more than `keep_delivered` seconds ago and failed ones
        older than `keep_failed`; fail those left pending past their time (their endpoint
        was taken out of the config). The number of rows changed."""

        def clean(db: Connection) -> int:
            changed = db.execute(
                "UPDATE webhook_outbox SET state = 'failed', last_status ="
                " COALESCE(last_status, 'endpoint not configured') WHERE state = 'pending'"
                " AND expires_at < ?",
                [now],
            ).rowcount
            changed += db.execute(
                "DELETE FROM webhook_outbox WHERE (state = 'delivered' AND delivered_at < ?)"
                " OR (state = 'failed' AND created_at < ?)",
                [now - keep_delivered, now - keep_failed],
            ).rowcount
            return int(changed)

        return await self._db.write(clean)

    def holder(self) -> DataHolder:
        """The outbox's part in data-subject exports and erasures. An erasure's tombstone
        has already cleared the address from the payloads (a trigger, schema.py); what is
        left is the link to the person's hash, which goes too."""

        async def export(subject: Subject) -> list[dict[str, Any]]:
            def query(db: Connection) -> list[dict[str, Any]]:
                cursor = db.execute(
                    f"SELECT {_COLUMNS} FROM webhook_outbox"  # noqa: S608
                    " WHERE address_hash = ? ORDER BY id",
                    [subject.address_hash],
                )
                return [_exported(OutboxRow(*row)) for row in cursor.fetchall()]

            return await self._db.read(query)

        async def erase(subject: Subject) -> int:
            return await self._db.write(
                lambda db: int(
                    db.execute(
                        "UPDATE webhook_outbox SET address_hash = NULL WHERE address_hash = ?",
                        [subject.address_hash],
                    ).rowcount
                )
            )

        return DataHolder("webhooks", export, erase, effect="anonymised")


def _exported(row: OutboxRow) -> dict[str, Any]:
    return {
        "webhook_id": row.webhook_id,
        "url": row.url,
        "type": row.type,
        "at": row.at,
        "state": row.state,
        "attempts": row.attempts,
        "data": json.loads(row.payload),
    }


def iso_time(moment: float) -> str:
    """A unix time as the stored timestamps read (ISO 8601 UTC)."""
    return format_time(datetime.fromtimestamp(moment, UTC))


def describe_health(saved: EndpointHealth, now: float) -> str:
    """An endpoint's state in one line (the CLI and the dashboard)."""
    if saved.failing_since is None:
        if saved.last_success_at is None:
            return "no answer yet"
        return f"ok, last success {iso_time(saved.last_success_at)}"
    minutes = int((now - saved.failing_since) // 60)
    return f"failing since {iso_time(saved.failing_since)} ({minutes} min): {saved.last_status}"
