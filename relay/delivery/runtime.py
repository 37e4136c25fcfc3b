"""What a delivery process runs: the spool, the transport and the delivery worker, wired
from the settings. Kept apart from the front door and the HTTP app (relay.app), so that a
delivery child imports neither aiohttp nor aiosmtpd."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Mapping
from contextlib import AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING

from tracking.signing import Signer
from tracking.tokens import TrackingUrls

from ..accounts import Account
from ..cores import usable_cores
from ..dkim import DkimSigner
from ..feedback import CopyTokens, FeedbackMarks
from ..pipeline import Pipeline
from ..rewrite import ReceivedClient
from ..settings import Settings
from ..spool import WHOLE, Partition, Spool
from ..spool.state import marker_file
from ..stores import OUTBOX_DIR, SPOOL_FILE, Stores, load_dkim_signers, tracking_urls
from .guard import WorkGuard, memory_ceiling
from .transport import OutboxTransport, SmtpTransport, Transport, outbox_name
from .worker import DeliveryWorker, RetryPolicy

if TYPE_CHECKING:
    from ..dkim.helper import SigningHelper


def destination(settings: Settings) -> str:
    """Where mail goes, as the transport will name it in logs."""
    downstream = settings.delivery.downstream
    return downstream.address if downstream else outbox_name(settings.storage.dir / OUTBOX_DIR)


def feedback_marks(
    settings: Settings, accounts: Mapping[str, Account], signed_by: Signer
) -> FeedbackMarks | None:
    """With a feedback domain (the relay's or an account's), the maker of each copy's
    return path, mailto: address and feedback fields."""
    if not settings.feedback_domains():
        return None
    return FeedbackMarks(CopyTokens(signed_by), settings.feedback.domain, accounts)


def build_transport(settings: Settings, hostname: str) -> Transport:
    if settings.delivery.downstream is None:
        return OutboxTransport(settings.storage.dir / OUTBOX_DIR)
    return SmtpTransport(
        settings.delivery.downstream,
        pool_size=settings.delivery.workers,
        timeout=settings.delivery.timeout,
        local_hostname=hostname,
        require_tls=settings.delivery.require_tls,
    )


class DeliveryRuntime:
    """The delivery worker and what it needs, running on the current event loop."""

    def __init__(
        self,
        settings: Settings,
        *,
        stores: Stores | None = None,
        spool: Spool | None = None,
        urls: TrackingUrls | None = None,
        signers: Mapping[str, DkimSigner] | None = None,
        accounts: Mapping[str, Account] | None = None,
        partition: Partition = WHOLE,
    ) -> None:
        """What the caller already has (the relay's own stores, spool, URLs, DKIM signers
        and accounts) is shared; what it does not pass is opened or built here."""
        self.settings = settings
        self._signers = signers
        self._accounts = accounts
        self._partition = partition
        self._stores = stores
        self._spool = spool
        self._urls = urls
        self._exit = AsyncExitStack()

    async def _signing_helper(self, signers: Mapping[str, DkimSigner]) -> SigningHelper | None:
        """With RSA keys and a core to spare, a process of its own makes the signatures."""
        keys = [key for signer in signers.values() for key in signer.private_keys]
        if not keys or usable_cores() < 2:
            return None
        # Imported here: without a DKIM key, delivery loads no signing code.
        from ..dkim.helper import SigningHelper

        helper = SigningHelper(keys)
        if not helper.useful:  # Ed25519 keys only: cheap, signed in this process
            return None
        await helper.start()
        self._exit.push_async_callback(helper.close)
        return helper

    async def __aenter__(self) -> DeliveryRuntime:
        settings = self.settings
        try:
            stores = self._stores
            if stores is None:
                stores = await self._exit.enter_async_context(Stores(settings))
            spool = self._spool
            if spool is None:
                spool = await Spool.open(
                    settings.storage.dir / SPOOL_FILE, reserve=settings.storage.reserve
                )
                self._exit.push_async_callback(spool.close)
            hostname = settings.smtp.hostname
            if hostname is None:
                hostname = await asyncio.to_thread(socket.getfqdn)  # may ask DNS
            self.transport = build_transport(settings, hostname)
            accounts = settings.account_map() if self._accounts is None else self._accounts
            signers = load_dkim_signers(settings) if self._signers is None else self._signers
            signing = await self._signing_helper(signers)
            self.worker = DeliveryWorker(
                spool=spool,
                transport=self.transport,
                pipeline=Pipeline(
                    signers=signers,
                    accounts=accounts,
                    opens=settings.tracking.opens,
                    clicks=settings.tracking.click_mode,
                    hostname=hostname,
                    received_client=ReceivedClient(settings.smtp.received_client),
                    limits=settings.rewrite.limits(),
                    postal_address=settings.rewrite.postal_address,
                    pixel_min_html=settings.rewrite.pixel_min_html,
                ),
                suppressions=stores.suppressions,
                events=stores.events,
                urls=self._urls or tracking_urls(settings, stores.signer()),
                retry=RetryPolicy(
                    settings.delivery.retry_initial_delay,
                    settings.delivery.retry_max_delay,
                    settings.delivery.max_queue_age,
                ),
                concurrency=settings.delivery.workers,
                hostname=hostname,
                partition=self._partition,
                guard=WorkGuard(
                    marker_file(settings.storage.dir, self._partition.index),
                    cpu_limit=settings.delivery.message_cpu_limit,
                    memory_ceiling=memory_ceiling(settings.delivery.memory_limit),
                    # Only a supervised delivery process may end itself over a message.
                    enforce=settings.delivery.separate_process,
                ),
                marks=feedback_marks(settings, accounts, stores.signer()),
                signing=signing,
            )
            task = asyncio.create_task(self.worker.run(), name="delivery-worker")
            self._exit.push_async_callback(self._stop, self.worker, task)
        except BaseException:
            await self._exit.aclose()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._exit.aclose()

    @staticmethod
    async def _stop(worker: DeliveryWorker, task: asyncio.Task[None]) -> None:
        await worker.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
