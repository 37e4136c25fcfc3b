"""The delivery side's SMTP client against real servers on loopback: aiosmtpd (as in every
other test), and a strict scripted server that answers nothing until the client has sent
MAIL, RCPT and DATA in one go, which only a pipelining client survives (RFC 2920)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relay.delivery.client import SmtpConnection, TlsUnavailable, dot_stuffed
from relay.delivery.transport import Outgoing, SmtpTransport, Status
from relay.mime import smtp_lines
from relay.settings import Downstream
from tests.helpers import CaptureServer, StartDownstream, self_signed_context

MESSAGE = b"From: news@shop.example\r\nSubject: hi\r\n\r\n.starts with a dot\r\n..two\r\nend\r\n"


@dataclass
class PipeliningOnly:
    """Answers the transaction's three commands only once all three have arrived: a client
    that waits for each reply before the next command waits forever."""

    rcpt_reply: bytes = b"250 2.1.5 Ok"
    stall_after_mail: bool = False  # answer MAIL, then nothing more
    lines: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    sessions: list[asyncio.StreamWriter] = field(default_factory=list)

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions.append(writer)
        writer.write(b"220 strict.test ESMTP\r\n")
        while line := await reader.readline():
            self.lines.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(
                    b"250-strict.test\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250 8BITMIME\r\n"
                )
            elif verb == b"MAIL":
                rcpt, data = await reader.readline(), await reader.readline()
                self.lines += [rcpt, data]
                if not (rcpt.startswith(b"RCPT") and data == b"DATA\r\n"):
                    writer.write(b"503 5.5.1 pipeline MAIL, RCPT and DATA\r\n")
                    continue
                if self.stall_after_mail:
                    writer.write(b"250 2.1.0 Ok\r\n")
                    await reader.read()  # until the client gives up and closes
                    break
                refused = not self.rcpt_reply.startswith(b"2")
                writer.write(b"250 2.1.0 Ok\r\n" + self.rcpt_reply + b"\r\n")
                if refused:
                    writer.write(b"554 5.5.1 no valid recipients\r\n")
                    continue
                writer.write(b"354 go ahead\r\n")
                body = bytearray()
                while (chunk := await reader.readline()) != b".\r\n":
                    body += chunk
                self.messages.append(bytes(body))
                writer.write(b"250 2.0.0 Ok: queued\r\n")
            elif verb == b"RSET":
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                break
            else:
                writer.write(b"502 5.5.2 what\r\n")
        writer.close()


@pytest.fixture
async def strict() -> AsyncIterator[tuple[PipeliningOnly, int]]:
    server_state = PipeliningOnly()
    server = await asyncio.start_server(server_state.session, "127.0.0.1", 0)
    try:
        yield server_state, server.sockets[0].getsockname()[1]
    finally:
        server.close()


def transport_to(port: int) -> SmtpTransport:
    return SmtpTransport(
        Downstream("127.0.0.1", port), pool_size=1, timeout=5, local_hostname="relay.test"
    )


async def connect(port: int, **options: bool) -> SmtpConnection:
    return await SmtpConnection.open(
        "127.0.0.1", port, local_hostname="relay.test", reply_timeout=5, **options
    )


async def test_a_pipelining_server_gets_the_transaction_in_one_go(
    strict: tuple[PipeliningOnly, int],
) -> None:
    server, port = strict
    connection = await connect(port)
    try:
        reply, stage = await connection.send("news@shop.example", "ann@example.org", MESSAGE)
        assert (reply.code, stage) == (250, "sent")
        # RFC 1870: SIZE counts the CRLFs and not the stuffing dots.
        assert server.lines[1] == f"MAIL FROM:<news@shop.example> SIZE={len(MESSAGE)}\r\n".encode()
        assert server.messages == [dot_stuffed(MESSAGE)]
        assert dot_stuffed(MESSAGE).count(b"\r\n..") == 2
        # The connection carries a second message.
        reply, stage = await connection.send("", "bob@example.org", MESSAGE)
        assert (reply.code, stage) == (250, "sent")
        assert server.lines[-3].startswith(b"MAIL FROM:<> SIZE=")
    finally:
        await connection.quit()


async def test_a_server_that_stops_answering_mid_pipeline_defers_the_copy(
    strict: tuple[PipeliningOnly, int],
) -> None:
    """Each of the pipelined replies is waited for within the timeout, the second too."""
    server, port = strict
    server.stall_after_mail = True
    transport = SmtpTransport(
        Downstream("127.0.0.1", port), pool_size=1, timeout=0.5, local_hostname="relay.test"
    )
    try:
        async with asyncio.timeout(60):  # a client without a timer there would wait forever
            outcome = await transport.send(
                Outgoing("Q1", "news@shop.example", "ann@example.org", MESSAGE)
            )
    finally:
        await transport.close()
    assert outcome.status is Status.DEFERRED
    assert "TimeoutError" in outcome.reply
    assert server.messages == []


async def test_a_refused_recipient_is_reported_and_the_connection_goes_on(
    strict: tuple[PipeliningOnly, int],
) -> None:
    server, port = strict
    server.rcpt_reply = b"550 5.1.1 <gone@example.org>: no such user"
    transport = transport_to(port)
    try:
        outcome = await transport.send(
            Outgoing("Q1", "news@shop.example", "gone@example.org", MESSAGE)
        )
        assert outcome.status is Status.BOUNCED
        assert outcome.reply == "550 5.1.1 <gone@example.org>: no such user"
        server.rcpt_reply = b"250 2.1.5 Ok"
        outcome = await transport.send(
            Outgoing("Q2", "news@shop.example", "ann@example.org", MESSAGE)
        )
        assert outcome.status is Status.DELIVERED
        assert [line[:4] for line in server.lines].count(b"EHLO") == 1  # one connection
        assert b"RSET\r\n" in server.lines
    finally:
        await transport.close()


@pytest.mark.parametrize("pipelining", [True, False])
async def test_aiosmtpd_receives_the_message_as_smtp_carries_it(
    pipelining: bool, start_downstream: StartDownstream
) -> None:
    capture = await start_downstream(pipelining=pipelining)
    connection = await connect(capture.port)
    try:
        assert connection.supports("pipelining") is pipelining
        bare_line_breaks = b"Subject: lf\n\n.dot first\nlast line without a break"
        reply, stage = await connection.send(
            "news@shop.example", "ann@example.org", bare_line_breaks
        )
        assert (reply.code, stage) == (250, "sent")
        [captured] = capture.handler.messages
        assert captured.content == smtp_lines(bare_line_breaks)
        assert captured.content == b"Subject: lf\r\n\r\n.dot first\r\nlast line without a break\r\n"
    finally:
        await connection.quit()


async def test_starttls_is_used_when_offered_and_refusals_come_back_by_stage(
    tmp_path: Path, start_downstream: StartDownstream
) -> None:
    capture = await start_downstream(tls=self_signed_context(tmp_path))
    capture.handler.rcpt_replies["full@example.org"] = "452 4.2.2 mailbox full"
    connection = await connect(capture.port)
    try:
        assert connection.encrypted
        reply, stage = await connection.send("news@shop.example", "full@example.org", MESSAGE)
        assert (reply.code, stage) == (452, "rcpt")
        await connection.reset()
        reply, stage = await connection.send("news@shop.example", "ann@example.org", MESSAGE)
        assert (reply.code, stage) == (250, "sent")
        assert capture.handler.messages[0].encrypted
    finally:
        await connection.quit()


async def test_required_tls_without_starttls_is_refused_before_any_mail(
    downstream: CaptureServer,
) -> None:
    with pytest.raises(TlsUnavailable):
        await connect(downstream.port, require_tls=True)
    assert downstream.handler.messages == []


async def test_a_temporary_refusal_defers(strict: tuple[PipeliningOnly, int]) -> None:
    server, port = strict
    transport = transport_to(port)
    server.rcpt_reply = b"451 4.3.2 try later"
    try:
        outcome = await transport.send(
            Outgoing("Q1", "news@shop.example", "ann@example.org", MESSAGE)
        )
        assert (outcome.status, outcome.reply) == (Status.DEFERRED, "451 4.3.2 try later")
    finally:
        await transport.close()


async def test_a_pooled_connection_the_server_dropped_is_replaced(
    strict: tuple[PipeliningOnly, int],
) -> None:
    server, port = strict
    transport = transport_to(port)
    try:
        first = Outgoing("Q1", "news@shop.example", "ann@example.org", MESSAGE)
        assert (await transport.send(first)).status is Status.DELIVERED
        server.sessions[0].close()  # an idle timeout on the server's side
        await server.sessions[0].wait_closed()
        second = Outgoing("Q2", "news@shop.example", "bob@example.org", MESSAGE)
        outcome = await transport.send(second)
        assert outcome.status is Status.DELIVERED, outcome.reply
        assert len(server.sessions) == 2 and len(server.messages) == 2
    finally:
        await transport.close()
