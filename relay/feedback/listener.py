"""The feedback listener: the front door's SMTP session (relay.smtpd.RelaySMTP: enhanced
status codes, connection limits, chunked DATA) with the feedback door as its handler, and
the runner that processes what it accepts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass

from aiosmtpd.smtp import SMTP

from suppression import Engine
from tracking.tokens import TrackingUrls

from ..errors import ConfigError
from ..settings import Settings
from ..smtpd import AuthPolicy, ConnectionLimits, RelaySMTP
from .addresses import FeedbackAddresses
from .door import FeedbackDoor
from .runner import FeedbackRunner
from .store import FeedbackStore
from .tokens import CopyTokens

log = logging.getLogger("optout.feedback")


class FeedbackSMTP(RelaySMTP):
    """An MX session: AUTH is neither offered nor taken."""

    async def smtp_AUTH(self, arg: str) -> None:
        await self.push("502 5.5.1 AUTH not offered: this is a mail exchanger, not a relay")


@dataclass
class FeedbackListener:
    server: asyncio.Server
    runner: FeedbackRunner
    task: asyncio.Task[None]
    address: tuple[str, int]

    @classmethod
    async def start(
        cls,
        settings: Settings,
        database: Engine,
        urls: TrackingUrls,
        tokens: CopyTokens,
        *,
        hostname: str,
        tls: ssl.SSLContext | None,
    ) -> FeedbackListener:
        feedback = settings.feedback
        assert feedback.listen is not None
        store = FeedbackStore(database)
        addresses = FeedbackAddresses(settings.feedback_domains(), tokens)
        runner = FeedbackRunner(store, addresses, urls, feedback)
        door = FeedbackDoor(
            store=store,
            addresses=addresses,
            settings=feedback,
            waiting=lambda: runner.waiting,
            on_accepted=runner.accepted,
        )
        limits = ConnectionLimits(feedback.max_connections, feedback.max_connections_per_client)
        no_accounts = AuthPolicy({})

        def session() -> SMTP:
            return FeedbackSMTP(
                door,
                limits=limits,
                auth=no_accounts,
                spill_dir=None,  # reports are held in memory, up to max_message_size
                hostname=hostname,
                data_size_limit=feedback.max_message_size,
                enable_SMTPUTF8=True,
                ident="optout-relay feedback",
                timeout=settings.smtp.idle_timeout,
                tls_context=tls,
            )

        listen = feedback.listen
        try:
            server = await asyncio.get_running_loop().create_server(
                session, listen.host, listen.port, reuse_address=True
            )
        except OSError as exc:
            raise ConfigError(
                "feedback.listen", f"cannot listen on {listen}: {exc.strerror}"
            ) from None
        task = asyncio.create_task(runner.run(), name="feedback-runner")
        sockname = server.sockets[0].getsockname()
        address = (str(sockname[0]), int(sockname[1]))
        log.info(
            "feedback listener on %s:%d for %s",
            *address,
            ", ".join(settings.feedback_domains()),
        )
        return cls(server, runner, task, address)

    async def stop(self) -> None:
        self.server.close()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
