"""The delivery worker: takes due deliveries from the spool, personalises, sends, records."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from suppression import (
    NO_WORD,
    STOPS_TRANSACTIONAL,
    Consent,
    Reason,
    StorageUnavailable,
    SuppressionStore,
)
from tracking import Event, EventStore, EventType, TrackingUrls

from ..feedback import CopyMarks, FeedbackMarks, FeedbackStore
from ..pipeline import Arrival, Pipeline, PreparedMessage
from ..spool import DSN, WHOLE, Delivery, Partition, Spool, SpooledMessage, iso_utc
from .dsn import Failure, build_dsn, status_of
from .transport import Outcome, Outgoing, Status, Transport

log = logging.getLogger("optout.delivery")
T = TypeVar("T")

IDLE_POLL = 5.0
SPOOL_RETRY = 5.0
STORE_RETRY = 2.0  # seconds before a message is tried again while the shared store is away
REPORT_EVERY = 60.0
# Spooled bytes loaded at once, so a flood of big messages cannot exhaust memory: each
# loaded message is held several times over while its copies are rewritten and sent.
LOADED_BYTES_BUDGET = 2 * 1024 * 1024
REMEMBERED_LIMIT = 100_000
# Rewriting and signing a message bigger than this runs in a thread.
OFFLOAD_BYTES = 256 * 1024
# A message that fails locally this many times is returned to its sender.
LOCAL_FAILURE_LIMIT = 5


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    initial_delay: float
    max_delay: float
    max_age: float

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
        hostname: str,
        partition: Partition = WHOLE,
        marks: FeedbackMarks | None = None,
    ) -> None:
        """`marks`: with feedback on, each copy's return path, mailto: and fields."""
        self._partition = partition
        self._marks = marks
        self._spool = spool
        self._transport = transport
        self._pipeline = pipeline
        self._suppressions = suppressions
        self._events = events
        self._urls = urls
        self._retry = retry
        self._hostname = hostname
        self._sends = asyncio.Semaphore(concurrency)
        self._max_messages = concurrency * 4
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._loaded_bytes = 0
        self._remembered: OrderedDict[str, None] = OrderedDict()
        # Messages whose last pass failed locally: not picked up again before this time.
        self._cooldown: dict[str, float] = {}
        # Copies sent whose outcome could not be written yet: recorded, never sent again.
        # By (queue id, delivery id): a delivery id is an SQLite rowid, which the spool
        # hands out again once the row is gone; a queue id never repeats.
        self._unrecorded: dict[tuple[str, int], tuple[Outcome, str | None, str | None]] = {}
        # Global back-off while the next hop does not answer, so a dead MTA is not hammered.
        self._failed_connects = 0
        self._paused_until = 0.0

    def notify(self) -> None:
        """A message was spooled: look for work now rather than at the next poll."""
        self._wakeup.set()

    async def run(self) -> None:
        reporter = asyncio.create_task(self._report_queue(), name="queue-report")
        try:
            while not self._stopping:
                self._wakeup.clear()
                try:
                    await self._start_due()
                    await self._sleep()
                except Exception:
                    # The spool is unreadable for now (disk, lock): mail stays there.
                    log.exception("cannot read the spool; retrying in %.0f s", SPOOL_RETRY)
                    await asyncio.sleep(SPOOL_RETRY)
        finally:
            reporter.cancel()

    async def stop(self) -> None:
        """Finish the copies being sent now; the rest stays spooled for the next start."""
        self._stopping = True
        self._wakeup.set()
        if self._in_flight:
            await asyncio.gather(*self._in_flight.values(), return_exceptions=True)
        await self._transport.close()

    async def _start_due(self) -> None:
        now = time.time()
        # Refill once half the loaded messages are done, not after each one: a due-query
        # scans the waiting deliveries, and a backlog makes that cost grow with it.
        if len(self._in_flight) > self._max_messages // 2:
            return
        room = self._max_messages - len(self._in_flight)
        if now < self._paused_until or self._loaded_bytes > LOADED_BYTES_BUDGET:
            return
        self._cooldown = {q: until for q, until in self._cooldown.items() if until > now}
        busy = self._in_flight.keys() | self._cooldown.keys()
        for queue_id, size in await self._spool.due(now, busy, room, self._partition):
            if self._loaded_bytes > LOADED_BYTES_BUDGET:
                break
            self._loaded_bytes += size
            task = asyncio.create_task(self._deliver(queue_id), name=f"deliver-{queue_id}")
            self._in_flight[queue_id] = task
            task.add_done_callback(functools.partial(self._done, queue_id, size))

    def _done(self, queue_id: str, size: int, _task: asyncio.Task[None]) -> None:
        self._in_flight.pop(queue_id, None)
        self._loaded_bytes -= size
        self._wakeup.set()

    async def _sleep(self) -> None:
        now = time.time()
        timeout = IDLE_POLL
        if now < self._paused_until:
            timeout = self._paused_until - now  # nothing is sent before then anyway
        elif not self._in_flight and not self._cooldown:
            next_at = await self._spool.next_attempt_at(self._partition)
            if next_at is not None:
                timeout = min(max(next_at - now, 0.01), IDLE_POLL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), max(timeout, 0.01))

    async def _report_queue(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY)
            if self._spool.waiting:
                age = await self._spool.oldest_age(time.time()) or 0.0
                log.info(
                    "queue: %d messages waiting, oldest %.0f s, %d in flight",
                    self._spool.waiting,
                    age,
                    len(self._in_flight),
                    extra={"fields": {"queue_depth": self._spool.waiting, "oldest_age": age}},
                )

    async def _deliver(self, queue_id: str) -> None:
        message = None
        try:
            message = await self._spool.load(queue_id, time.time())
            if message is None or not message.deliveries:
                return
            if message.kind == DSN:
                await asyncio.gather(*(self._send_report(message, d) for d in message.deliveries))
                return
            prepared = await self._offload_if_big(
                message,
                functools.partial(
                    self._pipeline.prepare, arrival=Arrival(message.client, message.received_ts)
                ),
                queue_id,
                message.mail_from,
                message.content,
                message.account,
            )
            if prepared.meta.decisions:
                log.info(
                    "pipeline: %s",
                    "; ".join(prepared.meta.decisions),
                    extra={"queue_id": queue_id, "fields": {"decisions": prepared.meta.decisions}},
                )
            if prepared.meta.warnings and not any(d.attempts for d in message.deliveries):
                await self._events.record(
                    *(
                        Event(
                            EventType.WARNING,
                            None,
                            prepared.meta.campaign,
                            queue_id,
                            detail={"warning": warning},
                            message_id=prepared.meta.message_id,
                        )
                        for warning in prepared.meta.warnings
                    )
                )
            if prepared.refusal is not None:
                await self._refuse(message, prepared)
                return
            await self._remember(d.recipient for d in message.deliveries)
            marks = await self._mark_copies(message, prepared)
            results = await asyncio.gather(
                *(
                    self._deliver_one(message, prepared, d, marks.get(d.id))
                    for d in message.deliveries
                ),
                return_exceptions=True,
            )
            # Every copy has finished its attempt before any back-off decision is made.
            failures = [r for r in results if isinstance(r, BaseException)]
            if failures:
                unavailable = [f for f in failures if isinstance(f, StorageUnavailable)]
                raise (unavailable or failures)[0]
        except StorageUnavailable:
            # The shared store is away: nothing is wrong with the message. It waits in the
            # spool, no attempt counted (an outage never bounces mail), and is tried again
            # soon; the store said why, once.
            self._cooldown[queue_id] = time.time() + STORE_RETRY
        except Exception:
            # The spool still holds everything not finished; keep the message out of the
            # next passes for a while so a failing disk or a bad message is not a hot loop.
            log.exception("delivery pass failed", extra={"queue_id": queue_id})
            attempts = max((d.attempts for d in message.deliveries), default=0) if message else 0
            self._cooldown[queue_id] = time.time() + self._retry.delay(attempts)
            if message is not None:
                await self._back_off(message)

    async def _refuse(self, message: SpooledMessage, prepared: PreparedMessage) -> None:
        """The pipeline will not let this message out (PreparedMessage.refusal): each waiting
        copy bounces with its reason (a bounced event), and the sender gets a DSN saying it."""
        assert prepared.refusal is not None
        outcome = Outcome(Status.BOUNCED, prepared.refusal)
        for delivery in message.deliveries:
            if (message.queue_id, delivery.id) in self._unrecorded:
                continue  # sent before: only its outcome is left to write
            address_hash = self._suppressions.hasher.hash(delivery.recipient)
            await self._record(
                message, prepared.meta.campaign, delivery, address_hash, outcome, time.time()
            )

    async def _offload_if_big(
        self, message: SpooledMessage, work: Callable[..., T], *args: Any
    ) -> T:
        """CPU work on a big message runs in a thread, so the loop keeps serving others."""
        if len(message.content) > OFFLOAD_BYTES:
            return await asyncio.to_thread(work, *args)
        return work(*args)

    async def _remember(self, recipients: Iterable[str]) -> None:
        """Record hash -> address for token actions; skip those this process already did."""
        new = [r for r in recipients if r not in self._remembered]
        if not new:
            return
        await self._suppressions.remember(new)
        for recipient in new:
            self._remembered[recipient] = None
        while len(self._remembered) > REMEMBERED_LIMIT:
            self._remembered.popitem(last=False)

    async def _back_off(self, message: SpooledMessage) -> None:
        """After a local failure: retry later, or fail for good (with a DSN) once it has
        failed too often or waited too long, so no accepted message waits forever."""
        too_old = time.time() - message.received_ts >= self._retry.max_age
        try:
            # Only what is still waiting: copies delivered in this pass are done.
            current = await self._spool.load(message.queue_id, float("inf"))
        except Exception:
            log.exception("cannot read the spool", extra={"queue_id": message.queue_id})
            return
        waiting = () if current is None else current.deliveries
        for delivery in waiting:
            if (message.queue_id, delivery.id) in self._unrecorded:
                continue  # sent: its outcome is written on the next pass, never a bounce
            try:
                if too_old or delivery.attempts + 1 >= LOCAL_FAILURE_LIMIT:
                    outcome = Outcome(
                        Status.BOUNCED, "554 5.3.0 the relay could not process this message"
                    )
                    await self._record(message, None, delivery, None, outcome, time.time())
                else:
                    retry_at = time.time() + self._retry.delay(delivery.attempts)
                    await self._spool.defer(delivery, retry_at, "local error in delivery")
            except Exception:
                log.exception("cannot defer", extra={"queue_id": message.queue_id})
                return

    def _paused(self) -> bool:
        return self._stopping or time.time() < self._paused_until

    async def _mark_copies(
        self, message: SpooledMessage, prepared: PreparedMessage
    ) -> dict[int, CopyMarks]:
        """With feedback on, each copy's marks, recorded before any copy goes out (a bounce
        may come back before anything else is written). Mail from the null sender keeps it,
        and so does automatic mail: what comes back to an auto-reply is not its feedback."""
        if self._marks is None or not message.mail_from or prepared.meta.automatic:
            return {}
        meta = prepared.meta
        marks = {}
        for delivery in message.deliveries:
            made = self._marks.for_copy(
                queue_id=message.queue_id,
                address_hash=self._suppressions.hasher.hash(delivery.recipient),
                recipient=delivery.recipient,
                scope=meta.scope,
                campaign=meta.campaign,
                message_id=meta.message_id,
                account=message.account,
                signing_domain=meta.signer.domain if meta.signer is not None else None,
                sender_domain=meta.from_domain,
                sender_fields=meta.sender_feedback_fields,
            )
            if made is not None:
                marks[delivery.id] = made
        if marks:
            await FeedbackStore(self._suppressions.database).record_copies(
                [m.record for m in marks.values()]
            )
        return marks

    async def _deliver_one(
        self,
        message: SpooledMessage,
        prepared: PreparedMessage,
        delivery: Delivery,
        marks: CopyMarks | None = None,
    ) -> None:
        if self._paused():
            return  # left due in the spool: picked up again after the pause
        async with self._sends:
            if self._paused():
                return
            meta = prepared.meta
            address_hash = self._suppressions.hasher.hash(delivery.recipient)
            unrecorded = self._unrecorded.get((message.queue_id, delivery.id))
            if unrecorded is not None:
                # Already sent; only writing its outcome failed. Never send it twice.
                outcome, campaign, _ = unrecorded
                await self._record(
                    message,
                    campaign,
                    delivery,
                    address_hash,
                    outcome,
                    time.time(),
                    message_id=meta.message_id,
                    from_domain=meta.from_domain,
                )
                del self._unrecorded[message.queue_id, delivery.id]
                return
            blocked, consent = await self._blocked(address_hash, prepared)
            if blocked:
                await self._events.record(
                    Event(
                        EventType.SUPPRESSED,
                        address_hash,
                        meta.campaign,
                        message.queue_id,
                        detail={"scope": blocked},
                        message_id=meta.message_id,
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
            content = await self._offload_if_big(
                message,
                functools.partial(
                    prepared.personalise,
                    eight_bit_ok=self._transport.eight_bit_ok,
                    address_hash=address_hash,
                    marks=marks,
                    modes=prepared.modes_for(consent),
                ),
                delivery.recipient,
                self._urls,
                self._suppressions.hasher,
            )
            started = time.time()
            outcome = await self._transport.send(
                Outgoing(
                    message.queue_id,
                    message.mail_from if marks is None else marks.return_path,
                    delivery.recipient,
                    content,
                )
            )
            del content
            self._note_reachability(outcome)
            outcome = self._expire_if_too_old(message, outcome)
            try:
                await self._record(
                    message,
                    meta.campaign,
                    delivery,
                    address_hash,
                    outcome,
                    started,
                    message_id=meta.message_id,
                    from_domain=meta.from_domain,
                )
            except Exception:
                if outcome.status is not Status.DEFERRED:
                    key = (message.queue_id, delivery.id)
                    self._unrecorded[key] = (outcome, meta.campaign, address_hash)
                raise

    async def _send_report(self, message: SpooledMessage, delivery: Delivery) -> None:
        """Our own DSNs go out as they are: no decoration, no suppression, no DSN of a DSN."""
        if self._paused():
            return
        async with self._sends:
            started = time.time()
            outcome = await self._transport.send(
                Outgoing(message.queue_id, "", delivery.recipient, message.content)
            )
            self._note_reachability(outcome)
            outcome = self._expire_if_too_old(message, outcome)
            await self._record(message, None, delivery, None, outcome, started)

    def _note_reachability(self, outcome: Outcome) -> None:
        if outcome.reached:
            self._failed_connects = 0
            return
        self._failed_connects += 1
        pause = self._retry.delay(self._failed_connects - 1)
        self._paused_until = max(self._paused_until, time.time() + pause)
        log.warning(
            "%s unreachable; pausing deliveries for %.1f s", self._transport.describe(), pause
        )

    def _expire_if_too_old(self, message: SpooledMessage, outcome: Outcome) -> Outcome:
        if outcome.status is not Status.DEFERRED:
            return outcome
        age = time.time() - message.received_ts
        if age < self._retry.max_age:
            return outcome
        return Outcome(
            Status.BOUNCED,
            f"4.4.7 message expired after {age / 86400:.1f} days in the queue;"
            f" last reply: {outcome.reply}",
            outcome.reached,
        )

    async def _blocked(
        self, address_hash: str, prepared: PreparedMessage
    ) -> tuple[str | None, Consent]:
        """Checked again at send time: an opt-out may have arrived while the mail waited.
        With it, in the same read, the recipient's word on tracking when their copy may
        measure them individually (tracking.modes)."""
        scopes = prepared.scopes_to_check
        consent = NO_WORD
        if prepared.meta.modes.may_name:
            found, consent = await self._suppressions.check_hash_and_consent(address_hash, scopes)
        else:
            found = await self._suppressions.check_hash(address_hash, scopes)
        if found is None:
            return None, consent
        if prepared.meta.transactional and found.reason not in STOPS_TRANSACTIONAL:
            return None, consent
        return found.scope, consent

    async def _record(
        self,
        message: SpooledMessage,
        campaign: str | None,
        delivery: Delivery,
        address_hash: str | None,
        outcome: Outcome,
        started: float,
        *,
        message_id: str | None = None,
        from_domain: str | None = None,
    ) -> None:
        attempt = delivery.attempts + 1
        detail: dict[str, object] = {"reply": outcome.reply, "attempt": attempt}
        if from_domain:
            # The sending domain, for statistics per domain (complaint rates are per domain).
            detail["from_domain"] = from_domain
        if outcome.status is Status.DEFERRED:
            retry_at = time.time() + self._retry.delay(delivery.attempts)
            detail["retry_at"] = iso_utc(retry_at)
            if address_hash is not None:
                await self._events.record(
                    Event(
                        EventType.DEFERRED,
                        address_hash,
                        campaign,
                        message.queue_id,
                        detail=detail,
                        message_id=message_id,
                    )
                )
            await self._spool.defer(delivery, retry_at, outcome.reply)
        else:
            kind = EventType.DELIVERED if outcome.status is Status.DELIVERED else EventType.BOUNCED
            if outcome.status is Status.BOUNCED:
                await self._notify_sender(message, delivery, outcome)
                if address_hash is not None and message.kind != DSN:
                    await self._synchronous_bounce(address_hash, outcome, detail)
            # Two databases, two writer threads: commit both at once. A crash between the
            # two costs a resend or one event, never a message.
            await asyncio.gather(
                self._spool.finish(delivery),
                self._events.record(
                    Event(
                        kind,
                        address_hash,
                        campaign,
                        message.queue_id,
                        detail=detail,
                        message_id=message_id,
                    )
                )
                if address_hash is not None
                else asyncio.sleep(0),
            )
        self._log_attempt(message, delivery, outcome, started, attempt)

    async def _synchronous_bounce(
        self, address_hash: str, outcome: Outcome, detail: dict[str, object]
    ) -> None:
        """The downstream refused a copy: the bounced event says what kind of failure it is;
        a 5.1.x (no such mailbox, RFC 3463) suppresses the address as a DSN would. A policy
        refusal (5.7.x) is the sender's problem and suppresses nobody."""
        status = status_of(outcome.reply, "5.0.0")
        kind = "policy" if status[1:3] == ".7" else "soft" if status.startswith("4.") else "hard"
        detail.update(kind=kind, status=status, source="sync")
        if status.startswith("5.1."):
            proof = {"kind": "hard", "status": status, "source": "sync", "reply": outcome.reply}
            await self._suppressions.add_hash(
                address_hash,
                reason=Reason.HARD_BOUNCE,
                source="bounce:sync",
                detail=proof,
            )

    async def _notify_sender(
        self, message: SpooledMessage, delivery: Delivery, outcome: Outcome
    ) -> None:
        if message.kind == DSN or not message.mail_from:
            return  # never a DSN about a DSN or to the null sender (RFC 3464 §2, 5321 §4.5.5)
        reply = outcome.reply
        status = status_of(reply, "4.4.7" if reply.startswith("4.4.7") else "5.0.0")
        report = build_dsn(
            reporting_mta=self._hostname,
            original_sender=message.mail_from,
            original=message.content,
            arrival=datetime.fromtimestamp(message.received_ts, UTC),
            failure=Failure(
                delivery.recipient,
                reply,
                status,
                self._transport.describe() if outcome.reached else None,
            ),
            queue_id=message.queue_id,
        )
        dsn_id = await self._spool.accept("", [message.mail_from], report, "local", kind=DSN)
        log.info(
            "sender non-delivery notification: %s", dsn_id, extra={"queue_id": message.queue_id}
        )
        self.notify()

    def _log_attempt(
        self,
        message: SpooledMessage,
        delivery: Delivery,
        outcome: Outcome,
        started: float,
        attempt: int,
    ) -> None:
        delay = time.time() - started
        fields = {
            "to": delivery.recipient,
            "relay": self._transport.describe(),
            "status": str(outcome.status),
            "reply": outcome.reply,
            "attempt": attempt,
        }
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
