"""Handing one personalised copy to the next hop: a one-method interface, two transports."""

from __future__ import annotations

import asyncio
import os
import secrets
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from suppression import fsync_directory

from ..mime import headers_of
from ..settings import Downstream
from .client import ConnectionLost, SmtpClientError, SmtpConnection, unverified_tls


class Status(StrEnum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"  # try again later: 4xx, connection trouble
    BOUNCED = "bounced"  # permanent: 5xx


@dataclass(frozen=True, slots=True)
class Outgoing:
    queue_id: str
    mail_from: str
    recipient: str
    content: bytes
    # Rendered for a next hop without 8BITMIME: 8-bit left in it cannot be converted.
    seven_bit: bool = False
    # `content` has CRLF line breaks only and ends in one (relay.mime.smtp_lines): a
    # personalised copy is made so, once, as its DKIM signature covers it.
    smtp_form: bool = False


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Status
    reply: str
    reached: bool = True  # False: the next hop never answered (down, refused, timed out)
    # The next hop lacks 8BITMIME and the copy was rendered 8-bit: render it 7-bit, send again.
    needs_seven_bit: bool = False


class Transport(Protocol):
    # Whether the next hop takes 8-bit content (8BITMIME); copies are rendered to suit it.
    eight_bit_ok: bool

    async def send(self, message: Outgoing) -> Outcome: ...

    async def close(self) -> None: ...

    def describe(self) -> str: ...


def _no_seven_bit(next_hop: str, message: Outgoing) -> str:
    """Why a copy that is still 8-bit after a 7-bit rendering cannot go to `next_hop`."""
    if not headers_of(message.content).isascii():
        what = "its header fields are 8-bit (raw UTF-8 needs SMTPUTF8, RFC 6532)"
    else:
        what = "it has 8-bit content the relay must not re-encode (signed or encrypted parts)"
    return (
        f"554 5.6.3 {next_hop} does not accept 8-bit data (no 8BITMIME) and this message"
        f" cannot be converted to 7-bit: {what}"
    )


def _status_for(code: int) -> Status:
    if 200 <= code < 300:
        return Status.DELIVERED
    return Status.BOUNCED if 500 <= code < 600 else Status.DEFERRED


def _refused(code: int) -> Status:
    """A refusal before the data was sent is never a delivery, whatever its code."""
    return Status.BOUNCED if 500 <= code < 600 else Status.DEFERRED


class SmtpTransport:
    """Delivers over SMTP to the downstream MTA, reusing a small pool of connections."""

    def __init__(
        self,
        downstream: Downstream,
        *,
        pool_size: int,
        timeout: float,
        local_hostname: str,
        require_tls: bool = False,
    ) -> None:
        self.downstream = downstream
        self._require_tls = require_tls
        self.eight_bit_ok = True  # until an EHLO says otherwise
        self._timeout = timeout
        self._local_hostname = local_hostname
        self._idle: list[SmtpConnection] = []
        self._tls = unverified_tls()
        self._slots = asyncio.Semaphore(pool_size)

    def describe(self) -> str:
        return self.downstream.address

    async def send(self, message: Outgoing) -> Outcome:
        async with self._slots:
            reused = bool(self._idle)
            try:
                client = self._idle.pop() if reused else await self._connect()
            except (SmtpClientError, OSError, TimeoutError) as exc:
                return self._unreachable(exc)
            outcome, keep = await self._transact(client, message)
            if keep is None and reused:
                # The server dropped an idle connection: that says nothing about this message.
                client.close()
                try:
                    client = await self._connect()
                except (SmtpClientError, OSError, TimeoutError) as exc:
                    return self._unreachable(exc)
                outcome, keep = await self._transact(client, message)
            if keep:
                self._idle.append(client)
            else:
                client.close()
            return outcome

    def _unreachable(self, exc: BaseException) -> Outcome:
        return Outcome(
            Status.DEFERRED, f"connect to {self.describe()} failed: {exc}", reached=False
        )

    async def _connect(self) -> SmtpConnection:
        connection = await SmtpConnection.open(
            self.downstream.host,
            self.downstream.port,
            local_hostname=self._local_hostname,
            reply_timeout=self._timeout,
            implicit_tls=self.downstream.implicit_tls,
            require_tls=self._require_tls,
            tls=self._tls,
        )
        self.eight_bit_ok = connection.supports("8bitmime")
        return connection

    async def _transact(
        self, connection: SmtpConnection, message: Outgoing
    ) -> tuple[Outcome, bool | None]:
        """The outcome and whether the connection can be reused (None: it was lost)."""
        options = []
        if not message.content.isascii():
            if not connection.supports("8bitmime"):
                if not message.seven_bit:
                    # Rendered before this server's EHLO was known: the worker renders again.
                    why = f"{self.describe()} lacks 8BITMIME; rendering the copy 7-bit"
                    return Outcome(Status.DEFERRED, why, needs_seven_bit=True), True
                return Outcome(Status.BOUNCED, _no_seven_bit(self.describe(), message)), True
            options.append("BODY=8BITMIME")
        if not (message.mail_from.isascii() and message.recipient.isascii()):
            if not connection.supports("smtputf8"):
                why = f"553 5.6.7 {self.describe()} does not offer SMTPUTF8 for this address"
                return Outcome(Status.BOUNCED, why), True
            options.append("SMTPUTF8")
        try:
            reply, stage = await connection.send(
                message.mail_from,
                message.recipient,
                message.content,
                options,
                smtp_form=message.smtp_form,
            )
        except ConnectionLost as exc:
            return Outcome(Status.DEFERRED, f"lost connection to {self.describe()}: {exc}"), None
        except (SmtpClientError, OSError, TimeoutError, ValueError) as exc:
            failure = str(exc) or type(exc).__name__
            reply_text = f"conversation with {self.describe()} failed: {failure}"
            return Outcome(Status.DEFERRED, reply_text), False
        if stage == "sent":
            return Outcome(_status_for(reply.code), str(reply)), True
        return Outcome(_refused(reply.code), str(reply)), await self._reset(connection)

    @staticmethod
    async def _reset(connection: SmtpConnection) -> bool:
        """After a refusal: whether the connection is still fit for the next message."""
        try:
            await connection.reset()
        except (SmtpClientError, OSError, TimeoutError):
            return False
        return True

    async def close(self) -> None:
        while self._idle:
            connection = self._idle.pop()
            try:
                await connection.quit()
            except (SmtpClientError, OSError, TimeoutError):
                connection.close()


def outbox_name(directory: Path) -> str:
    return f"outbox:{directory}"


class OutboxTransport:
    """Final delivery into a folder of .eml files, for running without a downstream MTA."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.eight_bit_ok = True

    def describe(self) -> str:
        return outbox_name(self.directory)

    async def send(self, message: Outgoing) -> Outcome:
        try:
            path = await asyncio.to_thread(self._write, message)
        except OSError as exc:
            return Outcome(Status.DEFERRED, f"cannot write to {self.directory}: {exc.strerror}")
        return Outcome(Status.DELIVERED, f"250 2.0.0 written to {path.name}")

    def _write(self, message: Outgoing) -> Path:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = f"{message.queue_id}-{secrets.token_hex(4)}.eml"
        temporary = self.directory / f".{name}.tmp"
        # Final delivery adds the envelope as Postfix's local delivery does.
        envelope = (
            f"Return-Path: <{message.mail_from}>\r\nX-Original-To: {message.recipient}\r\n"
        ).encode()
        # A copy names its recipient: owner-only, as every file in the data dir.
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(envelope)
            file.write(message.content)
            file.flush()
            os.fsync(file.fileno())
        final = self.directory / name
        os.replace(temporary, final)
        fsync_directory(self.directory)
        return final

    async def close(self) -> None:
        return None
