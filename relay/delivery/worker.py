"""The delivery worker: takes due deliveries from the spool, personalises, sends, records."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from suppression import (
    NO_WORD,
    STOPS_TRANSACTIONAL,
    Consent,
    InvalidAddress,
    StorageUnavailable,
    SuppressionStore,
)
from tracking import Event, EventStore, EventType, TrackingUrls

from ..feedback import CopyMarks, FeedbackMarks, FeedbackStore
from ..mime import headers_of, parse_headers
from ..pipeline import Arrival, Pipeline, PreparedMessage, UnsignedCopy
from ..spool import (
    DSN,
    WHOLE,
    Delivery,
    Partition,
    Record,
    Report,
    Spool,
    SpooledMessage,
    iso_utc,
)
from ..spool.state import Pause, paused_file, report_damage, write_pause
from .dsn import Failure, build_dsn, status_of
from .guard import OUT_OF_MEMORY, WorkGuard
from .outcomes import OutcomeForwarder, event_record
from .transport import Outcome, Outgoing, Status, Transport

if TYPE_CHECKING:
    from ..dkim.helper import SigningHelper

log = logging.getLogger("optout.delivery")

IDLE_POLL = 5.0
SPOOL_RETRY = 5.0
SPOOL_RETRY_MAX = 60.0
STORE_RETRY = 2.0  # seconds before a message is tried again while the shared store is away
REPORT_EVERY = 60.0
# Bytes of small messages loaded at once, so a flood of them cannot exhaust memory: each
# loaded message is held several times over while its copies are rewritten and sent.
LOADED_BYTES_BUDGET = 2 * 1024 * 1024
REMEMBERED_LIMIT = 100_000
# A message bigger than this is rewritten and signed in a thread, and only one such is
# loaded at a time; it never keeps small messages waiting, however long it takes.
OFFLOAD_BYTES = 256 * 1024
# A message that fails locally this many times is returned to its sender.
LOCAL_FAILURE_LIMIT = 5
# A message a delivery process died on this many times is held.
CRASH_LIMIT = 2
# Seconds a stopping worker waits for the messages in flight.
STOP_GRACE = 10.0
# A message that cannot even be read from a damaged spool is not tried again before this.
DAMAGED_COOLDOWN = 3600.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    initial_delay: float
    max_delay: float
    max_age: float

    def delay(self, attempts: int) -> float:
        """Exponential back-off with jitter, so deferred mail does not return in lockstep."""
        base = min(self.initial_delay * 2.0 ** min(attempts, 32), self.max_delay)
        return base * random.uniform(0.8, 1.0)


def is_damage(exc: BaseException) -> bool:
    """SQLite found its file damaged (not merely busy or full)."""
    return isinstance(exc, sqlite3.DatabaseError) and getattr(exc, "sqlite_errorcode", None) in (
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_NOTADB,
    )


def classify_bounce(outcome: Outcome, detail: dict[str, object]) -> None:
    """The downstream refused a copy: the bounced event says what kind of failure it is. A
    5.1.x (no such mailbox, RFC 3463) suppresses the address as a DSN would (the forwarder
    does it as it records the event: relay.delivery.outcomes); a policy refusal (5.7.x) is
    the sender's problem and suppresses nobody."""
    status = status_of(outcome.reply, "5.0.0")
    kind = "policy" if status[1:3] == ".7" else "soft" if status.startswith("4.") else "hard"
    detail.update(kind=kind, status=status, source="sync")


@dataclass(frozen=True, slots=True)
class Named:
    """What an event names a message by, read from its headers when the pipeline never
    finished with it (a crash, a local failure)."""

    campaign: str | None = None
    message_id: str | None = None
    from_domain: str | None = None  # the sending domain, for statistics per domain

    @classmethod
    def of(cls, content: bytes) -> Named:
        try:
            headers = parse_headers(headers_of(content))
        except Exception:  # whatever the headers are, this is only for the record
            return cls()
        campaign, message_id = (
            " ".join(str(headers.get(name, "")).split())
            for name in ("X-Optout-Campaign", "Message-ID")
        )
        return cls(campaign[:200] or None, message_id[:998] or None)


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
        guard: WorkGuard | None = None,
        marks: FeedbackMarks | None = None,
        signing: SigningHelper | None = None,
    ) -> None:
        """`guard`: bounds each message's work (relay.delivery.guard). `marks`: with
        feedback on, each copy's return path, mailto: and fields. `signing`: makes the
        copies' RSA signatures in a process of its own (None: here)."""
        self._signing = signing
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
        self._guard = guard or WorkGuard(None, cpu_limit=None, enforce=False)
        self._outcomes = OutcomeForwarder(spool, events, suppressions, partition)
        self._data_dir = spool.path.parent
        self._sends = asyncio.Semaphore(concurrency)
        self._max_messages = concurrency * 4
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._loaded_bytes = 0  # of small messages
        self._big_loaded = False
        self._remembered: OrderedDict[str, None] = OrderedDict()
        # Recipients the suppression store could not take (full disk): their first event
        # carries the address, and the forwarder remembers it.
        self._unremembered: set[str] = set()
        # Messages whose last pass failed locally: not picked up again before this time.
        self._cooldown: dict[str, float] = {}
        # Copies sent whose outcome could not be written yet: recorded, never sent again.
        # By (queue id, delivery id): a delivery id is an SQLite rowid, which the spool
        # hands out again once the row is gone; a queue id never repeats.
        self._unrecorded: dict[tuple[str, int], Outcome] = {}
        # Global back-off while the next hop does not answer, so a dead MTA is not hammered.
        self._failed_connects = 0
        self._paused_until = 0.0
        self._spool_trouble: str | None = None

    def notify(self) -> None:
        """A message was spooled: look for work now rather than at the next poll."""
        self._wakeup.set()

    async def run(self) -> None:
        await self._recover()
        self._guard.start_watchdog()
        reporter = asyncio.create_task(self._report_queue(), name="queue-report")
        forwarder = asyncio.create_task(self._outcomes.run(), name="outcome-forwarder")
        retry = SPOOL_RETRY
        try:
            while not self._stopping:
                self._wakeup.clear()
                try:
                    await self._start_due()
                    await self._sleep()
                except Exception as exc:
                    # The spool is unreadable for now (disk, lock, damage): mail stays there.
                    await self._spool_failed(exc, retry)
                    await asyncio.sleep(retry)
                    retry = min(retry * 2, SPOOL_RETRY_MAX)
                    continue
                retry = SPOOL_RETRY
                if self._spool_trouble is not None:
                    log.warning("spool readable again")
                    self._spool_trouble = None
        finally:
            reporter.cancel()
            await self._outcomes.stop(forwarder)

    async def stop(self) -> None:
        """Finish the copies being sent now; the rest stays spooled for the next start.
        A message's rewrite still running after STOP_GRACE is abandoned with the process."""
        self._stopping = True
        self._wakeup.set()
        if self._in_flight:
            _, running = await asyncio.wait(self._in_flight.values(), timeout=STOP_GRACE)
            if running:
                self._guard.abandon()
                await asyncio.gather(*running, return_exceptions=True)
        await self._transport.close()
        await asyncio.to_thread(self._guard.close)

    async def _spool_failed(self, exc: Exception, retry: float) -> None:
        """Said once per kind of trouble, not once per retry (a damaged page would
        otherwise fill the log with the same traceback for ever)."""
        if isinstance(exc, MemoryError):
            self._guard.die(OUT_OF_MEMORY)
        trouble = f"{type(exc).__name__}: {exc}"
        if trouble == self._spool_trouble:
            return
        self._spool_trouble = trouble
        if is_damage(exc):
            problem = f"{self._spool.path.name} is damaged ({exc}); delivery from it stops"
            await asyncio.to_thread(report_damage, self._data_dir, problem)
            log.error(
                "%s. Stop the relay and repair it (sqlite3 %s '.recover'); the queue is kept",
                problem,
                self._spool.path,
            )
            return
        log.error(
            "cannot read the spool (%s); trying again, every %.0f s at most",
            trouble,
            SPOOL_RETRY_MAX,
            exc_info=exc,
        )

    # ---- what a delivery process that died left behind ----

    async def _recover(self) -> None:
        """Charge the messages a dead delivery process was working on; hold repeat
        offenders. Sooner retries of the others wait their turn behind other mail."""
        casualties = await asyncio.to_thread(self._guard.recover)
        for casualty in casualties:
            queue_id = casualty.queue_id
            try:
                crashes = await self._spool.strike(queue_id, time.time() + self._retry.delay(0))
                if crashes >= CRASH_LIMIT:
                    await self._hold(
                        queue_id,
                        f"the delivery process died {crashes} times while working on it"
                        f" (last: {casualty.cause})",
                    )
                elif crashes:
                    log.warning(
                        "the delivery process died while working on this message (%s);"
                        " it is tried again later, alone",
                        casualty.cause,
                        extra={"queue_id": queue_id},
                    )
            except Exception:
                log.exception("cannot charge a crash to this message", extra={"queue_id": queue_id})

    async def _hold(self, queue_id: str, reason: str) -> None:
        """Set a message aside, with a `held` event per waiting recipient."""
        message = await self._spool.load(queue_id, float("inf"))
        if message is None:
            return
        named = Named.of(message.content) if message.kind != DSN else Named()
        records = [
            event_record(
                Event(
                    EventType.HELD,
                    self._hash_or_none(d.recipient),
                    named.campaign,
                    queue_id,
                    detail={"reason": reason},
                    message_id=named.message_id,
                ),
                d.recipient,  # perhaps never remembered: its rewrite never finished
            )
            for d in message.deliveries
            if message.kind != DSN
        ]
        if await self._spool.hold(queue_id, reason, records):
            self._outcomes.notify()
            log.error(
                "held: %s; `optout-relay queue release %s` tries it again",
                reason,
                queue_id,
                extra={"queue_id": queue_id, "fields": {"status": "held", "reason": reason}},
            )

    # ---- taking work from the spool ----

    async def _start_due(self) -> None:
        now = time.time()
        # Refill once half the loaded messages are done, not after each one: a due-query
        # scans the waiting deliveries, and a backlog makes that cost grow with it.
        if len(self._in_flight) > self._max_messages // 2:
            return
        room = self._max_messages - len(self._in_flight)
        if now < self._paused_until:
            return
        if self._loaded_bytes > LOADED_BYTES_BUDGET and self._big_loaded:
            return
        self._cooldown = {q: until for q, until in self._cooldown.items() if until > now}
        busy = self._in_flight.keys() | self._cooldown.keys()
        for queue_id, size in await self._spool.due(now, busy, room, self._partition):
            big = size > OFFLOAD_BYTES
            if big:
                if self._big_loaded:
                    continue
                self._big_loaded = True
            else:
                if self._loaded_bytes > LOADED_BYTES_BUDGET:
                    continue
                self._loaded_bytes += size
            task = asyncio.create_task(self._deliver(queue_id), name=f"deliver-{queue_id}")
            self._in_flight[queue_id] = task
            task.add_done_callback(functools.partial(self._done, queue_id, size, big))

    def _done(self, queue_id: str, size: int, big: bool, _task: asyncio.Task[None]) -> None:
        self._in_flight.pop(queue_id, None)
        if big:
            self._big_loaded = False
        else:
            self._loaded_bytes -= size
        self._wakeup.set()

    async def _sleep(self) -> None:
        now = time.time()
        timeout = IDLE_POLL
        if now < self._paused_until:
            timeout = self._paused_until - now  # nothing is sent before then anyway
        elif not self._in_flight:
            next_at = await self._spool.next_attempt_at(self._partition)
            if self._cooldown:
                # What is due now was started, unless it is cooling down: wake when the
                # first cooldown ends, or at the next attempt after now if that is sooner.
                cooled = min(self._cooldown.values())
                next_at = cooled if next_at is None or next_at <= now else min(next_at, cooled)
            if next_at is not None:
                timeout = min(max(next_at - now, 0.01), IDLE_POLL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), max(timeout, 0.01))

    async def _report_queue(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY)
            try:
                await self.report_queue()
            except Exception:  # noqa: S112 - the main loop says what is wrong with the spool
                continue

    async def report_queue(self) -> int:
        """Log how many messages wait, counted in the spool now: another process (the
        front door) adds mail, so a tally kept here would drift (even below zero)."""
        await self._spool.recount()
        waiting = self._spool.waiting
        if waiting:
            age = await self._spool.oldest_age(time.time()) or 0.0
            log.info(
                "queue: %d messages waiting, oldest %.0f s, %d in flight",
                waiting,
                age,
                len(self._in_flight),
                extra={"fields": {"queue_depth": waiting, "oldest_age": age}},
            )
        return waiting

    # ---- one message ----

    async def _deliver(self, queue_id: str) -> None:
        message = None
        try:
            message = await self._spool.load(queue_id, time.time())
            if message is None or not message.deliveries:
                return
            if not message.intact:
                await self._hold(
                    queue_id,
                    "its stored copy is damaged (its SHA-256 digest differs from the one"
                    " taken when it was accepted); nothing was sent",
                )
                return
            if message.kind == DSN:
                await asyncio.gather(*(self._send_report(message, d) for d in message.deliveries))
                return
            prepared = await self._guard.run(
                queue_id,
                functools.partial(
                    self._pipeline.prepare, arrival=Arrival(message.client, message.received_ts)
                ),
                queue_id,
                message.mail_from,
                message.content,
                message.account,
                offload=len(message.content) > OFFLOAD_BYTES,
                alone=message.crashes > 0,
            )
            if prepared.meta.decisions:
                log.info(
                    "pipeline: %s",
                    "; ".join(prepared.meta.decisions),
                    extra={"queue_id": queue_id, "fields": {"decisions": prepared.meta.decisions}},
                )
            if prepared.meta.warnings and not any(d.attempts for d in message.deliveries):
                await self._spool.record(
                    queue_id,
                    [
                        event_record(
                            Event(
                                EventType.WARNING,
                                None,
                                prepared.meta.campaign,
                                queue_id,
                                detail={"warning": warning},
                                message_id=prepared.meta.message_id,
                            )
                        )
                        for warning in prepared.meta.warnings
                    ],
                )
                self._outcomes.notify()
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
        except Exception as exc:
            if isinstance(exc, MemoryError):
                self._guard.die(OUT_OF_MEMORY)
            if message is None and is_damage(exc):
                await self._unreadable(queue_id, exc)
                return
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
        named = self._named(prepared)
        for delivery in message.deliveries:
            if (message.queue_id, delivery.id) in self._unrecorded:
                continue  # sent before: only its outcome is left to write
            address_hash = self._hash_or_none(delivery.recipient)
            await self._record(message, named, delivery, address_hash, outcome, time.time())

    @staticmethod
    def _named(prepared: PreparedMessage) -> Named:
        meta = prepared.meta
        return Named(meta.campaign, meta.message_id, meta.from_domain)

    async def _unreadable(self, queue_id: str, exc: BaseException) -> None:
        """The message cannot be read from a damaged spool: hold it if the spool lets us
        say so, and stop trying it for a long while either way."""
        self._cooldown[queue_id] = time.time() + DAMAGED_COOLDOWN
        problem = f"{self._spool.path.name} is damaged: message {queue_id} cannot be read ({exc})"
        await asyncio.to_thread(report_damage, self._data_dir, problem)
        log.error("%s", problem, extra={"queue_id": queue_id})
        with contextlib.suppress(Exception):
            await self._spool.hold(queue_id, f"cannot be read from the spool: {exc}")

    async def _remember(self, recipients: Iterable[str]) -> None:
        """Record hash -> address for token actions; skip those this process already did.
        A store that cannot be written does not stop delivery: the events say it later."""
        # An address the suppression list cannot read has no key: its copy fails locally.
        new = [r for r in recipients if r not in self._remembered and self._hash_or_none(r)]
        if not new:
            return
        try:
            await self._suppressions.remember(new)
        except Exception as exc:
            if isinstance(exc, MemoryError):
                raise
            self._outcomes.report_failure(exc)
            self._unremembered.update(new)
            return
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
        named = Named.of(message.content) if message.kind != DSN else Named()
        for delivery in waiting:
            if (message.queue_id, delivery.id) in self._unrecorded:
                continue  # sent: its outcome is written on the next pass, never a bounce
            address_hash = None if message.kind == DSN else self._hash_or_none(delivery.recipient)
            try:
                if too_old or delivery.attempts + 1 >= LOCAL_FAILURE_LIMIT:
                    outcome = Outcome(
                        Status.BOUNCED, "554 5.3.0 the relay could not process this message"
                    )
                    await self._record(
                        message, named, delivery, address_hash, outcome, time.time(), local=True
                    )
                else:
                    retry_at = time.time() + self._retry.delay(delivery.attempts)
                    await self._spool.defer(delivery, retry_at, "local error in delivery")
            except Exception:
                log.exception("cannot defer", extra={"queue_id": message.queue_id})
                return

    def _hash_or_none(self, address: str) -> str | None:
        """The recipient's key, or None for an address the suppression list cannot read
        (then its event names no one, but is still counted for its campaign)."""
        try:
            return self._suppressions.hasher.hash(address)
        except InvalidAddress:
            return None

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
        named = self._named(prepared)
        address_hash = self._suppressions.hasher.hash(delivery.recipient)
        async with self._sends:
            if self._paused():
                return
            unrecorded = self._unrecorded.get((message.queue_id, delivery.id))
            if unrecorded is not None:
                # Already sent; only writing its outcome failed. Never send it twice.
                await self._record(message, named, delivery, address_hash, unrecorded, time.time())
                del self._unrecorded[message.queue_id, delivery.id]
                return
            blocked, consent = await self._blocked(address_hash, prepared)
            if blocked:
                record = self._event_record(
                    EventType.SUPPRESSED, address_hash, named, message, delivery, {"scope": blocked}
                )
                await self._spool.finish(delivery, record=record)
                self._outcomes.notify()
                log.info(
                    "to=<%s>, status=suppressed (%s)",
                    delivery.recipient,
                    blocked,
                    extra={"queue_id": message.queue_id},
                )
                return
            started = time.time()
            outcome = await self._send_copy(
                message, prepared, delivery, address_hash, marks, consent
            )
            self._note_reachability(outcome)
            outcome = self._expire_if_too_old(message, outcome)
        # The slot goes to the next copy while this one's outcome is committed: a commit
        # waits for an fsync, and holding the slot meanwhile left the next hop idle.
        try:
            await self._record(message, named, delivery, address_hash, outcome, started)
        except Exception:
            if outcome.status is not Status.DEFERRED:
                self._unrecorded[message.queue_id, delivery.id] = outcome
            raise

    async def _send_copy(
        self,
        message: SpooledMessage,
        prepared: PreparedMessage,
        delivery: Delivery,
        address_hash: str,
        marks: CopyMarks | None,
        consent: Consent,
    ) -> Outcome:
        """Render the recipient's copy for what the next hop takes, and send it. A copy
        rendered 8-bit for a server that turns out to lack 8BITMIME is rendered 7-bit and
        sent again at once."""
        eight_bit = self._transport.eight_bit_ok
        while True:
            unsigned = await self._guard.run(
                message.queue_id,
                functools.partial(
                    prepared.personalise_unsigned,
                    eight_bit_ok=eight_bit,
                    address_hash=address_hash,
                    marks=marks,
                    modes=prepared.modes_for(consent),
                    smtp_form=True,
                ),
                delivery.recipient,
                self._urls,
                self._suppressions.hasher,
                offload=len(message.content) > OFFLOAD_BYTES,
                alone=message.crashes > 0,
            )
            content = await self._signed(unsigned)
            outcome = await self._transport.send(
                Outgoing(
                    message.queue_id,
                    message.mail_from if marks is None else marks.return_path,
                    delivery.recipient,
                    content,
                    seven_bit=not eight_bit,
                    smtp_form=True,
                )
            )
            del content
            if not (outcome.needs_seven_bit and eight_bit):
                return outcome
            eight_bit = False

    async def _signed(self, copy: UnsignedCopy) -> bytes:
        """The copy with its DKIM signatures, made by the signing helper when there is one
        (relay.dkim.helper), while this loop goes on with other copies."""
        if copy.fields is None:
            return copy.content
        if self._signing is None:
            return copy.finish()
        return await self._signing.finish(copy.fields) + copy.content

    async def _send_report(self, message: SpooledMessage, delivery: Delivery) -> None:
        """Our own DSNs go out as they are: no decoration, no suppression, no DSN of a DSN."""
        if self._paused():
            return
        async with self._sends:
            started = time.time()
            outcome = await self._transport.send(
                Outgoing(message.queue_id, "", delivery.recipient, message.content, seven_bit=True)
            )
            self._note_reachability(outcome)
            outcome = self._expire_if_too_old(message, outcome)
            await self._record(message, Named(), delivery, None, outcome, started)

    def _note_reachability(self, outcome: Outcome) -> None:
        if outcome.reached:
            if self._failed_connects:
                self._failed_connects = 0
                self._paused_until = 0.0
                self._tell_pause(None)
            return
        self._failed_connects += 1
        pause = self._retry.delay(self._failed_connects - 1)
        self._paused_until = max(self._paused_until, time.time() + pause)
        self._tell_pause(Pause(self._paused_until, outcome.reply))
        log.warning(
            "%s unreachable; pausing deliveries for %.1f s", self._transport.describe(), pause
        )

    def _tell_pause(self, pause: Pause | None) -> None:
        """Say so in the data dir, for `optout-relay queue retry` and `queue list`."""
        path = paused_file(self._data_dir, self._partition.index)
        task = asyncio.create_task(asyncio.to_thread(write_pause, path, pause))
        task.add_done_callback(lambda t: t.exception())  # write_pause never raises

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

    def _event_record(
        self,
        kind: EventType,
        address_hash: str | None,
        named: Named,
        message: SpooledMessage,
        delivery: Delivery,
        detail: dict[str, object],
    ) -> Record | None:
        if message.kind == DSN:
            return None  # our own reports are not events about anyone
        recipient = delivery.recipient if delivery.recipient in self._unremembered else None
        self._unremembered.discard(delivery.recipient)
        event = Event(
            kind,
            address_hash,
            named.campaign,
            message.queue_id,
            detail=detail,
            message_id=named.message_id,
        )
        return event_record(event, recipient)

    async def _record(
        self,
        message: SpooledMessage,
        named: Named,
        delivery: Delivery,
        address_hash: str | None,
        outcome: Outcome,
        started: float,
        *,
        local: bool = False,
    ) -> None:
        """The outcome into the spool: the delivery deferred or finished, its event and the
        sender's DSN with it, in one transaction. `local`: the relay gave up on it, the next
        hop never said anything about the recipient."""
        attempt = delivery.attempts + 1
        detail: dict[str, object] = {"reply": outcome.reply, "attempt": attempt}
        if named.from_domain:
            # The sending domain, for statistics per domain (complaint rates are per domain).
            detail["from_domain"] = named.from_domain
        if outcome.status is Status.DEFERRED:
            retry_at = time.time() + self._retry.delay(delivery.attempts)
            detail["retry_at"] = iso_utc(retry_at)
            record = self._event_record(
                EventType.DEFERRED, address_hash, named, message, delivery, detail
            )
            await self._spool.defer(delivery, retry_at, outcome.reply, record=record)
        else:
            kind = EventType.DELIVERED if outcome.status is Status.DELIVERED else EventType.BOUNCED
            if outcome.status is Status.BOUNCED and message.kind != DSN and not local:
                classify_bounce(outcome, detail)
            record = self._event_record(kind, address_hash, named, message, delivery, detail)
            report = self._report(message, delivery, outcome)
            report_id = await self._spool.finish(delivery, record=record, report=report)
            if report_id is not None:
                log.info(
                    "sender non-delivery notification: %s",
                    report_id,
                    extra={"queue_id": message.queue_id},
                )
                self.notify()
        if record is not None:
            self._outcomes.notify()
        self._log_attempt(message, delivery, outcome, started, attempt)

    def _report(
        self, message: SpooledMessage, delivery: Delivery, outcome: Outcome
    ) -> Report | None:
        if outcome.status is not Status.BOUNCED:
            return None
        if message.kind == DSN or not message.mail_from:
            return None  # never a DSN about a DSN or to the null sender (RFC 3464 §2, 5321 §4.5.5)
        reply = outcome.reply
        status = status_of(reply, "4.4.7" if reply.startswith("4.4.7") else "5.0.0")
        content = build_dsn(
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
        return Report(message.mail_from, content)

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
