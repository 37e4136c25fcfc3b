"""Outcomes on their way from the spool's journal to the event log.

The worker writes each event into the spool in the same transaction as the change it
describes (a delivery finished, deferred, a message held), so the spool alone says what was
sent, whatever happens to optout.db. This forwarder copies the journal to the event log,
exactly once (`EventStore.record_from`), and drops what was copied. While the event log
cannot be written (a full disk), the events wait in the journal and mail keeps flowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from suppression import Reason, StorageUnavailable, SuppressionStore
from tracking import Event, EventStore, EventType

from ..spool import Partition, Record, Spool

log = logging.getLogger("optout.delivery")

BATCH = 500
RETRY_FIRST = 1.0
RETRY_MAX = 30.0
STOP_TIMEOUT = 5.0


def event_record(event: Event, recipient: str | None = None) -> Record:
    """An event as the spool's journal keeps it (JSON). `recipient`: an address not yet
    remembered (hash -> address) because the store could not be written; the forwarder
    remembers it with the event."""
    record = {
        "type": str(event.type),
        "address_hash": event.address_hash,
        "campaign": event.campaign,
        "queue_id": event.queue_id,
        "message_id": event.message_id,
        "detail": dict(event.detail),
        "at": event.at,
    }
    if recipient is not None:
        record["recipient"] = recipient
    return record


def event_of(record: Mapping[str, Any]) -> Event:
    return Event(
        EventType(record["type"]),
        record.get("address_hash"),
        record.get("campaign"),
        record.get("queue_id"),
        detail=record.get("detail") or {},
        at=record["at"],
        message_id=record.get("message_id"),
    )


class OutcomeForwarder:
    """Copies one partition's journal to the event log whenever it is told there is more."""

    def __init__(
        self,
        spool: Spool,
        events: EventStore,
        suppressions: SuppressionStore,
        partition: Partition,
    ) -> None:
        self._spool = spool
        self._events = events
        self._suppressions = suppressions
        self._partition = partition
        # Unique per spool and partition: nodes sharing one event log each keep their own.
        self._source = f"spool-{spool.identity:016x}:{partition.index}/{partition.count}"
        self._more = asyncio.Event()
        self._failing: str | None = None
        self._forgotten = False

    def notify(self) -> None:
        self._more.set()

    async def run(self) -> None:
        delay = RETRY_FIRST
        self._more.set()  # whatever a stopped process left
        while True:
            await self._more.wait()
            self._more.clear()
            try:
                await self.flush()
            except Exception as exc:
                self._more.set()
                self.report_failure(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_FIRST
            if self._failing is not None:
                log.warning("event log writable again; journalled outcomes recorded")
                self._failing = None

    async def flush(self) -> None:
        """Copy everything journalled so far."""
        if not self._forgotten:
            # Copied before a crash but not yet dropped from the journal: drop it now.
            done = await self._events.recorded_through(self._source)
            await self._spool.forget_records_through(done, self._partition)
            self._forgotten = True
        while True:
            pending = await self._spool.pending_records(self._partition, BATCH)
            if not pending:
                return
            ids = [id_ for id_, _ in pending]
            addresses = [r["recipient"] for _, r in pending if r.get("recipient")]
            if addresses:
                await self._suppressions.remember(addresses)
            for _, record in pending:
                await self._suppress_if_no_mailbox(record)
            await self._events.record_from(
                self._source, ids[-1], [event_of(record) for _, record in pending]
            )
            await self._spool.forget_records(ids)
            if len(pending) < BATCH:
                return

    async def _suppress_if_no_mailbox(self, record: Record) -> None:
        """A copy the downstream refused with 5.1.x (no such mailbox, RFC 3463) suppresses
        its address at once, as a DSN would (worker.classify_bounce said so in the event).
        Done here, with the event, so a full event store never stops delivery; done again
        after a crash, it changes nothing (the same entry)."""
        detail = record.get("detail") or {}
        address_hash = record.get("address_hash")
        status = str(detail.get("status", ""))
        if record["type"] != EventType.BOUNCED or detail.get("source") != "sync":
            return
        if address_hash is None or not status.startswith("5.1."):
            return
        proof = {"kind": "hard", "status": status, "source": "sync", "reply": detail["reply"]}
        await self._suppressions.add_hash(
            address_hash, reason=Reason.HARD_BOUNCE, source="bounce:sync", detail=proof
        )

    async def stop(self, task: asyncio.Task[None]) -> None:
        """Stop the loop, then try once more to leave nothing behind."""
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        try:
            await asyncio.wait_for(self.flush(), STOP_TIMEOUT)
        except Exception as exc:  # they wait in the journal for the next start
            self.report_failure(exc)

    def report_failure(self, exc: BaseException) -> None:
        """Said once per kind of failure (a full disk fails every write alike). A shared
        store that is away says so itself, once per process."""
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, StorageUnavailable):
            self._failing = reason
            return
        if reason != self._failing:
            self._failing = reason
            log.error(
                "cannot write to the event log (%s); outcomes wait in the spool's journal",
                reason,
            )
