"""The delivery worker on its own: a `DeliveryWorker` over a real spool, suppression list and
event log, sending over the real SMTP transport to a capture server. No relay around it: no
front door, no delivery process, no config file."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from relay.delivery import DeliveryWorker, RetryPolicy
from relay.delivery.transport import SmtpTransport
from relay.pipeline import Pipeline
from relay.settings import Downstream
from relay.spool import Spool
from suppression import MIGRATIONS as SUPPRESSION_MIGRATIONS
from suppression import AddressHasher, Database, Reason, SuppressionStore
from tests.helpers import SIGNING_KEYS, CaptureServer, StartDownstream, newsletter, wait_for
from tracking.events import MIGRATIONS as EVENT_MIGRATIONS
from tracking.events import EventStore
from tracking.signing import Signer
from tracking.tokens import TrackingUrls

SENDER = "news@shop.example"
PUBLIC_URL = "https://mail.shop.example"


class Stores:
    def __init__(self, spool: Spool, suppressions: SuppressionStore, events: EventStore) -> None:
        self.spool = spool
        self.suppressions = suppressions
        self.events = events

    async def events_of(self, kind: str) -> list[dict[str, Any]]:
        return [e async for e in self.events.export() if e["type"] == kind]


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[Stores]:
    spool = await Spool.open(tmp_path / "spool.db")
    database = await Database.open(
        tmp_path / "optout.db", SUPPRESSION_MIGRATIONS + EVENT_MIGRATIONS
    )
    hasher = AddressHasher(b"worker-test-key-0123456789abcdef")
    yield Stores(spool, SuppressionStore(database, hasher), EventStore(database))
    await database.close()
    await spool.close()


RunWorker = Callable[[CaptureServer], Awaitable[DeliveryWorker]]


@pytest.fixture
async def run_worker(stores: Stores) -> AsyncIterator[RunWorker]:
    """Run a worker delivering to the given capture server until the test ends."""
    running: list[tuple[DeliveryWorker, asyncio.Task[None]]] = []

    async def run(downstream: CaptureServer) -> DeliveryWorker:
        worker = worker_for(
            stores, downstream, RetryPolicy(initial_delay=60, max_delay=3600, max_age=86400)
        )
        running.append((worker, asyncio.create_task(worker.run())))
        return worker

    yield run
    for worker, task in running:
        await worker.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def spool_message(stores: Stores, *recipients: str) -> str:
    message = newsletter(list(recipients), headers={"X-Optout-Campaign": "spring"})
    return await stores.spool.accept(SENDER, recipients, message.as_bytes(), "test")


async def test_a_spooled_message_leaves_decorated_and_the_spool_empties(
    stores: Stores, downstream: CaptureServer, run_worker: RunWorker
) -> None:
    queue_id = await spool_message(stores, "ann@example.org")
    await run_worker(downstream)
    await wait_for(lambda: bool(downstream.handler.messages), what="the copy")
    [copy] = downstream.handler.messages
    assert copy.mail_from == SENDER
    assert copy.recipients == ["ann@example.org"]
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in copy.content
    assert f"<{PUBLIC_URL}/u/".encode() in copy.content
    assert b"X-Optout-Campaign" not in copy.content
    await wait_for(lambda: stores.events_of("delivered"), what="the delivered event")
    [delivered] = await stores.events_of("delivered")
    assert (delivered["queue_id"], delivered["campaign"]) == (queue_id, "spring")
    assert delivered["message_id"] == "<spring-2026@shop.example>"
    assert delivered["recipient"] == "ann@example.org"
    assert await stores.spool.depth() == (0, 0)


async def test_an_opt_out_that_arrives_while_mail_waits_stops_its_copy(
    stores: Stores, downstream: CaptureServer, run_worker: RunWorker
) -> None:
    await spool_message(stores, "ann@example.org", "bob@example.org")
    await stores.suppressions.add("bob@example.org", reason=Reason.UNSUBSCRIBE)
    await run_worker(downstream)
    await wait_for(lambda: stores.events_of("suppressed"), what="the suppressed event")
    await wait_for(lambda: stores.events_of("delivered"), what="ann's copy")
    assert [m.recipients for m in downstream.handler.messages] == [["ann@example.org"]]
    [suppressed] = await stores.events_of("suppressed")
    assert suppressed["recipient"] == "bob@example.org"
    assert await stores.spool.depth() == (0, 0)


async def test_a_4xx_keeps_the_copy_spooled_for_a_later_attempt(
    stores: Stores, start_downstream: StartDownstream, run_worker: RunWorker
) -> None:
    downstream = await start_downstream()
    downstream.handler.rcpt_replies["ann@example.org"] = "451 4.2.0 Mailbox busy"
    queue_id = await spool_message(stores, "ann@example.org")
    await run_worker(downstream)

    async def deferred() -> bool:
        entries = await stores.spool.entries(queue_id)
        return bool(entries) and entries[0].attempts == 1

    await wait_for(deferred, what="the deferral in the spool")
    # The deferred event is journalled in the same transaction, and copied to the event
    # log by the forwarder after it.
    await wait_for(lambda: stores.events_of("deferred"), what="the deferred event")
    [entry] = await stores.spool.entries(queue_id)
    assert entry.attempts == 1
    assert entry.last_reply is not None and entry.last_reply.startswith("451 4.2.0")
    assert downstream.handler.messages == []


def worker_for(stores: Stores, downstream: CaptureServer, retry: RetryPolicy) -> DeliveryWorker:
    """A worker over the test's spool and stores, sending to `downstream`."""
    return DeliveryWorker(
        spool=stores.spool,
        transport=SmtpTransport(
            Downstream("127.0.0.1", downstream.port),
            pool_size=2,
            timeout=10,
            local_hostname="relay.test",
        ),
        pipeline=Pipeline(),
        suppressions=stores.suppressions,
        events=stores.events,
        urls=TrackingUrls(PUBLIC_URL, Signer(SIGNING_KEYS)),
        retry=retry,
        concurrency=2,
        hostname="relay.test",
    )


def quick_worker(stores: Stores, downstream: CaptureServer) -> DeliveryWorker:
    """A worker whose retries come at once."""
    return worker_for(
        stores, downstream, RetryPolicy(initial_delay=0.01, max_delay=0.02, max_age=86400)
    )


@pytest.fixture
async def quick(stores: Stores, downstream: CaptureServer) -> AsyncIterator[DeliveryWorker]:
    """A worker that retries at once (local failures come back within milliseconds)."""
    worker = quick_worker(stores, downstream)
    task = asyncio.create_task(worker.run())
    yield worker
    await worker.stop()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_a_message_that_fails_locally_every_time_bounces_with_a_dsn_and_an_event(
    stores: Stores, downstream: CaptureServer, quick: DeliveryWorker
) -> None:
    """Spooled by an older relay for an address the suppression list cannot read: every
    pass fails before sending, and the fifth returns it to its sender."""
    queue_id = await spool_message(stores, "no address at all")
    await wait_for(lambda: stores.events_of("bounced"), what="the bounced event")
    [bounced] = await stores.events_of("bounced")
    assert (bounced["queue_id"], bounced["campaign"], bounced["recipient"]) == (
        queue_id,
        "spring",
        None,  # no one to name: the address has no key
    )
    assert bounced["detail"] == {
        "reply": "554 5.3.0 the relay could not process this message",
        "attempt": 5,
    }
    await wait_for(lambda: bool(downstream.handler.messages), what="the DSN")
    [dsn] = downstream.handler.messages
    assert (dsn.mail_from, dsn.recipients) == ("<>", [SENDER])
    assert b"Status: 5.3.0" in dsn.content

    async def empty() -> bool:
        return await stores.spool.depth() == (0, 0)

    await wait_for(empty, what="an empty spool")


async def test_the_queue_report_counts_mail_another_process_spooled(
    tmp_path: Path, stores: Stores, downstream: CaptureServer, quick: DeliveryWorker
) -> None:
    """The front door spools in another process: a tally kept by the delivery process
    would go below zero (`queue: -2 messages waiting`)."""
    front_door = await Spool.open(tmp_path / "spool.db")
    try:
        for name in ("ann", "bob"):
            rcpt = f"{name}@example.org"
            await front_door.accept(SENDER, [rcpt], newsletter([rcpt]).as_bytes(), "t")
        await wait_for(lambda: len(downstream.handler.messages) == 2, what="both copies")

        async def empty() -> bool:
            return await stores.spool.depth() == (0, 0)

        await wait_for(empty, what="an empty spool")
        assert await quick.report_queue() == 0
        downstream.handler.rcpt_replies["cy@example.org"] = "451 4.2.0 Mailbox busy"
        await front_door.accept(SENDER, ["cy@example.org"], b"Subject: x\r\n\r\nHi\r\n", "t")
        await wait_for(lambda: stores.events_of("deferred"), what="the deferral")
        assert await quick.report_queue() == 1
    finally:
        await front_door.close()
