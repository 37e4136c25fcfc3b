"""The SMTP front door, driven with the stdlib client as a marketing tool would."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import smtplib
from pathlib import Path

import pytest

from relay.app import Relay
from tests.helpers import (
    StartRelay,
    asubmit,
    events_of,
    newsletter,
    relay_settings,
    spool_depth,
    spooled_contents,
    wait_for,
    with_delivery,
    with_smtp,
)

RCPT = "erin@example.org"


async def spooled_messages(data_dir: Path) -> int:
    """Messages in the spool, read through a spool of its own, as a restarted relay would."""
    messages, _ = await spool_depth(data_dir)
    return messages


def converse(port: int, *commands: bytes) -> list[tuple[int, bytes]]:
    """Speak raw SMTP, one command at a time; every reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        replies = []
        for command in commands:
            if command.startswith(b"DATA\r\n"):
                code, text = client.docmd("DATA")
                replies.append((code, text))
                if code == 354:
                    client.send(command[len(b"DATA\r\n") :])
                    replies.append(client.getreply())
            else:
                replies.append(client.docmd(command.decode()))
        return replies


async def test_250_only_after_the_message_is_in_the_spool(
    tmp_path: Path, closed_port: int, start_relay: StartRelay
) -> None:
    relay = await start_relay(relay_settings(tmp_path, closed_port))
    result = await asubmit(relay.addresses.smtp[1], newsletter([RCPT]), "news@shop.example", [RCPT])
    assert result.refused == {}
    # Read by another connection, as a restarted process would.
    assert await spooled_messages(tmp_path) == 1


async def test_untrusted_client_needs_authentication(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    settings = with_smtp(
        relay_settings(tmp_path, None), trusted_networks=(ipaddress.ip_network("192.0.2.0/24"),)
    )
    relay = await start_relay(settings)
    replies = await asyncio.to_thread(
        converse, relay.addresses.smtp[1], b"MAIL FROM:<news@shop.example>"
    )
    assert replies[0][0] == 530
    assert replies[0][1].startswith(b"5.7.0")
    assert await spooled_messages(tmp_path) == 0


async def test_too_many_recipients_get_452(tmp_path: Path, start_relay: StartRelay) -> None:
    relay = await start_relay(with_smtp(relay_settings(tmp_path, None), max_recipients=2))
    replies = await asyncio.to_thread(
        converse,
        relay.addresses.smtp[1],
        b"MAIL FROM:<news@shop.example>",
        b"RCPT TO:<a@example.org>",
        b"RCPT TO:<b@example.org>",
        b"RCPT TO:<c@example.org>",
    )
    assert [code for code, _ in replies] == [250, 250, 250, 452]
    assert replies[3][1].startswith(b"4.5.3")


async def test_oversized_messages_get_552_declared_or_not(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    relay = await start_relay(with_smtp(relay_settings(tmp_path, None), max_message_size=2000))
    port = relay.addresses.smtp[1]
    declared = await asyncio.to_thread(converse, port, b"MAIL FROM:<news@shop.example> SIZE=5000")
    assert declared[0][0] == 552
    assert declared[0][1].startswith(b"5.3.4")
    big = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n"
    actual = await asyncio.to_thread(
        converse,
        port,
        b"MAIL FROM:<news@shop.example>",
        f"RCPT TO:<{RCPT}>".encode(),
        b"DATA\r\n" + big * 50 + b".\r\n",
    )
    assert actual[-1][0] == 552
    assert actual[-1][1].startswith(b"5.3.4")
    assert await spooled_messages(tmp_path) == 0


async def test_unwritable_spool_answers_451_never_250(
    tmp_path: Path, closed_port: int, start_relay: StartRelay
) -> None:
    relay = await start_relay(relay_settings(tmp_path, closed_port))
    port = relay.addresses.smtp[1]
    # The spool's own SQLite connection turned read-only, as on a read-only filesystem.
    await relay.spool._db.write(lambda db: db.execute("PRAGMA query_only = ON"))
    refused = await asubmit(port, newsletter([RCPT]), "news@shop.example", [RCPT])
    assert refused.reply is not None
    assert refused.reply[0] == 451
    assert refused.reply[1].startswith(b"4.3.0")
    assert await spooled_messages(tmp_path) == 0


async def test_bare_lf_dot_does_not_end_data(
    tmp_path: Path, closed_port: int, start_relay: StartRelay
) -> None:
    relay = await start_relay(relay_settings(tmp_path, closed_port))
    content = b"Subject: smuggle\r\n\r\nfirst\n.\nMAIL FROM:<evil@x>\r\n.\r\n"
    replies = await asyncio.to_thread(
        converse,
        relay.addresses.smtp[1],
        b"MAIL FROM:<news@shop.example>",
        f"RCPT TO:<{RCPT}>".encode(),
        b"DATA\r\n" + content,
    )
    assert replies[-1][0] == 250
    [stored] = await spooled_contents(tmp_path)
    assert b"first\n.\nMAIL FROM:<evil@x>" in stored


async def test_bad_recipient_syntax_is_refused(tmp_path: Path, start_relay: StartRelay) -> None:
    relay = await start_relay(relay_settings(tmp_path, None))
    replies = await asyncio.to_thread(
        converse,
        relay.addresses.smtp[1],
        b"MAIL FROM:<news@shop.example>",
        b"RCPT TO:<no-at-sign>",
    )
    assert replies[1][0] in (501, 553)


async def test_a_full_spool_pushes_back_with_451(
    tmp_path: Path, closed_port: int, start_relay: StartRelay
) -> None:
    settings = with_delivery(relay_settings(tmp_path, closed_port), max_queued_messages=2)
    relay = await start_relay(settings)
    port = relay.addresses.smtp[1]
    for _ in range(2):
        accepted = await asubmit(port, newsletter([RCPT]), "news@shop.example", [RCPT])
        assert accepted.error is None
    refused = await asubmit(port, newsletter([RCPT]), "news@shop.example", [RCPT])
    assert refused.reply is not None
    assert refused.reply[0] == 451
    assert refused.reply[1].startswith(b"4.3.1")
    assert await spooled_messages(tmp_path) == 2
    # Room again once a message leaves the spool.
    [entry, _] = await relay.spool.entries()
    await relay.spool.delete(entry.queue_id)
    again = await asubmit(port, newsletter([RCPT]), "news@shop.example", [RCPT])
    assert again.error is None


async def test_an_opt_out_from_one_sender_refuses_only_that_sender(
    tmp_path: Path, closed_port: int, start_relay: StartRelay
) -> None:
    relay = await start_relay(relay_settings(tmp_path, closed_port))
    await relay.stores.suppressions.add(RCPT, scope="sender:shop.example")
    port = relay.addresses.smtp[1]
    refused = await asubmit(port, newsletter([RCPT]), "news@shop.example", [RCPT])
    assert refused.refused[RCPT][0] == 550
    other = await asubmit(port, newsletter([RCPT]), "hello@bakery.example", [RCPT])
    assert other.refused == {} and other.error is None


async def test_a_line_over_998_octets_is_refused_and_nothing_is_kept(
    tmp_path: Path, closed_port: int, start_relay: StartRelay
) -> None:
    relay = await start_relay(relay_settings(tmp_path, closed_port))
    content = b"Subject: long\r\n\r\n" + b"x" * 5000 + b"\r\n.\r\n"
    replies = await asyncio.to_thread(
        converse,
        relay.addresses.smtp[1],
        b"MAIL FROM:<news@shop.example>",
        f"RCPT TO:<{RCPT}>".encode(),
        b"DATA\r\n" + content,
    )
    assert replies[-1][0] == 500
    assert replies[-1][1].startswith(b"5.5.2")
    assert await spooled_messages(tmp_path) == 0


async def test_a_refused_recipient_is_a_refused_event(
    tmp_path: Path, closed_port: int, start_relay: StartRelay
) -> None:
    relay = await start_relay(relay_settings(tmp_path, closed_port))
    suppressions = relay.stores.suppressions
    port = relay.addresses.smtp[1]
    mailed, stranger = RCPT, "stranger@example.org"
    # The relay took mail for one of them before: it knows that address (a contact).
    assert (await asubmit(port, newsletter([mailed]), "news@shop.example", [mailed])).error is None
    await wait_for(
        lambda: _known(relay, mailed), what="the delivery worker to remember the recipient"
    )
    for address in (mailed, stranger):
        await suppressions.add(address, scope="sender:shop.example")

    refused = await asubmit(
        port, newsletter([mailed, stranger]), "news@shop.example", [mailed, stranger]
    )
    elsewhere = await asubmit(port, newsletter([mailed]), "hello@bakery.example", [mailed])

    assert set(refused.refused) == {mailed, stranger} and elsewhere.refused == {}
    events = await events_of(relay, "refused")
    assert [e["detail"] for e in events] == [
        {"scope": "sender:shop.example", "reason": "manual"}
    ] * 2
    assert all(e["queue_id"] is None and e["message_id"] is None for e in events)  # no message
    # Named by keyed hash: the address shows only where the relay already knew it, and
    # the refusal is part of what a subject export and erasure find.
    assert [e["recipient"] for e in events] == [mailed, None]
    [own] = await relay.stores.events.for_recipient(suppressions.hasher.hash(stranger))
    assert own["type"] == "refused"
    await relay.stores.events.erase_recipient(suppressions.hasher.hash(mailed))
    assert all(e["recipient"] is None for e in await events_of(relay, "refused"))


async def _known(relay: Relay, address: str) -> bool:
    record = await relay.stores.suppressions.show(address)
    return record.contact_first_seen_at is not None


async def test_the_log_names_the_client_as_postfix_does_and_the_null_sender_as_empty(
    tmp_path: Path, closed_port: int, start_relay: StartRelay, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await start_relay(relay_settings(tmp_path, closed_port))
    await relay.stores.suppressions.add("gone@example.org")
    message = b"From: MAILER-DAEMON@shop.example\r\nSubject: bounce\r\n\r\nreport\r\n"

    def converse() -> None:
        with smtplib.SMTP("127.0.0.1", relay.addresses.smtp[1], timeout=10) as client:
            client.ehlo("mautic.internal")
            client.sendmail("<>", [RCPT], message)
            client.mail("<>")
            client.rcpt("gone@example.org")

    with caplog.at_level(logging.INFO, logger="optout.smtp"):
        await asyncio.to_thread(converse)

    assert "<<>>" not in caplog.text
    [queued] = [r.getMessage() for r in caplog.records if "(queued)" in r.getMessage()]
    assert queued.startswith("client=unknown[127.0.0.1], helo=<mautic.internal>, from=<>, ")
    [refused] = [r.getMessage() for r in caplog.records if "reject: RCPT" in r.getMessage()]
    assert refused.startswith("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 550 5.7.1 ")
    assert refused.endswith("; from=<> to=<gone@example.org> helo=<mautic.internal>")
    [entry] = await relay.spool.entries()
    assert entry.mail_from == ""


@pytest.mark.parametrize("hostname", ["localhost", "localhost.localdomain", "relay.example"])
async def test_serve_warns_when_the_relay_would_call_itself_localhost(
    tmp_path: Path, start_relay: StartRelay, caplog: pytest.LogCaptureFixture, hostname: str
) -> None:
    settings = with_smtp(relay_settings(tmp_path, None), hostname=hostname)
    with caplog.at_level(logging.WARNING, logger="optout.serve"):
        relay = await start_relay(settings)

    warned = f"this relay calls itself {hostname!r} in its greeting and Received fields"
    assert (warned in caplog.text) == hostname.startswith("localhost")

    def greeting() -> tuple[int, bytes]:
        with smtplib.SMTP(timeout=10) as client:
            return client.connect("127.0.0.1", relay.addresses.smtp[1])

    code, banner = await asyncio.to_thread(greeting)
    assert code == 220 and banner.startswith(hostname.encode() + b" ")
