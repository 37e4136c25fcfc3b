"""Protocol edge cases of the front door, over raw sockets: what smtplib would never send.

STARTTLS as RFC 3207 §4.2 and §4.1 ask (what came before the handshake is forgotten, and
STARTTLS is not offered or taken again), DATA ended only by <CRLF>.<CRLF> (SMTP
smuggling: a bare LF or CR before the dot ends nothing), and the 535 of RFC 4954.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import pytest

from relay.accounts import Account, hash_password
from relay.app import Relay
from relay.smtpd.data import SPILL_THRESHOLD
from tests.helpers import (
    PASSWORD,
    CaptureServer,
    StartRelay,
    client_context,
    relay_settings,
    self_signed_files,
    spooled_contents,
    untrusted,
    with_smtp,
)

RCPT = "erin@example.org"


class RawClient:
    """One SMTP connection, bytes in and replies out, TLS when asked for."""

    def __init__(self, port: int) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            ("127.0.0.1", port), timeout=10
        )
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, list[bytes]]:
        """The next reply: its code and its lines' texts."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("the server closed the connection")
            lines.append(line[4:].rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def command(self, line: bytes) -> tuple[int, list[bytes]]:
        self.send(line + b"\r\n")
        return self.reply()

    def start_tls(self) -> None:
        self.file.close()
        self.sock = client_context().wrap_socket(self.sock)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
async def tls_relay(tmp_path: Path, closed_port: int, start_relay: StartRelay) -> Relay:
    """A relay that trusts loopback and offers STARTTLS; delivery is down, so what was
    accepted stays in the spool."""
    cert, key = self_signed_files(tmp_path, "relay")
    settings = with_smtp(relay_settings(tmp_path / "data", closed_port), tls_cert=cert, tls_key=key)
    return await start_relay(settings)


async def test_commands_pipelined_before_starttls_are_discarded(
    tls_relay: Relay, tmp_path: Path
) -> None:
    def converse() -> list[tuple[int, list[bytes]]]:
        client = RawClient(tls_relay.addresses.smtp[1])
        try:
            replies = [client.reply(), client.command(b"EHLO tool.test")]
            # An attacker on the path appends plain-text commands to the client's STARTTLS.
            client.send(
                b"STARTTLS\r\nMAIL FROM:<evil@attacker.example>\r\nRCPT TO:<x@y.example>\r\n"
            )
            replies.append(client.reply())
            client.start_tls()
            replies.append(client.command(b"EHLO tool.test"))
            # Had the injected MAIL been taken, this would be 250 and the next 503.
            replies.append(client.command(b"RCPT TO:<erin@example.org>"))
            replies.append(client.command(b"MAIL FROM:<news@shop.example>"))
            replies.append(client.command(b"QUIT"))
            return replies
        finally:
            client.close()

    replies = await asyncio.to_thread(converse)

    assert [code for code, _ in replies] == [220, 250, 220, 250, 503, 250, 221]
    assert b"STARTTLS" in replies[1][1]
    assert replies[4][1] == [b"5.5.1 Error: need MAIL command"]
    assert await spooled_contents(tmp_path / "data") == []


async def test_starttls_is_neither_offered_nor_taken_again_under_tls(tls_relay: Relay) -> None:
    def converse() -> list[tuple[int, list[bytes]]]:
        client = RawClient(tls_relay.addresses.smtp[1])
        try:
            client.reply()
            client.command(b"EHLO tool.test")
            assert client.command(b"STARTTLS")[0] == 220
            client.start_tls()
            replies = [client.command(b"EHLO tool.test"), client.command(b"STARTTLS")]
            replies.append(client.command(b"NOOP"))  # the TLS session still works
            return replies
        finally:
            client.close()

    ehlo, again, noop = await asyncio.to_thread(converse)

    assert ehlo[0] == 250 and b"STARTTLS" not in ehlo[1]
    assert again == (554, [b"5.5.1 Error: TLS already active"])
    assert noop[0] == 250


async def test_starttls_is_not_taken_on_the_implicit_tls_listener(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    relay = await start_relay(untrusted(tmp_path, downstream.port))
    assert relay.addresses.smtps is not None

    def converse() -> list[tuple[int, list[bytes]]]:
        client = RawClient(relay.addresses.smtps[1])  # type: ignore[index]
        try:
            client.start_tls()
            client.reply()
            return [client.command(b"EHLO tool.test"), client.command(b"STARTTLS")]
        finally:
            client.close()

    ehlo, starttls = await asyncio.to_thread(converse)

    assert ehlo[0] == 250 and b"STARTTLS" not in ehlo[1]
    assert starttls == (554, [b"5.5.1 Error: TLS already active"])


SMUGGLED = b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"


@pytest.mark.parametrize("marker", [b"\n.\r\n", b"\r.\r\n"], ids=["LF.CRLF", "CR.CRLF"])
@pytest.mark.parametrize("big", [False, True], ids=["in memory", "spilled"])
async def test_only_crlf_dot_crlf_ends_data(
    tmp_path: Path, closed_port: int, start_relay: StartRelay, marker: bytes, big: bool
) -> None:
    relay = await start_relay(relay_settings(tmp_path, closed_port))
    padding = b"x" * 900 + b"\r\n"
    body = padding * (SPILL_THRESHOLD // len(padding) + 1) if big else b"Hello\r\n"
    content = b"From: news@shop.example\r\nSubject: smuggle\r\n\r\n" + body + b"first" + marker
    content += SMUGGLED + b"Subject: smuggled\r\n\r\nsecond\r\n.\r\n"

    def converse() -> list[tuple[int, list[bytes]]]:
        client = RawClient(relay.addresses.smtp[1])
        try:
            client.reply()
            client.command(b"EHLO tool.test")
            client.send(b"MAIL FROM:<news@shop.example>\r\nRCPT TO:<erin@example.org>\r\n")
            replies = [client.reply(), client.reply(), client.command(b"DATA")]
            client.send(content)
            replies.append(client.reply())
            replies.append(client.command(b"QUIT"))  # no reply to a smuggled command before
            return replies
        finally:
            client.close()

    replies = await asyncio.to_thread(converse)

    assert [code for code, _ in replies] == [250, 250, 354, 250, 221]
    [stored] = await spooled_contents(tmp_path)
    assert stored.endswith(b"first" + marker + SMUGGLED + b"Subject: smuggled\r\n\r\nsecond\r\n")


async def test_a_wrong_password_gets_535_5_7_8(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    account = Account("mautic", hash_password(PASSWORD), ("shop.example",))
    relay = await start_relay(untrusted(tmp_path, downstream.port, (account,)))

    def converse() -> tuple[int, list[bytes]]:
        client = RawClient(relay.addresses.smtp[1])
        try:
            client.reply()
            client.command(b"EHLO tool.test")
            client.command(b"STARTTLS")
            client.start_tls()
            client.command(b"EHLO tool.test")
            return client.command(b"AUTH PLAIN AG1hdXRpYwB3cm9uZw==")  # mautic / wrong
        finally:
            client.close()

    assert await asyncio.to_thread(converse) == (
        535,
        [b"5.7.8 Authentication credentials invalid"],
    )


async def test_help_names_every_command_the_session_takes(tls_relay: Relay) -> None:
    def converse() -> list[tuple[int, list[bytes]]]:
        client = RawClient(tls_relay.addresses.smtp[1])
        try:
            client.reply()
            client.command(b"EHLO tool.test")
            return [client.command(b"HELP"), client.command(b"HELP MAIL")]
        finally:
            client.close()

    everything, mail = await asyncio.to_thread(converse)

    assert everything[0] == 250
    named = everything[1][0].removeprefix(b"Supported commands: ").split()
    assert {b"DATA", b"MAIL", b"RCPT", b"STARTTLS", b"AUTH"} <= set(named)
    assert mail == (250, [b"Syntax: MAIL FROM: <address> [SP <mail-parameters>]"])
