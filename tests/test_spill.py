"""Messages bigger than the spill threshold, through the real front door: spilled to a file
of incoming/ as they arrive, spooled byte for byte, and the file gone whatever the outcome."""

from __future__ import annotations

import asyncio
import base64
import os
import smtplib
import socket
from pathlib import Path

from relay.accounts import Account, hash_password
from relay.smtpd.data import HEAD, SPILL_THRESHOLD
from relay.smtpd.senders import HEADER_LIMIT
from tests.helpers import (
    PASSWORD,
    CaptureServer,
    StartRelay,
    relay_settings,
    session,
    spooled_contents,
    untrusted,
    wait_for,
    with_smtp,
)

RCPT = "erin@example.org"
# An account that may send as shop.example only.
SHOP = Account("shop", hash_password(PASSWORD), ("shop.example",))
ATTACHMENT = base64.encodebytes(os.urandom(600_000)).replace(b"\n", b"\r\n")
DOTS = b"Hello\r\n.leading dot\r\n..two dots\r\n.\r\nafter a lone dot\r\n"


def big_message(sender: bytes = b"news@shop.example", headers: bytes = b"") -> bytes:
    """About 850 KB: a text part, a big attachment, and dotted lines on both sides of the
    spill threshold (smtplib stuffs them, the relay must unstuff them)."""
    message = (
        b"From: Shop <" + sender + b">\r\nTo: " + RCPT.encode() + b"\r\nSubject: big\r\n"
        + headers
        + b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain\r\n\r\n" + DOTS
        + b"--b1\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment; filename=catalogue.bin\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + ATTACHMENT
        + b"--b1\r\nContent-Type: text/plain\r\n\r\n" + DOTS + b"--b1--\r\n"
    )  # fmt: skip
    assert len(message) > SPILL_THRESHOLD
    return message


def send(port: int, message: bytes, *, login: str | None = None) -> tuple[int, bytes]:
    """The reply to the end of DATA. No SIZE declared at MAIL: the limits met are those
    of the data itself."""
    if login is None:
        client = smtplib.SMTP("127.0.0.1", port, timeout=30)
        client.ehlo("client.test")
    else:
        client = session(port, login=login)
    with client:
        assert client.mail("news@shop.example")[0] == 250
        assert client.rcpt(RCPT)[0] == 250
        return client.data(message)


def leftovers(data_dir: Path) -> list[str]:
    incoming = data_dir / "incoming"
    return os.listdir(incoming) if incoming.is_dir() else []


async def test_a_big_message_arrives_byte_identical_at_the_spool_and_downstream(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    downstream.handler.rcpt_replies[RCPT] = "451 4.3.0 Not yet"  # keep it in the spool
    relay = await start_relay(relay_settings(tmp_path, downstream.port))
    message = big_message()
    reply = await asyncio.to_thread(send, relay.addresses.smtp[1], message)
    assert reply[0] == 250, reply
    assert leftovers(tmp_path) == []
    assert await spooled_contents(tmp_path) == [message]

    del downstream.handler.rcpt_replies[RCPT]
    await wait_for(lambda: len(downstream.handler.messages) == 1, what="delivery")
    delivered = downstream.handler.messages[0].content
    # The attachment is never altered; the text parts are decorated, their lines kept.
    assert ATTACHMENT in delivered
    assert delivered.count(DOTS) == 2


async def test_verdicts_past_the_threshold_and_nothing_left_behind(
    tmp_path: Path, closed_port: int, start_relay: StartRelay
) -> None:
    settings = with_smtp(relay_settings(tmp_path, closed_port), max_message_size=1_000_000)
    relay = await start_relay(settings)
    port = relay.addresses.smtp[1]
    fine = b"Subject: x\r\n\r\n" + b"y" * 998 + b"\r\n"
    # aiosmtpd's limit: 1001 octets with the CRLF (smtp_data.MAX_LINE).
    long_line = fine * 400 + b"z" * 1000 + b"\r\n" + fine
    code, text = await asyncio.to_thread(send, port, long_line)
    assert code == 500 and text.startswith(b"5.5.2")
    assert leftovers(tmp_path) == []

    code, text = await asyncio.to_thread(send, port, fine * 1100)
    assert code == 552 and text.startswith(b"5.3.4")
    assert leftovers(tmp_path) == []

    # The longest line allowed and the size limit exactly: accepted.
    exact = fine * 900 + b"u" * 999 + b"\r\n"
    while len(exact) + 1000 <= 1_000_000:
        exact += b"w" * 998 + b"\r\n"
    exact += b"v" * (1_000_000 - len(exact) - 2) + b"\r\n"
    assert len(exact) == 1_000_000
    assert (await asyncio.to_thread(send, port, exact))[0] == 250
    assert leftovers(tmp_path) == []
    assert await spooled_contents(tmp_path) == [exact]


async def test_an_unwritable_spool_answers_451_and_the_file_goes(
    tmp_path: Path, closed_port: int, start_relay: StartRelay
) -> None:
    relay = await start_relay(relay_settings(tmp_path, closed_port))
    await relay.spool._db.write(lambda db: db.execute("PRAGMA query_only = ON"))
    code, text = await asyncio.to_thread(send, relay.addresses.smtp[1], big_message())
    assert code == 451 and text.startswith(b"4.3.0")
    assert leftovers(tmp_path) == []
    assert await spooled_contents(tmp_path) == []


async def test_a_client_that_leaves_mid_message_leaves_no_file(
    tmp_path: Path, closed_port: int, start_relay: StartRelay
) -> None:
    relay = await start_relay(relay_settings(tmp_path, closed_port))

    def start_message(port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        stream = sock.makefile("rb")

        def reply() -> bytes:
            while (line := stream.readline())[3:4] == b"-":
                pass
            return line

        reply()
        for command in (b"EHLO client.test", b"MAIL FROM:<news@shop.example>", b"DATA"):
            sock.sendall(command + b"\r\n")
            reply()
            if command.startswith(b"MAIL"):
                sock.sendall(f"RCPT TO:<{RCPT}>\r\n".encode())
                reply()
        sock.sendall(b"Subject: cut\r\n\r\n" + (b"x" * 998 + b"\r\n") * 400)
        return sock

    sock = await asyncio.to_thread(start_message, relay.addresses.smtp[1])
    try:
        await wait_for(lambda: leftovers(tmp_path) != [], what="the spill file")
        [name] = leftovers(tmp_path)
        assert (tmp_path / "incoming" / name).stat().st_mode & 0o777 == 0o600
    finally:
        sock.close()
    await wait_for(lambda: leftovers(tmp_path) == [], what="the file removed")
    assert await spooled_contents(tmp_path) == []


async def test_files_left_by_a_stopped_relay_are_removed_on_start(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "0123456789abcdef.msg").write_bytes(b"Subject: never acknowledged\r\n")
    await start_relay(relay_settings(tmp_path, None))
    assert leftovers(tmp_path) == []


async def test_the_from_check_of_an_account_reads_a_spilled_message(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    relay = await start_relay(untrusted(tmp_path, downstream.port, (SHOP,)))
    data_dir = tmp_path / "data"
    port = relay.addresses.smtp[1]
    # From in the head kept in memory.
    code, text = await asyncio.to_thread(send, port, big_message(b"ceo@bank.example"), login="shop")
    assert code == 550 and text.startswith(b"5.7.1")
    assert leftovers(data_dir) == []

    # A header section longer than that head: From is read from the file.
    padding = b"".join(b"X-Pad-%05d: %s\r\n" % (i, b"p" * 60) for i in range(1500))
    assert len(padding) > HEAD
    code, text = await asyncio.to_thread(
        send, port, big_message(b"ceo@bank.example", padding), login="shop"
    )
    assert code == 550 and text.startswith(b"5.7.1")
    assert leftovers(data_dir) == []
    assert relay.spool.waiting == 0

    own = big_message(b"news@shop.example", padding)
    assert (await asyncio.to_thread(send, port, own, login="shop"))[0] == 250
    assert leftovers(data_dir) == []
    await wait_for(lambda: len(downstream.handler.messages) == 1, what="delivery")

    # A header section too long to check is refused.
    huge = padding * (HEADER_LIMIT // len(padding) + 1)
    code, text = await asyncio.to_thread(
        send, port, big_message(b"news@shop.example", huge), login="shop"
    )
    assert code == 552 and text.startswith(b"5.3.4")
    assert leftovers(data_dir) == []


async def test_a_blocked_incoming_directory_answers_451_never_250(
    tmp_path: Path, closed_port: int, start_relay: StartRelay
) -> None:
    relay = await start_relay(relay_settings(tmp_path, closed_port))
    port = relay.addresses.smtp[1]
    # A file where the directory should be: the spill file cannot be made.
    (tmp_path / "incoming").write_bytes(b"")
    code, text = await asyncio.to_thread(send, port, big_message())
    assert code == 451 and text.startswith(b"4.3.0")
    assert await spooled_contents(tmp_path) == []
    # Small messages do not need it.
    small = b"Subject: small\r\n\r\nhello\r\n"
    assert (await asyncio.to_thread(send, port, small))[0] == 250
    (tmp_path / "incoming").unlink()
    assert (await asyncio.to_thread(send, port, big_message()))[0] == 250
    assert len(await spooled_contents(tmp_path)) == 2
