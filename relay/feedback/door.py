"""The feedback listener's aiosmtpd handler: an MX for the feedback domains, not a relay.

Only addresses at the feedback domains are taken: a copy's return path or mailto: address
whose token verifies, and postmaster@, abuse@ and fbl@ there; a forged or tampered token is
refused at RCPT (550 5.1.1), any other domain too (550 5.7.1). No AUTH is offered. What is
taken is committed to the reports table before the 250, and processed from there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from tracking.ratelimit import RateLimit, RateLimiter

from ..logs import client_name
from ..settings import FeedbackSettings
from .addresses import Destination, FeedbackAddresses
from .store import FeedbackStore

log = logging.getLogger("optout.feedback")

CANNOT_STORE = "451 4.3.0 Requested action aborted: cannot store the message, try again later"
BACKLOG_FULL = "451 4.3.1 Too many reports waiting, try again later"
TOO_FAST = "450 4.7.1 Too much mail from your address, try again later"
NOT_HERE = "550 5.7.1 <{}>: Relay access denied"
FORGED = "550 5.1.1 <{}>: Recipient address rejected: no such address here"
TOO_MANY = "452 4.5.3 Too many recipients"


def _received_from(session: Session) -> str:
    """`HELO[IP]`, as the report is kept (the front door's spool keeps its client so)."""
    return f"{session.host_name or 'unknown'}[{_peer(session)}]"


def _client(session: Session) -> str:
    """The client as the relay's logs name it, Postfix's way, with its HELO apart."""
    return f"{client_name(session)} helo=<{session.host_name or ''}>"


def _peer(session: Session) -> str:
    return str(session.peer[0]) if isinstance(session.peer, tuple) and session.peer else "?"


class FeedbackDoor:
    """aiosmtpd handler: each hook returns the SMTP reply."""

    def __init__(
        self,
        *,
        store: FeedbackStore,
        addresses: FeedbackAddresses,
        settings: FeedbackSettings,
        waiting: Callable[[], int],
        on_accepted: Callable[[], None],
    ) -> None:
        self._store = store
        self._addresses = addresses
        self._settings = settings
        self._waiting = waiting
        self._on_accepted = on_accepted
        self._rate = RateLimiter(RateLimit(settings.rate_per_minute, settings.rate_burst))

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """aiosmtpd's EHLO reply without AUTH: an MX takes mail from anyone, unauthenticated."""
        session.host_name = hostname
        return [line for line in responses if not line[4:].upper().startswith("AUTH")]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self._rate.take(_peer(session)) > 0:
            log.warning("reject: MAIL from %s: %s", _client(session), TOO_FAST)
            return TOO_FAST
        if self._waiting() >= self._settings.max_pending:
            log.warning(
                "reject: MAIL from %s: %d reports waiting", _client(session), self._waiting()
            )
            return BACKLOG_FULL
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self._settings.max_recipients:
            return TOO_MANY
        destination = self._addresses.classify(address).destination
        if destination is Destination.FOREIGN:
            log.info("reject: RCPT from %s: 550 5.7.1 to=<%s>", _client(session), address)
            return NOT_HERE.format(address)
        if destination is Destination.FORGED:
            log.info(
                "reject: RCPT from %s: 550 5.1.1 token does not verify; from=<%s> to=<%s>",
                _client(session),
                envelope.mail_from,
                address,
            )
            return FORGED.format(address)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content: Any = envelope.original_content  # never spilled: see listener.py
        assert isinstance(content, bytes)
        sender = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
        try:
            report_id = await self._store.accept(
                sender, list(envelope.rcpt_tos), content, _received_from(session)
            )
        except Exception as exc:
            log.error("NOQUEUE: cannot store report from=<%s>: %s", sender, exc)
            return CANNOT_STORE
        log.info(
            "report %d: client=%s, from=<%s>, size=%d, to=%s",
            report_id,
            _client(session),
            sender,
            len(content),
            ",".join(f"<{r}>" for r in envelope.rcpt_tos),
        )
        self._on_accepted()
        return f"250 2.0.0 Ok: report {report_id}"
