"""The SMTP front door: who may submit, who may receive, and 250 only once it is on disk."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, Envelope, Session

from suppression import InvalidAddress, SuppressionStore

from .config import IPNetwork, SmtpSettings
from .spool import Spool

log = logging.getLogger("optout.smtp")

# aiosmtpd's own wording for limits it enforces, mapped to the replies of our contract.
_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
_REPLIES = {
    "552 Error: message size exceeds fixed maximum message size": _TOO_BIG,
    "552 Error: Too much mail data": _TOO_BIG,
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)",
}


class RelaySMTP(SMTP):
    """aiosmtpd's server, speaking enhanced status codes (RFC 3463) where it answers itself."""

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            await super().push(_REPLIES.get(status, status))
        else:
            await super().push(status)


def peer_ip(session: Session) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    peer = session.peer
    if not isinstance(peer, tuple) or not peer:
        return None
    try:
        address = ipaddress.ip_address(peer[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _client(session: Session) -> str:
    return f"{session.host_name or 'unknown'}[{session.peer[0] if session.peer else '?'}]"


class FrontDoor:
    """aiosmtpd handler: each hook returns the SMTP reply."""

    def __init__(
        self,
        *,
        spool: Spool,
        suppressions: SuppressionStore,
        settings: SmtpSettings,
        max_queued_messages: int,
        on_spooled: Callable[[], None],
    ) -> None:
        self._max_queued = max_queued_messages
        self._spool = spool
        self._suppressions = suppressions
        self._trusted: tuple[IPNetwork, ...] = settings.trusted_networks
        self._max_recipients = settings.max_recipients
        self._on_spooled = on_spooled
        self._accepting = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def is_trusted(self, session: Session) -> bool:
        address = peer_ip(session)
        return address is not None and any(address in net for net in self._trusted)

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if not (self.is_trusted(session) or session.authenticated):
            log.info(
                "NOQUEUE: reject: MAIL from %s: 530 5.7.0 not a trusted network; from=<%s>",
                _client(session),
                address,
            )
            return "530 5.7.0 Authentication required"
        if self._spool.waiting >= self._max_queued:
            log.warning(
                "NOQUEUE: reject: MAIL from %s: 451 4.3.1 spool holds %d messages",
                _client(session),
                self._spool.waiting,
            )
            return "451 4.3.1 Mail system full, try again later"
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
        if len(envelope.rcpt_tos) >= self._max_recipients:
            return "452 4.5.3 Too many recipients"
        try:
            suppressed = await self._suppressions.check(address)
        except InvalidAddress:
            return "553 5.1.3 Bad recipient address syntax"
        except Exception:
            log.exception("suppression lookup failed")
            return "451 4.3.0 Suppression list unavailable, try again later"
        if suppressed is not None:
            log.info(
                "NOQUEUE: reject: RCPT from %s: 550 5.7.1 recipient has opted out (%s);"
                " from=<%s> to=<%s>",
                _client(session),
                suppressed.scope,
                envelope.mail_from,
                address,
            )
            return f"550 5.7.1 <{address}>: Recipient has opted out of this sender's mail"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content: Any = envelope.original_content
        assert isinstance(content, bytes)
        # aiosmtpd keeps the null sender (RFC 5321 §4.5.5) as "<>"; the spool stores "".
        sender = "" if envelope.mail_from in (None, "<>") else envelope.mail_from
        self._accepting += 1
        self._idle.clear()
        try:
            queue_id = await self._spool.accept(
                sender, list(envelope.rcpt_tos), content, _client(session)
            )
        except Exception as exc:
            log.error("NOQUEUE: cannot spool message from=<%s>: %s", envelope.mail_from, exc)
            return "451 4.3.0 Requested action aborted: cannot store the message, try again later"
        finally:
            self._accepting -= 1
            if not self._accepting:
                self._idle.set()
        log.info(
            "client=%s, from=<%s>, size=%d, nrcpt=%d (queued)",
            _client(session),
            envelope.mail_from,
            len(content),
            len(envelope.rcpt_tos),
            extra={
                "queue_id": queue_id,
                "fields": {
                    "client": _client(session),
                    "from": envelope.mail_from,
                    "size": len(content),
                    "nrcpt": len(envelope.rcpt_tos),
                },
            },
        )
        self._on_spooled()
        return f"250 2.0.0 Ok: queued as {queue_id}"

    async def drain(self) -> None:
        """Wait until no message is half-way into the spool."""
        await self._idle.wait()
