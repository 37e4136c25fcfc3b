"""What a delivery process runs: the stores, the spool and the delivery worker, wired from
the settings. Kept apart from the front door and the HTTP app (relay.app), so that a
delivery child imports neither aiohttp nor aiosmtpd."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType

from suppression import MIGRATIONS as SUPPRESSION_MIGRATIONS
from suppression import AddressHasher, Database, SuppressionError, SuppressionStore
from tracking.events import MIGRATIONS as EVENT_MIGRATIONS
from tracking.events import EventStore
from tracking.signing import Signer
from tracking.tokens import TrackingUrls

from .config import Settings
from .delivery import DeliveryWorker, RetryPolicy
from .dkim import DkimError, DkimSigner, load_signer
from .errors import ConfigError
from .keys import HASH_KEY_FILE, SIGNING_KEY_FILE, ensure_private_dir, load_or_create_secret
from .pipeline import Pipeline
from .spool import WHOLE, Partition, Spool
from .transport import OutboxTransport, SmtpTransport, Transport

STORE_FILE = "optout.db"
SPOOL_FILE = "spool.db"
OUTBOX_DIR = "outbox"


class Stores:
    """The suppression list and the event log, opened from the data dir (async context)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._db: Database | None = None

    async def __aenter__(self) -> Stores:
        data_dir = self.settings.storage.dir
        ensure_private_dir(data_dir)
        hasher = AddressHasher(
            load_or_create_secret(data_dir / HASH_KEY_FILE).encode(),
            policy=self.settings.suppression,
        )
        self._db = await Database.open(
            data_dir / STORE_FILE, SUPPRESSION_MIGRATIONS + EVENT_MIGRATIONS
        )
        self.suppressions = SuppressionStore(self._db, hasher)
        self.events = EventStore(self._db)
        try:
            # A changed normalisation would silently stop old entries matching: refuse it.
            await self.suppressions.verify_normalization()
        except SuppressionError as exc:
            await self._db.close()
            raise ConfigError("suppression", str(exc)) from None
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._db is not None:
            await self._db.close()


def tracking_urls(settings: Settings) -> TrackingUrls:
    keys = settings.signing.secret_keys or (
        load_or_create_secret(settings.storage.dir / SIGNING_KEY_FILE),
    )
    public_url = settings.http.public_url or f"http://{settings.http.listen}"
    return TrackingUrls(public_url, Signer(keys))


def load_dkim_signers(settings: Settings) -> dict[str, DkimSigner]:
    """A signer per configured domain; a missing or unsafe key file is a config error."""
    base = settings.storage.dir

    def under_storage(path: Path) -> Path:
        return path if path.is_absolute() else base / path

    signers = {}
    for index, key in enumerate(settings.dkim.keys):
        try:
            signers[key.domain] = load_signer(
                key.domain,
                key.selector,
                under_storage(key.key_file),
                second_selector=key.second_selector,
                second_key_file=(
                    under_storage(key.second_key_file) if key.second_key_file else None
                ),
            )
        except DkimError as exc:
            raise ConfigError(f"dkim.keys[{index}]", str(exc)) from None
    return signers


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
        partition: Partition = WHOLE,
    ) -> None:
        self.settings = settings
        self._partition = partition
        self._stores = stores
        self._spool = spool
        self._urls = urls
        self._exit = AsyncExitStack()

    async def __aenter__(self) -> DeliveryRuntime:
        settings = self.settings
        try:
            stores = self._stores
            if stores is None:
                stores = await self._exit.enter_async_context(Stores(settings))
            spool = self._spool
            if spool is None:
                spool = await Spool.open(settings.storage.dir / SPOOL_FILE)
                self._exit.push_async_callback(spool.close)
            hostname = settings.smtp.hostname or socket.getfqdn()
            self.transport = build_transport(settings, hostname)
            self.worker = DeliveryWorker(
                spool=spool,
                transport=self.transport,
                pipeline=Pipeline(
                    signers=load_dkim_signers(settings),
                    accounts={a.username: a for a in settings.accounts},
                    clicks=settings.tracking.clicks,
                ),
                suppressions=stores.suppressions,
                events=stores.events,
                urls=self._urls or tracking_urls(settings),
                retry=RetryPolicy(
                    settings.delivery.retry_initial_delay,
                    settings.delivery.retry_max_delay,
                    settings.delivery.max_queue_age,
                ),
                concurrency=settings.delivery.workers,
                hostname=hostname,
                partition=self._partition,
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
