"""The one place that wires stores, pipeline, front door, tracking app and delivery together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType

from aiohttp import web

from suppression import MIGRATIONS as SUPPRESSION_MIGRATIONS
from suppression import AddressHasher, Database, SuppressionError, SuppressionStore
from tracking import MIGRATIONS as EVENT_MIGRATIONS
from tracking import EventStore, RateLimit, Signer, TrackingUrls, create_app
from tracking.events import purge

from .accounts import AuthThrottle
from .config import Settings
from .delivery import DeliveryWorker, RetryPolicy
from .dkim import DkimError, DkimSigner, load_signer
from .errors import ConfigError
from .keys import HASH_KEY_FILE, SIGNING_KEY_FILE, ensure_private_dir, load_or_create_secret
from .logs import LogFormat
from .pipeline import Pipeline, signer_for
from .smtp import FrontDoor
from .smtp_server import AuthPolicy, ConnectionLimits, RelaySMTP, reload_certificate, tls_context
from .spool import WHOLE, Partition, Spool
from .transport import OutboxTransport, SmtpTransport, Transport
from .worker_process import DeliveryProcess

log = logging.getLogger("optout.serve")

STORE_FILE = "optout.db"
SPOOL_FILE = "spool.db"
OUTBOX_DIR = "outbox"
RECOUNT_EVERY = 1.0
PURGE_EVERY = 3600.0


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


@dataclass(frozen=True, slots=True)
class Addresses:
    smtp: tuple[str, int]
    http: tuple[str, int]
    smtps: tuple[str, int] | None = None


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


def tracking_app(settings: Settings, stores: Stores, urls: TrackingUrls) -> web.Application:
    tracking = settings.tracking
    return create_app(
        stores.suppressions,
        stores.events,
        urls,
        template_dir=tracking.templates,
        brand=tracking.brand,
        store_ip=tracking.store_ip,
        store_user_agent=tracking.store_user_agent,
        durable_events=tracking.durable_events,
        rate_limit=RateLimit(per_minute=tracking.rate_per_minute, burst=tracking.rate_burst),
        trusted_proxies=settings.http.trusted_proxies,
        metrics_from=settings.http.metrics_from,
        undo_window=timedelta(seconds=tracking.undo_window),
        machine_seconds=tracking.machine_seconds,
    )


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


class Relay:
    """A running relay: SMTP front door and tracking HTTP app on one loop; delivery in a child
    process (or on the same loop when delivery.separate_process is false)."""

    def __init__(self, settings: Settings, log_format: LogFormat = "text") -> None:
        self.settings = settings
        self.log_format = log_format
        self.tls: ssl.SSLContext | None = None
        self._exit = AsyncExitStack()
        self._stopped = False

    @classmethod
    async def start(cls, settings: Settings, log_format: LogFormat = "text") -> Relay:
        relay = cls(settings, log_format)
        try:
            await relay._start()
        except BaseException:
            await relay._exit.aclose()
            raise
        return relay

    async def _start(self) -> None:
        settings = self.settings
        stores = await self._exit.enter_async_context(Stores(settings))
        urls = tracking_urls(settings)
        spool = await Spool.open(settings.storage.dir / SPOOL_FILE)
        self._exit.push_async_callback(spool.close)
        self.spool = spool
        self.stores = stores
        hostname = settings.smtp.hostname or socket.getfqdn()
        signers = load_dkim_signers(settings)  # fail here, before anything listens
        if signers:
            log.info("DKIM: signing for %s", ", ".join(sorted(signers)))
        else:
            log.warning("DKIM: no [[dkim.keys]] configured; mail leaves unsigned")
        for account in settings.accounts:
            for domain in account.from_domains:
                if signer_for(signers, domain) is None:
                    log.warning(
                        "DKIM: no key for %s (account %s): its mail leaves unsigned",
                        domain,
                        account.username,
                    )

        notify: Callable[[], None]
        destination: str
        if settings.delivery.separate_process:
            delivery = DeliveryProcess(settings, self.log_format)
            await delivery.start()
            self._exit.push_async_callback(delivery.stop)
            notify = delivery.notify
            # Deliveries now leave the spool in the other process: recount for back-pressure.
            refresher = asyncio.create_task(self._recount(spool), name="spool-recount")
            self._exit.callback(refresher.cancel)
            destination = build_transport(settings, hostname).describe()
        else:
            runtime = await self._exit.enter_async_context(
                DeliveryRuntime(settings, stores=stores, spool=spool, urls=urls)
            )
            notify = runtime.worker.notify
            destination = runtime.transport.describe()

        runner = web.AppRunner(tracking_app(settings, stores, urls), access_log=None)
        await runner.setup()
        self._exit.push_async_callback(runner.cleanup)
        http = settings.http.listen
        site = web.TCPSite(runner, http.host, http.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError("http.listen", f"cannot listen on {http}: {exc.strerror}") from None

        purger = asyncio.create_task(self._purge_hourly(stores), name="retention-purge")
        self._exit.callback(purger.cancel)

        front_door = FrontDoor(
            spool=spool,
            suppressions=stores.suppressions,
            settings=settings.smtp,
            max_queued_messages=settings.delivery.max_queued_messages,
            on_spooled=notify,
            accounts={a.username: a for a in settings.accounts},
        )
        servers = await self._listen_smtp(front_door, hostname)
        self._exit.push_async_callback(self._close_smtp, servers, front_door)
        server = servers[0]
        self.addresses = Addresses(
            smtp=_host_port(server.sockets[0].getsockname()),
            http=_host_port(runner.addresses[0]),
            smtps=_host_port(servers[1].sockets[0].getsockname()) if len(servers) > 1 else None,
        )
        log.info(
            "listening: smtp=%s http=%s, delivering to %s, data in %s",
            _fmt(self.addresses.smtp),
            _fmt(self.addresses.http),
            destination,
            settings.storage.dir,
        )

    async def _listen_smtp(self, front_door: FrontDoor, hostname: str) -> list[asyncio.Server]:
        """The submission listener, plus the implicit-TLS one when configured."""
        smtp = self.settings.smtp
        context = None
        if smtp.tls_cert is not None and smtp.tls_key is not None:
            try:
                context = tls_context(smtp.tls_cert, smtp.tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError("smtp.tls_cert", f"cannot load certificate: {exc}") from None
            self.tls = context
        limits = ConnectionLimits(smtp.max_connections, smtp.max_connections_per_client)
        auth = AuthPolicy({a.username: a for a in self.settings.accounts}, AuthThrottle())

        def session(implicit_tls: bool) -> RelaySMTP:
            return RelaySMTP(
                front_door,
                limits=limits,
                auth=auth,
                implicit_tls=implicit_tls,
                hostname=hostname,
                data_size_limit=smtp.max_message_size,
                enable_SMTPUTF8=True,
                ident="optout-relay",
                timeout=smtp.idle_timeout,
                tls_context=None if implicit_tls else context,
                # Over implicit TLS the connection is encrypted from the first byte.
                auth_require_tls=not implicit_tls,
            )

        loop = asyncio.get_running_loop()
        servers = []
        listeners = [("smtp.listen", smtp.listen, False)]
        if smtp.implicit_tls_listen is not None:
            listeners.append(("smtp.implicit_tls_listen", smtp.implicit_tls_listen, True))
        for key, listen, implicit in listeners:
            try:
                servers.append(
                    await loop.create_server(
                        lambda implicit=implicit: session(implicit),
                        listen.host,
                        listen.port,
                        reuse_address=True,
                        ssl=context if implicit else None,
                    )
                )
            except OSError as exc:
                for started in servers:
                    started.close()
                raise ConfigError(key, f"cannot listen on {listen}: {exc.strerror}") from None
        return servers

    def reload_certificates(self) -> None:
        """SIGHUP: new connections use the certificate files as they are now."""
        smtp = self.settings.smtp
        if self.tls is None or smtp.tls_cert is None or smtp.tls_key is None:
            return
        try:
            reload_certificate(self.tls, smtp.tls_cert, smtp.tls_key)
        except (OSError, ssl.SSLError) as exc:
            log.error("certificate reload failed, keeping the old one: %s", exc)
        else:
            log.info("certificate reloaded from %s", smtp.tls_cert)

    @staticmethod
    async def _close_smtp(servers: list[asyncio.Server], front_door: FrontDoor) -> None:
        for server in servers:
            server.close()
        # Replies not yet sent for messages being spooled must still be sent as 250 or 451.
        try:
            await asyncio.wait_for(front_door.drain(), timeout=30)
        except TimeoutError:
            log.error("messages still being spooled after 30 s; stopping anyway")

    async def _purge_hourly(self, stores: Stores) -> None:
        """Retention: events and contacts past their age, and lapsed suppressions, go."""
        while True:
            try:
                report = await purge(stores.events, stores.suppressions, self.settings.retention)
                log.info("retention purge: %s", report)
            except Exception:
                log.exception("retention purge failed; trying again in an hour")
            await asyncio.sleep(PURGE_EVERY)

    @staticmethod
    async def _recount(spool: Spool) -> None:
        while True:
            await asyncio.sleep(RECOUNT_EVERY)
            try:
                await spool.recount()
            except Exception:
                log.exception("cannot count the spool")

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self._exit.aclose()
        log.info("stopped")


def _host_port(address: object) -> tuple[str, int]:
    assert isinstance(address, tuple)
    return str(address[0]), int(address[1])


def _fmt(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


async def serve(settings: Settings, log_format: LogFormat = "text") -> None:
    """Run until SIGINT or SIGTERM, then finish in-flight work and close the stores."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    relay = await Relay.start(settings, log_format)
    loop.add_signal_handler(signal.SIGHUP, relay.reload_certificates)
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        await relay.stop()
