"""The SMTP front door: who may submit, who may receive, and 250 only once it is on disk."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Mapping
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from suppression import InvalidAddress, SuppressionStore, sender_scopes

from ..accounts import Account
from ..mime import address_domain
from ..settings import IPNetwork, SmtpSettings
from ..spool import Spilled, Spool
from .data import DataProblem
from .senders import header_refusal
from .server import RelayEnvelope

log = logging.getLogger("optout.smtp")


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


def _username(session: Session) -> str | None:
    """The account a session logged in as (RelaySMTP puts the username in auth_data)."""
    if session.authenticated and isinstance(session.auth_data, str):
        return session.auth_data
    return None


def _client(session: Session) -> str:
    return f"{session.host_name or 'unknown'}[{session.peer[0] if session.peer else '?'}]"


def received_message(envelope: Envelope) -> bytes | Spilled:
    """What DATA brought: in memory, or the file it was spilled to."""
    if isinstance(envelope, RelayEnvelope) and envelope.spilled is not None:
        return envelope.spilled
    content: Any = envelope.original_content
    assert isinstance(content, bytes)
    return content


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
        accounts: Mapping[str, Account] | None = None,
    ) -> None:
        self._accounts = dict(accounts or {})
        self._max_queued = max_queued_messages
        self._spool = spool
        self._suppressions = suppressions
        self._trusted: tuple[IPNetwork, ...] = settings.trusted_networks
        self._max_recipients = settings.max_recipients
        self._on_spooled = on_spooled
        self._accepting = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def _account(self, session: Session) -> Account | None:
        username = _username(session)
        return None if username is None else self._accounts.get(username)

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
        account = self._account(session)
        if (
            account is not None
            and address != "<>"
            and not account.may_send_as(address_domain(address))
        ):
            log.info(
                "NOQUEUE: reject: MAIL from %s: 550 5.7.1 %s may not send as <%s>",
                _client(session),
                account.username,
                address,
            )
            return f"550 5.7.1 <{address}>: Sender address not allowed for this account"
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
            suppressed = await self._suppressions.check(
                address, sender_scopes(envelope.mail_from, _username(session))
            )
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
        message = received_message(envelope)
        account = self._account(session)
        refusal = await header_refusal(
            account, message, client=_client(session), mail_from=envelope.mail_from or ""
        )
        if refusal is not None:
            return refusal
        queue_id = await self._spool_message(session, envelope, message, account)
        if queue_id is None:
            return DataProblem.CANNOT_STORE.value
        _log_queued(session, envelope, message, queue_id)
        self._on_spooled()
        return f"250 2.0.0 Ok: queued as {queue_id}"

    async def _spool_message(
        self,
        session: Session,
        envelope: Envelope,
        message: bytes | Spilled,
        account: Account | None,
    ) -> str | None:
        """The message's queue id once the spool has it durably; None (logged) if it could
        not take it. Counted while it runs, so that `drain` waits for its reply."""
        # aiosmtpd keeps the null sender (RFC 5321 §4.5.5) as "<>"; the spool stores "".
        sender = "" if envelope.mail_from in (None, "<>") else envelope.mail_from
        self._accepting += 1
        self._idle.clear()
        try:
            return await self._spool.accept(
                sender,
                list(envelope.rcpt_tos),
                message,
                _client(session),
                account=None if account is None else account.username,
            )
        except Exception as exc:
            log.error("NOQUEUE: cannot spool message from=<%s>: %s", envelope.mail_from, exc)
            return None
        finally:
            self._accepting -= 1
            if not self._accepting:
                self._idle.set()

    async def drain(self) -> None:
        """Wait until no message is half-way into the spool."""
        await self._idle.wait()


def _log_queued(
    session: Session, envelope: Envelope, message: bytes | Spilled, queue_id: str
) -> None:
    size = len(message) if isinstance(message, bytes) else message.size
    log.info(
        "client=%s, from=<%s>, size=%d, nrcpt=%d (queued)",
        _client(session),
        envelope.mail_from,
        size,
        len(envelope.rcpt_tos),
        extra={
            "queue_id": queue_id,
            "fields": {
                "client": _client(session),
                "from": envelope.mail_from,
                "size": size,
                "nrcpt": len(envelope.rcpt_tos),
            },
        },
    )
