"""The one place that wires stores, pipeline, front door, tracking app and delivery together."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import socket
import sqlite3
import ssl
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from tracking import RateLimit, TrackingUrls, create_app
from tracking.aggregate import digest_key
from tracking.app import HEALTH_CHECKS, HealthCheck, health_report
from tracking.hub import Hub, Line
from tracking.listener import ClientCounts, ConnectionCaps, HttpListener, LocalAdmission
from tracking.retention import purge
from tracking.state import TRACKING
from tracking.webhooks.dispatch import Dispatcher

from ._malloc import return_big_buffers
from .accounts import verify_password
from .delivery import DeliveryProcess, DeliveryRuntime
from .delivery import destination as delivery_destination
from .delivery.processes import STOP_TIMEOUT
from .descriptors import (
    ADMIN_CONNECTIONS,
    Budget,
    QuietAcceptErrors,
    descriptors_open,
    plan,
    raise_limit,
)
from .errors import ConfigError
from .health import Health, startup_checks
from .logs import LogFormat, setup_logging
from .pipeline import signer_for
from .settings import Settings
from .smtpd import (
    AuthPolicy,
    ConnectionLimits,
    FrontDoor,
    RelaySMTP,
    is_localhost,
    reload_certificate,
    tls_context,
)
from .spool import Spool
from .spool.state import DirLock
from .stores import (
    PENDING_EVENTS_FILE,
    SPOOL_FILE,
    Stores,
    ensure_private_dir,
    load_dkim_signers,
    tracking_urls,
)

if TYPE_CHECKING:
    from tracking.recorder import Recorder

    from .http_workers import HttpWorkers

log = logging.getLogger("optout.serve")

RECOUNT_EVERY = 1.0
PURGE_EVERY = 3600.0


@dataclass(frozen=True, slots=True)
class Addresses:
    smtp: tuple[str, int]
    http: tuple[str, int]
    smtps: tuple[str, int] | None = None
    feedback: tuple[str, int] | None = None
    transactional: tuple[str, int] | None = None
    admin: tuple[str, int] | None = None


def tracking_app(
    settings: Settings,
    stores: Stores,
    urls: TrackingUrls,
    log_format: LogFormat = "text",
    health_details: Callable[[], Sequence[str]] | None = None,
    hub: Line | None = None,
) -> web.Application:
    """The tracking app as `serve` runs it; `hub`: in a worker HTTP process
    (relay.http_workers), its line to the main one."""
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
        event_process=settings.http.event_process,
        event_process_logging=functools.partial(setup_logging, log_format),
        # A shared store may be away: opens wait on this node's disk meanwhile.
        pending_events=(
            settings.storage.dir / PENDING_EVENTS_FILE if settings.storage.database else None
        ),
        rate_limit=RateLimit(per_minute=tracking.rate_per_minute, burst=tracking.rate_burst),
        fetch_limit=RateLimit(
            per_minute=tracking.fetch_rate_per_minute, burst=tracking.fetch_rate_burst
        ),
        repeat_window=timedelta(seconds=tracking.repeat_window),
        body_timeout=settings.http.body_timeout,
        trusted_proxies=settings.http.trusted_proxies,
        metrics_from=settings.http.metrics_from,
        undo_window=timedelta(seconds=tracking.undo_window),
        machine_seconds=tracking.machine_seconds,
        health_details=health_details,
        tracking_withdrawal=settings.individual_tracking(),
        keep_last_open_only=tracking.keep_last_open_only,
        hub=hub,
    )


class Relay:
    """A running relay: SMTP front door and tracking HTTP app on one loop; delivery in a child
    process (or on the same loop when delivery.separate_process is false)."""

    def __init__(self, settings: Settings, log_format: LogFormat = "text") -> None:
        self.settings = settings
        self.log_format = log_format
        self.tls: ssl.SSLContext | None = None
        self._exit = AsyncExitStack()
        self._stopped = False
        self._delivery: DeliveryProcess | None = None
        self.http_workers: HttpWorkers | None = None
        self._recorder: Recorder | None = None  # the tracking app's
        self.accounts = settings.account_map()

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
        # Before anything is opened or spawned: children inherit the raised limit, and a
        # configuration whose connection caps cannot fit is refused before any work.
        budget = plan(settings, raise_limit(), descriptors_open())
        await self._lock_data_dir(settings.storage.dir)
        stores = await self._exit.enter_async_context(Stores(settings))
        signed_by = stores.signer()
        urls = tracking_urls(settings, signed_by)
        spool = await Spool.open(
            settings.storage.dir / SPOOL_FILE, receiving=True, reserve=settings.storage.reserve
        )
        self._exit.push_async_callback(spool.close)
        self.spool = spool
        self.stores = stores
        found = await startup_checks(stores, spool, settings.storage.dir)
        self.health = Health(stores, spool, settings.storage.dir, found)
        hostname = settings.smtp.hostname
        if hostname is None:
            hostname = await asyncio.to_thread(socket.getfqdn)  # may ask DNS
        if is_localhost(hostname):
            log.warning(
                "this relay calls itself %r in its greeting and Received fields, which"
                " receivers see: set smtp.hostname to its public name",
                hostname,
            )
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
        _warn_without_postal_address(settings)

        notify: Callable[[], None]
        destination: str
        if settings.delivery.separate_process:
            delivery = self._delivery = DeliveryProcess(settings, self.log_format)
            await delivery.start()
            self._exit.push_async_callback(delivery.stop)
            notify = delivery.notify
            # Deliveries now leave the spool in the other process: recount for back-pressure.
            refresher = asyncio.create_task(self._recount(spool), name="spool-recount")
            self._exit.callback(refresher.cancel)
            destination = delivery_destination(settings)
        else:
            runtime = await self._exit.enter_async_context(
                DeliveryRuntime(
                    settings,
                    stores=stores,
                    spool=spool,
                    urls=urls,
                    signers=signers,
                    accounts=self.accounts,
                )
            )
            notify = runtime.worker.notify
            destination = runtime.transport.describe()

        webhooks = await self._start_webhooks(stores)
        http_listener = await self._listen_http(
            stores, urls, budget, webhooks.health_lines if webhooks else None
        )
        admin = await self._start_admin(stores, spool, webhooks) if settings.admin.enabled else None

        purger = asyncio.create_task(self._purge_hourly(stores), name="retention-purge")
        self._exit.callback(purger.cancel)

        if self.http_workers is not None:
            # Mail is taken once every process is up: a first burst of it should not find
            # the HTTP workers still loading, the two fighting for the cores.
            await self.http_workers.started()
            log.info("http: %d processes answer on the listen address", settings.http.processes)
        door = functools.partial(
            FrontDoor,
            spool=spool,
            suppressions=stores.suppressions,
            settings=settings.smtp,
            max_queued_messages=settings.delivery.max_queued_messages,
            on_spooled=notify,
            accounts=self.accounts,
            events=stores.events,
            mime_limits=settings.rewrite.limits(),
        )
        front_doors = [door()]
        if settings.smtp.transactional_listen is not None:
            front_doors.append(door(transactional=True))
        servers = await self._listen_smtp(front_doors, hostname, spool.incoming)
        self._exit.push_async_callback(self._close_smtp, list(servers.values()), front_doors)
        feedback = None
        if settings.feedback.intake:
            # Imported here: without [feedback] listen, serve loads none of it.
            from .feedback.listener import FeedbackListener
            from .feedback.tokens import CopyTokens

            listener = await FeedbackListener.start(
                settings,
                stores.suppressions.database,
                urls,
                CopyTokens(signed_by),
                hostname=hostname,
                tls=self.tls,
            )
            self._exit.push_async_callback(listener.stop)
            feedback = listener.address

        def bound(key: str) -> tuple[str, int] | None:
            server = servers.get(key)
            return None if server is None else _host_port(server.sockets[0].getsockname())

        smtp_address = bound("smtp.listen")
        assert smtp_address is not None
        self.addresses = Addresses(
            smtp=smtp_address,
            http=_host_port(http_listener.addresses[0]),
            smtps=bound("smtp.implicit_tls_listen"),
            feedback=feedback,
            transactional=bound("smtp.transactional_listen"),
            admin=admin,
        )
        log.info(
            "listening: smtp=%s http=%s, delivering to %s, data in %s",
            _fmt(self.addresses.smtp),
            _fmt(self.addresses.http),
            destination,
            settings.storage.dir,
        )
        if self.addresses.transactional is not None:
            log.info("listening: transactional smtp=%s", _fmt(self.addresses.transactional))
        log.info(budget.describe())

    async def _listen_http(
        self,
        stores: Stores,
        urls: TrackingUrls,
        budget: Budget,
        health_details: Callable[[], Sequence[str]] | None,
    ) -> HttpListener:
        """The tracking app behind our own listener (tracking.listener): connections capped
        by the budget and per client, request headers and bodies on a deadline. aiohttp's
        keep-alive timeout holds the requests after a connection's first to the same."""
        http = self.settings.http
        app = tracking_app(
            self.settings, stores, urls, self.log_format, health_details=health_details
        )
        checks: list[HealthCheck] = [self.health.problems]
        app[HEALTH_CHECKS] = checks
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=http.header_timeout)
        await runner.setup()
        self._exit.push_async_callback(runner.cleanup)
        assert runner.server is not None
        total = budget.http_connections
        caps = ConnectionCaps(
            total,
            # However it is configured, one client never holds more than half of them.
            min(http.max_connections_per_client, max(1, total // 2)),
            exempt=http.trusted_proxies,
            header_timeout=http.header_timeout,
        )
        counts = ClientCounts(caps.per_client)
        listener = HttpListener(runner.server, caps, admission=LocalAdmission(counts))
        try:
            addresses = await listener.start(
                http.listen.host, http.listen.port, reuse_port=http.processes > 1
            )
        except OSError as exc:
            raise ConfigError(
                "http.listen", f"cannot listen on {http.listen}: {exc.strerror}"
            ) from None
        self._exit.callback(listener.close)  # before the runner's cleanup: no new ones
        tracking = app[TRACKING]
        tracking.metrics.watch_listener(listener.stats)
        self._recorder = tracking.recorder
        if http.processes > 1:
            # Imported here: with one HTTP process, serve loads none of it.
            from .http_workers import HttpWorkers, WorkerSpec

            hub = Hub(
                tracking.recorder,
                tracking.limiter,
                counts,
                tracking.metrics,
                functools.partial(health_report, app),
            )
            workers = HttpWorkers(
                WorkerSpec(self.settings, self.log_format, addresses, caps, digest_key()),
                http.processes,
                hub,
            )
            # Stopped before the listener and the app: they hand their events to its recorder.
            self._exit.push_async_callback(workers.stop)
            self.http_workers = workers  # listening before the relay says it is (`_start`)
        return listener

    async def _start_webhooks(self, stores: Stores) -> Dispatcher | None:
        """From now on every process queues webhooks for the configured endpoints (none:
        none); this one POSTs them, in a task of its own."""
        settings = self.settings
        delivery = settings.webhook_delivery
        try:
            await stores.webhooks.subscribe(settings.webhooks, delivery.give_up_after)
        except sqlite3.Error as exc:
            # A full or failing optout.db must not keep the relay from draining its spool.
            log.error("webhooks: cannot record the configured endpoints (%s)", exc)
        if not settings.webhooks:
            return None
        dispatcher = Dispatcher(stores.webhooks, settings.webhooks, delivery)
        task = asyncio.create_task(dispatcher.run(), name="webhooks")
        self._exit.push_async_callback(_cancelled, task)
        log.info("webhooks: to %s", ", ".join(endpoint.label for endpoint in settings.webhooks))
        return dispatcher

    async def _start_admin(
        self, stores: Stores, spool: Spool, webhooks: Dispatcher | None
    ) -> tuple[str, int]:
        """The dashboard, on a listener of its own: never the public tracking one."""
        # Imported here: the charts' library loads only when the dashboard is on.
        from tracking.admin import create_admin_app

        settings = self.settings
        app = create_admin_app(
            users={user.username: user.password_hash for user in settings.admin.users},
            check_password=verify_password,
            suppressions=stores.suppressions,
            statistics=stores.statistics,
            webhooks=stores.webhooks,
            queue=spool.entries,  # the relay's spool API, read-only
            webhook_alerts=webhooks.health_lines if webhooks else lambda: (),
            give_up_after=settings.webhook_delivery.give_up_after,
            session_timeout=settings.admin.session_timeout,
            trusted_proxies=settings.http.trusted_proxies,
        )
        http = settings.http
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=http.header_timeout)
        await runner.setup()
        self._exit.push_async_callback(runner.cleanup)
        assert runner.server is not None
        # Its own small share of descriptors (relay.descriptors), so that no one can starve
        # the other listeners through it.
        caps = ConnectionCaps(
            ADMIN_CONNECTIONS,
            ADMIN_CONNECTIONS // 4,
            exempt=http.trusted_proxies,
            header_timeout=http.header_timeout,
        )
        listener = HttpListener(runner.server, caps, name="admin")
        listen = settings.admin.listen
        try:
            await listener.start(listen.host, listen.port)
        except OSError as exc:
            problem = f"cannot listen on {listen}: {exc.strerror}"
            raise ConfigError("admin.listen", problem) from None
        self._exit.callback(listener.close)
        address = _host_port(listener.addresses[0])
        log.info("dashboard on http://%s", _fmt(address))
        return address

    async def _lock_data_dir(self, data_dir: Path) -> None:
        """One serve per data dir: a second one stops here, naming the first's pid. Then
        wait for the delivery processes of a serve that ended abruptly to finish their
        copies, so that no message goes out from two processes."""
        ensure_private_dir(data_dir)
        lock = await asyncio.to_thread(DirLock.serve, data_dir)
        self._exit.callback(lock.release)
        previous = await asyncio.to_thread(
            DirLock.delivery, data_dir, exclusive=True, within=STOP_TIMEOUT + 5
        )
        if previous is None:
            log.warning("delivery processes of a previous serve are still running")
        else:
            previous.release()

    async def _listen_smtp(
        self, front_doors: list[FrontDoor], hostname: str, spill_dir: Path
    ) -> dict[str, asyncio.Server]:
        """The submission listener, plus the implicit-TLS one and the transactional one
        (with `front_doors[1]`) when configured, by config key. Big messages are spilled to
        `spill_dir` as they arrive."""
        smtp = self.settings.smtp
        context = None
        if smtp.tls_cert is not None and smtp.tls_key is not None:
            try:
                context = tls_context(smtp.tls_cert, smtp.tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError("smtp.tls_cert", f"cannot load certificate: {exc}") from None
            self.tls = context
        limits = ConnectionLimits(smtp.max_connections, smtp.max_connections_per_client)
        auth = AuthPolicy(self.accounts)

        def session(front_door: FrontDoor, implicit_tls: bool) -> RelaySMTP:
            return RelaySMTP(
                front_door,
                limits=limits,
                auth=auth,
                spill_dir=spill_dir,
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
        servers: dict[str, asyncio.Server] = {}
        listeners = [("smtp.listen", smtp.listen, False, front_doors[0])]
        if smtp.implicit_tls_listen is not None:
            listeners.append(
                ("smtp.implicit_tls_listen", smtp.implicit_tls_listen, True, front_doors[0])
            )
        if smtp.transactional_listen is not None:
            listeners.append(
                ("smtp.transactional_listen", smtp.transactional_listen, False, front_doors[1])
            )
        for key, listen, implicit, handler in listeners:
            try:
                servers[key] = await loop.create_server(
                    functools.partial(session, handler, implicit),
                    listen.host,
                    listen.port,
                    reuse_address=True,
                    ssl=context if implicit else None,
                )
            except OSError as exc:
                for started in servers.values():
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
    async def _close_smtp(servers: list[asyncio.Server], front_doors: list[FrontDoor]) -> None:
        for server in servers:
            server.close()
        # Replies not yet sent for messages being spooled must still be sent as 250 or 451.
        try:
            drained = asyncio.gather(*(door.drain() for door in front_doors))
            await asyncio.wait_for(drained, timeout=30)
        except TimeoutError:
            log.error("messages still being spooled after 30 s; stopping anyway")

    async def _purge_hourly(self, stores: Stores) -> None:
        """Retention: events and contacts past their age, and lapsed suppressions, go."""
        while True:
            try:
                report = await purge(
                    stores.events,
                    stores.suppressions,
                    self.settings.retention,
                    keep_last_open_only=self.settings.tracking.keep_last_open_only,
                )
                log.info("retention: %s", report.summary(), extra={"fields": report.fields()})
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

    @property
    def delivery_pids(self) -> list[int]:
        """The delivery processes' pids ([] when delivery runs in this process)."""
        return [] if self._delivery is None else self._delivery.pids

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._delivery is not None:
            # A stop sent to every process at once (systemd, Ctrl-C) ends the children
            # while the front door and the HTTP app are still closing: no restarts now.
            self._delivery.expect_stop()
        if self.http_workers is not None:
            self.http_workers.expect_stop()
        if self._recorder is not None:
            self._recorder.expect_stop()
        await self._exit.aclose()
        log.info("stopped")


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _warn_without_postal_address(settings: Settings) -> None:
    """CAN-SPAM (15 USC 7704(a)(5)) wants a physical postal address in every commercial
    message: say at start which senders of marketing mail have none for the footer."""
    if settings.rewrite.postal_address:
        return
    for account in settings.accounts:
        if account.category != "transactional" and not account.postal_address:
            log.warning(
                "account %s sends marketing mail without a postal address: set"
                " postal_address for it, or rewrite.postal_address (CAN-SPAM 7704(a)(5))",
                account.username,
            )


def _host_port(address: object) -> tuple[str, int]:
    assert isinstance(address, tuple)
    return str(address[0]), int(address[1])


def _fmt(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


async def serve(settings: Settings, log_format: LogFormat = "text") -> None:
    """Run until SIGINT or SIGTERM, then finish in-flight work and close the stores."""
    return_big_buffers()
    loop = asyncio.get_running_loop()
    QuietAcceptErrors(loop).install()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    started: list[Relay] = []
    reload_asked = False

    def reload() -> None:
        nonlocal reload_asked
        if started:
            started[0].reload_certificates()
        else:  # the files may have changed after they were read: read them again once up
            reload_asked = True

    # Before the start, which takes a while: a SIGHUP meanwhile must not kill the relay.
    loop.add_signal_handler(signal.SIGHUP, reload)
    relay = await Relay.start(settings, log_format)
    started.append(relay)
    if reload_asked:
        relay.reload_certificates()
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        await relay.stop()
