"""The SMTP front door: who may submit, who may receive, and 250 only once it is on disk."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Mapping
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from suppression import (
    STOPS_TRANSACTIONAL,
    InvalidAddress,
    StorageUnavailable,
    Suppression,
    SuppressionStore,
    sender_scopes,
)
from tracking.events import Event, EventStore, EventType

from ..accounts import Account
from ..logs import client_name
from ..mime import MimeLimits, address_domain
from ..settings import IPNetwork, SmtpSettings
from ..spool import Spilled, Spool
from .data import DataProblem
from .senders import header_refusal, structure_refusal
from .server import RelayEnvelope

log = logging.getLogger("optout.smtp")

# Put at the top of transactional mail as it arrives: the pipeline reads this control
# header (and removes it, as every X-Optout-* header, before delivery).
TRANSACTIONAL_HEADER = b"X-Optout-Category: transactional\r\n"


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


def helo_name(session: Session) -> str:
    return session.host_name or ""


def received_from(session: Session) -> str:
    """`HELO[IP]`, as the spool keeps the client for the relay's Received field."""
    return f"{session.host_name or 'unknown'}[{session.peer[0] if session.peer else '?'}]"


def envelope_sender(mail_from: str | None) -> str:
    """MAIL FROM's address; "" for the null sender, which aiosmtpd keeps as "<>"."""
    return "" if mail_from in (None, "<>") else mail_from


def _log_reject(
    session: Session,
    command: str,
    reply: str,
    *,
    mail_from: str | None,
    to: str | None = None,
    level: int = logging.INFO,
) -> None:
    """Postfix's NOQUEUE reject line: `NOQUEUE: reject: RCPT from unknown[IP]: REPLY;
    from=<...> to=<...> helo=<...>`."""
    sender = envelope_sender(mail_from)
    recipient = "" if to is None else f" to=<{to}>"
    log.log(
        level,
        "NOQUEUE: reject: %s from %s: %s; from=<%s>%s helo=<%s>",
        command,
        client_name(session),
        reply,
        sender,
        recipient,
        helo_name(session),
        extra={
            "fields": {
                "client": client_name(session),
                "helo": helo_name(session),
                "from": sender,
                **({} if to is None else {"to": to}),
                "reply": reply,
            }
        },
    )


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
        events: EventStore | None = None,
        transactional: bool = False,
        mime_limits: MimeLimits | None = None,
    ) -> None:
        """`transactional`: every message of this listener is transactional mail (else
        only an account's of `category = "transactional"`)."""
        self._accounts = dict(accounts or {})
        self._events = events
        self._transactional = transactional
        self._mime_limits = mime_limits or MimeLimits()
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
            reply = "530 5.7.0 Authentication required"
            _log_reject(session, "MAIL", f"{reply} (not a trusted network)", mail_from=address)
            return reply
        account = self._account(session)
        if (
            account is not None
            and address != "<>"
            and not account.may_send_as(address_domain(address))
        ):
            reply = f"550 5.7.1 <{address}>: Sender address not allowed for this account"
            _log_reject(session, "MAIL", f"{reply} ({account.username})", mail_from=address)
            return reply
        if self._spool.waiting >= self._max_queued:
            reply = "451 4.3.1 Mail system full, try again later"
            why = f"{reply} (spool holds {self._spool.waiting} messages)"
            _log_reject(session, "MAIL", why, mail_from=address, level=logging.WARNING)
            return reply
        if isinstance(envelope, RelayEnvelope) and (
            self._transactional or (account is not None and account.category == "transactional")
        ):
            # Known before RCPT, where it decides which opt-outs refuse a recipient.
            envelope.transactional = True
            envelope.prefix = TRANSACTIONAL_HEADER
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
        except StorageUnavailable:
            # Never a guess: try later. The store said why, once, as it became unreachable.
            return "451 4.3.0 Suppression list unavailable, try again later"
        except Exception:
            log.exception("suppression lookup failed")
            return "451 4.3.0 Suppression list unavailable, try again later"
        if (
            suppressed is not None
            and isinstance(envelope, RelayEnvelope)
            and envelope.transactional
            and suppressed.reason not in STOPS_TRANSACTIONAL
        ):
            suppressed = None  # an opt-out of marketing mail: a receipt still goes
        if suppressed is not None:
            reply = f"550 5.7.1 <{address}>: Recipient has opted out of this sender's mail"
            why = f"{reply} ({suppressed.reason} in {suppressed.scope})"
            _log_reject(session, "RCPT", why, mail_from=envelope.mail_from, to=address)
            await self._record_refusal(session, address, suppressed)
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def _record_refusal(
        self, session: Session, address: str, suppression: Suppression
    ) -> None:
        """A `refused` event: which recipient (by keyed hash), why, and for whom. A failed
        write is logged; the refusal stands."""
        if self._events is None:
            return
        detail = {"scope": suppression.scope, "reason": suppression.reason}
        username = _username(session)
        if username is not None:
            detail["account"] = username
        try:
            address_hash = self._suppressions.hasher.hash(address)
            await self._events.record(Event(EventType.REFUSED, address_hash, detail=detail))
        except Exception:
            log.exception("cannot record the refusal of a recipient")

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        message = received_message(envelope)
        account = self._account(session)
        refusal = await header_refusal(
            account,
            message,
            client=client_name(session),
            mail_from=envelope_sender(envelope.mail_from),
        )
        if refusal is not None:
            return refusal
        refusal = await structure_refusal(
            message,
            self._mime_limits,
            client=client_name(session),
            mail_from=envelope_sender(envelope.mail_from),
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
        self._accepting += 1
        self._idle.clear()
        try:
            return await self._spool.accept(
                envelope_sender(envelope.mail_from),
                list(envelope.rcpt_tos),
                message,
                received_from(session),
                account=None if account is None else account.username,
            )
        except Exception as exc:
            sender = envelope_sender(envelope.mail_from)
            log.error("NOQUEUE: cannot spool message from=<%s>: %s", sender, exc)
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
    username = _username(session)
    sender = envelope_sender(envelope.mail_from)
    log.info(
        "client=%s, helo=<%s>%s, from=<%s>, size=%d, nrcpt=%d (queued)",
        client_name(session),
        helo_name(session),
        "" if username is None else f", sasl_username={username}",
        sender,
        size,
        len(envelope.rcpt_tos),
        extra={
            "queue_id": queue_id,
            "fields": {
                "client": client_name(session),
                "helo": helo_name(session),
                **({} if username is None else {"sasl_username": username}),
                "from": sender,
                "size": size,
                "nrcpt": len(envelope.rcpt_tos),
            },
        },
    )
