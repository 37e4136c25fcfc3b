"""The delivery worker: takes due deliveries from the spool, personalises, sends, records."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from suppression import GLOBAL, Reason, SuppressionStore
from tracking import Event, EventStore, EventType, TrackingUrls

from .pipeline import Pipeline, PreparedMessage
from .spool import Delivery, Spool, SpooledMessage
from .transport import Outcome, Outgoing, Status, Transport

log = logging.getLogger("optout.delivery")

# Only these keep a transactional message from someone who unsubscribed from marketing.
TRANSACTIONAL_BLOCKERS = frozenset({Reason.HARD_BOUNCE, Reason.COMPLAINT})
IDLE_POLL = 30.0
SPOOL_RETRY = 5.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    initial_delay: float
    max_delay: float

    def delay(self, attempts: int) -> float:
        """Exponential back-off with jitter, so deferred mail does not return in lockstep."""
        base = min(self.initial_delay * 2.0 ** min(attempts, 32), self.max_delay)
        return base * random.uniform(0.8, 1.0)


class DeliveryWorker:
    def __init__(
        self,
        *,
        spool: Spool,
        transport: Transport,
        pipeline: Pipeline,
        suppressions: SuppressionStore,
        events: EventStore,
        urls: TrackingUrls,
        retry: RetryPolicy,
        concurrency: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._spool = spool
        self._transport = transport
        self._pipeline = pipeline
        self._suppressions = suppressions
        self._events = events
        self._urls = urls
        self._retry = retry
        self._clock = clock
        self._sends = asyncio.Semaphore(concurrency)
        self._max_messages = concurrency * 4
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._in_flight: dict[str, asyncio.Task[None]] = {}

    def notify(self) -> None:
        """A message was spooled: look for work now rather than at the next poll."""
        self._wakeup.set()

    async def run(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            try:
                await self._start_due()
                await self._sleep()
            except Exception:
                # The spool is unreadable for now (disk, lock): mail stays there; try later.
                log.exception("cannot read the spool; retrying in %.0f s", SPOOL_RETRY)
                await asyncio.sleep(SPOOL_RETRY)

    async def _start_due(self) -> None:
        room = self._max_messages - len(self._in_flight)
        if room <= 0:
            return
        for queue_id in await self._spool.due(self._clock(), self._in_flight, room):
            task = asyncio.create_task(self._deliver(queue_id), name=f"deliver-{queue_id}")
            self._in_flight[queue_id] = task
            task.add_done_callback(functools.partial(self._done, queue_id))

    async def _sleep(self) -> None:
        timeout = IDLE_POLL
        next_at = await self._spool.next_attempt_at()
        if next_at is not None:
            timeout = min(max(next_at - self._clock(), 0.0), IDLE_POLL)
            if timeout == 0.0 and self._in_flight:
                timeout = IDLE_POLL  # what is due is in flight: its end wakes us
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout if timeout > 0 else 0.01)

    def _done(self, queue_id: str, _task: asyncio.Task[None]) -> None:
        self._in_flight.pop(queue_id, None)
        self._wakeup.set()

    async def stop(self) -> None:
        """Finish the copies being sent now; the rest stays spooled for the next start."""
        self._stopping = True
        self._wakeup.set()
        if self._in_flight:
            await asyncio.gather(*self._in_flight.values(), return_exceptions=True)
        await self._transport.close()

    async def _deliver(self, queue_id: str) -> None:
        message = None
        try:
            message = await self._spool.load(queue_id, self._clock())
            if message is None or not message.deliveries:
                return
            prepared = self._pipeline.prepare(queue_id, message.mail_from, message.content)
            for decision in prepared.meta.decisions:
                log.info("%s", decision, extra={"queue_id": queue_id})
            await self._suppressions.remember(d.recipient for d in message.deliveries)
            await asyncio.gather(
                *(self._deliver_one(message, prepared, d) for d in message.deliveries)
            )
        except Exception:
            # The spool still holds everything not finished; back off so it is not a hot loop.
            log.exception("delivery pass failed", extra={"queue_id": queue_id})
            if message is not None:
                await self._back_off(message)

    async def _back_off(self, message: SpooledMessage) -> None:
        for delivery in message.deliveries:
            retry_at = self._clock() + self._retry.delay(delivery.attempts)
            try:
                await self._spool.defer(delivery, retry_at, "local error in delivery")
            except Exception:
                log.exception("cannot defer", extra={"queue_id": message.queue_id})
                return

    async def _deliver_one(
        self, message: SpooledMessage, prepared: PreparedMessage, delivery: Delivery
    ) -> None:
        if self._stopping:
            return
        async with self._sends:
            if self._stopping:
                return
            meta = prepared.meta
            address_hash = self._suppressions.hasher.hash(delivery.recipient)
            blocked = await self._blocked(address_hash, meta.scope, meta.transactional)
            if blocked:
                await self._events.record(
                    Event(
                        EventType.SUPPRESSED,
                        address_hash,
                        meta.campaign,
                        message.queue_id,
                        detail={"scope": blocked},
                    )
                )
                await self._spool.finish(delivery)
                log.info(
                    "to=<%s>, status=suppressed (%s)",
                    delivery.recipient,
                    blocked,
                    extra={"queue_id": message.queue_id},
                )
                return
            content = prepared.personalise(
                delivery.recipient, self._urls, self._suppressions.hasher
            )
            started = self._clock()
            outcome = await self._transport.send(
                Outgoing(message.queue_id, message.mail_from, delivery.recipient, content)
            )
            await self._record(message, prepared, delivery, address_hash, outcome, started)

    async def _blocked(self, address_hash: str, scope: str, transactional: bool) -> str | None:
        """Checked again at send time: an opt-out may have arrived while the mail waited."""
        found = await self._suppressions.check_hash(address_hash, (GLOBAL, scope))
        if found is None:
            return None
        if transactional and found.reason not in TRANSACTIONAL_BLOCKERS:
            return None
        return found.scope

    async def _record(
        self,
        message: SpooledMessage,
        prepared: PreparedMessage,
        delivery: Delivery,
        address_hash: str,
        outcome: Outcome,
        started: float,
    ) -> None:
        meta = prepared.meta
        delay = self._clock() - started
        fields = {
            "to": delivery.recipient,
            "relay": self._transport.describe(),
            "status": str(outcome.status),
            "reply": outcome.reply,
            "attempt": delivery.attempts + 1,
        }
        detail: dict[str, object] = {"reply": outcome.reply, "attempt": delivery.attempts + 1}
        if outcome.status is Status.DEFERRED:
            retry_at = self._clock() + self._retry.delay(delivery.attempts)
            detail["retry_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(retry_at))
            await self._events.record(
                Event(
                    EventType.DEFERRED, address_hash, meta.campaign, message.queue_id, detail=detail
                )
            )
            await self._spool.defer(delivery, retry_at, outcome.reply)
        else:
            kind = EventType.DELIVERED if outcome.status is Status.DELIVERED else EventType.BOUNCED
            await self._events.record(
                Event(kind, address_hash, meta.campaign, message.queue_id, detail=detail)
            )
            await self._spool.finish(delivery)
        level = logging.WARNING if outcome.status is Status.BOUNCED else logging.INFO
        log.log(
            level,
            "to=<%s>, relay=%s, delay=%.2f, status=%s (%s)",
            delivery.recipient,
            self._transport.describe(),
            delay,
            outcome.status,
            outcome.reply,
            extra={"queue_id": message.queue_id, "fields": fields},
        )
