"""The relay as a careful submission server (issue 14, items 1-3): automatic mail passes
undecorated; Date, Message-ID and a Received field are added before signing; campaign mail
gets a List-Id. Each through real sockets: a submission to the relay, the copy as the
downstream MTA received it, its DKIM signature checked by dkimpy."""

from __future__ import annotations

import asyncio
import smtplib
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path

import pytest

from relay.app import Relay
from relay.dkim import generate_key
from relay.settings import DkimKey, DkimSettings, Settings
from tests.helpers import (
    CaptureServer,
    StartRelay,
    asubmit,
    newsletter,
    parse,
    relay_settings,
    wait_for,
    with_smtp,
)

dkim = pytest.importorskip("dkim", reason="dkimpy (test extra) verifies the signatures")

ALICE = "alice@example.org"
BOB = "bob@example.org"


def signing_settings(tmp_path: Path, port: int, *domains: str) -> tuple[Settings, dict[str, bytes]]:
    """Relay settings with a fresh DKIM key per domain, and the TXT records to verify with."""
    keys, records = [], {}
    for domain in domains:
        path, record = generate_key(domain, "s1", tmp_path / "data" / "dkim")
        keys.append(DkimKey(domain, "s1", path))
        records[record.name + "."] = record.text.encode()
    settings = replace(relay_settings(tmp_path / "data", port), dkim=DkimSettings(tuple(keys)))
    return settings, records


def verifies(content: bytes, records: dict[str, bytes]) -> bool:
    def dns(name: bytes, timeout: int = 5) -> bytes:
        return records[name.decode()]

    return bool(dkim.verify(content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), dnsfunc=dns))


def body(content: bytes) -> bytes:
    return content.split(b"\r\n\r\n", 1)[1]


async def relayed(
    relay: Relay,
    downstream: CaptureServer,
    message: EmailMessage | bytes,
    sender: str,
    recipients: list[str],
) -> list[bytes]:
    before = len(downstream.handler.messages)
    result = await asubmit(relay.addresses.smtp[1], message, sender, recipients)
    assert result.refused == {}, result
    await wait_for(
        lambda: len(downstream.handler.messages) == before + len(recipients), what="the copies"
    )
    return [m.content for m in downstream.handler.messages[before:]]


def auto_reply(headers: dict[str, str]) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Shop <news@shop.example>"
    message["To"] = ALICE
    message["Subject"] = "Out of office"
    message["Date"] = "Tue, 10 Mar 2026 09:14:01 +0000"
    message["Message-ID"] = "<ooo-1@shop.example>"
    message["List-Id"] = "<staff.shop.example>"
    message["List-Unsubscribe"] = "<mailto:leave@shop.example>"
    for name, value in headers.items():
        message[name] = value
    message.set_content("I am away until Monday.\n")
    message.add_alternative("<html><body><p>I am away until Monday.</p></body></html>", "html")
    return message


def report() -> EmailMessage:
    """A delivery status notification as an MTA makes one (RFC 3464)."""
    message = EmailMessage()
    message["From"] = "Mail Delivery System <MAILER-DAEMON@shop.example>"
    message["To"] = ALICE
    message["Subject"] = "Undelivered Mail Returned to Sender"
    message["Date"] = "Tue, 10 Mar 2026 09:14:01 +0000"
    message["Message-ID"] = "<dsn-1@shop.example>"
    message.set_content("Your message could not be delivered.\n")
    message.make_mixed()
    message.replace_header(
        "Content-Type", message["Content-Type"].replace("multipart/mixed", "multipart/report")
    )
    return message


@pytest.mark.parametrize(
    ("why", "message", "sender"),
    [
        ("null sender", auto_reply({}), ""),
        ("Auto-Submitted", auto_reply({"Auto-Submitted": "auto-replied"}), "news@shop.example"),
        ("multipart/report", report(), "news@shop.example"),
    ],
)
async def test_automatic_mail_passes_undecorated_but_signed(
    tmp_path: Path,
    downstream: CaptureServer,
    start_relay: StartRelay,
    why: str,
    message: EmailMessage,
    sender: str,
) -> None:
    settings, records = signing_settings(tmp_path, downstream.port, "shop.example")
    relay = await start_relay(settings)
    sent = message.as_bytes().replace(b"\n", b"\r\n")  # its boundary chosen once
    [copy] = await relayed(relay, downstream, sent, sender, [ALICE])

    assert body(copy) == body(sent), why  # byte for byte
    headers = parse(copy)
    assert headers.get_all("List-Unsubscribe-Post") is None
    assert headers.get_all("List-Unsubscribe") == message.get_all("List-Unsubscribe")
    assert headers.get_all("List-Id") == message.get_all("List-Id")
    assert b"https://mail.shop.example/" not in copy  # no link, no pixel
    assert copy.startswith(b"DKIM-Signature: ") and verifies(copy, records)


async def test_auto_submitted_no_is_marketing_mail_as_usual(
    relay: Relay, downstream: CaptureServer
) -> None:
    message = auto_reply({"Auto-Submitted": "no"})
    [copy] = await relayed(relay, downstream, message, "news@shop.example", [ALICE])
    assert parse(copy).get_all("List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"]
    assert b"https://mail.shop.example/u/" in body(copy)


# -- RFC 6409 section 8: Date, Message-ID, Received -------------------------------------------


async def test_a_submission_without_date_and_message_id_gets_both_under_the_signature(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    settings, records = signing_settings(tmp_path, downstream.port, "shop.example")
    relay = await start_relay(settings)
    message = newsletter([ALICE, BOB])
    del message["Message-ID"]
    assert message["Date"] is None
    copies = await relayed(relay, downstream, message, "news@shop.example", [ALICE, BOB])

    ids = set()
    for copy in copies:
        headers = parse(copy)
        [date] = headers.get_all("Date")
        [message_id] = headers.get_all("Message-ID")
        assert date.endswith("+0000")
        assert message_id.startswith("<") and message_id.endswith("@relay.test>")
        ids.add(message_id)
        assert verifies(copy, records)
        signature = headers["DKIM-Signature"].replace("\r\n", "").replace(" ", "").lower()
        signed = signature.split("h=")[1].split(";")[0].split(":")
        assert signed.count("date") == 2 and signed.count("message-id") == 2
    assert len(ids) == 1  # one message, one Message-ID, for every recipient

    # Date and Message-ID of the sender's own are kept as they are.
    own = newsletter([ALICE], headers={"Date": "Tue, 10 Mar 2026 09:14:01 +0100"})
    [copy] = await relayed(relay, downstream, own, "news@shop.example", [ALICE])
    assert parse(copy).get_all("Date") == ["Tue, 10 Mar 2026 09:14:01 +0100"]
    assert parse(copy).get_all("Message-ID") == ["<spring-2026@shop.example>"]


def submit_as(port: int, message: EmailMessage, helo: str) -> str:
    """Submit after EHLO `helo`; the queue id the relay gave in its 250 reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo(helo)
        client.mail("news@shop.example")
        client.rcpt(ALICE)
        code, reply = client.data(message.as_bytes())
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


@pytest.mark.parametrize(
    ("mode", "source"),
    [
        ("omitted", b"Received: by relay.test (optout-relay) with ESMTP id "),
        ("network", b"Received: from tool.test (127.0.0.0/24)\r\n\tby relay.test (optout-relay)"),
        ("full", b"Received: from tool.test ([127.0.0.1])\r\n\tby relay.test (optout-relay)"),
    ],
)
async def test_the_received_field_names_the_client_as_configured(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay, mode: str, source: bytes
) -> None:
    settings = with_smtp(relay_settings(tmp_path / "data", downstream.port), received_client=mode)
    relay = await start_relay(settings)
    queue_id = await asubmit_as(relay.addresses.smtp[1], newsletter([ALICE]), "tool.test")
    await wait_for(lambda: len(downstream.handler.messages) == 1, what="the copy")
    copy = downstream.handler.messages[0].content
    assert copy.startswith(source)
    received = parse(copy)["Received"]
    assert received.endswith("+0000")
    assert f" id {queue_id};" in received
    if mode != "full":
        assert b"127.0.0.1" not in copy.split(b"\r\n\r\n")[0]


async def asubmit_as(port: int, message: EmailMessage, helo: str) -> str:
    return await asyncio.to_thread(submit_as, port, message, helo)


async def test_a_helo_that_is_no_name_stays_out_of_the_received_field(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    settings = with_smtp(relay_settings(tmp_path / "data", downstream.port), received_client="full")
    relay = await start_relay(settings)
    await asubmit_as(relay.addresses.smtp[1], newsletter([ALICE]), "bad;name (x)")
    await wait_for(lambda: len(downstream.handler.messages) == 1, what="the copy")
    copy = downstream.handler.messages[0].content
    assert copy.startswith(b"Received: from unknown ([127.0.0.1])\r\n\tby relay.test")


# -- RFC 2919 List-Id -------------------------------------------------------------------------


async def test_campaign_mail_gets_a_signed_list_id_and_keeps_its_own(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    settings, records = signing_settings(tmp_path, downstream.port, "shop.example")
    relay = await start_relay(settings)
    campaign = newsletter([ALICE], headers={"X-Optout-Campaign": "Spring Sale 2026 (Früh)"})
    [copy] = await relayed(relay, downstream, campaign, "news@shop.example", [ALICE])
    headers = parse(copy)
    assert headers.get_all("List-Id") == ["<spring-sale-2026-fruh.shop.example>"]
    assert verifies(copy, records)
    forged = copy.replace(b"List-Id: <spring-sale", b"List-Id: <other-list", 1)
    assert not verifies(forged, records)

    ascii_name = newsletter([ALICE], headers={"X-Optout-Campaign": 'Spring "26"'})
    [copy] = await relayed(relay, downstream, ascii_name, "news@shop.example", [ALICE])
    assert parse(copy).get_all("List-Id") == ['"Spring \\"26\\"" <spring-26.shop.example>']

    own = newsletter(
        [ALICE], headers={"X-Optout-Campaign": "spring", "List-Id": "Shop news <news.shop.example>"}
    )
    [copy] = await relayed(relay, downstream, own, "news@shop.example", [ALICE])
    assert parse(copy).get_all("List-Id") == ["Shop news <news.shop.example>"]

    topic = newsletter([ALICE], headers={"X-Optout-Topic": "weekly-news"})
    [copy] = await relayed(relay, downstream, topic, "news@shop.example", [ALICE])
    assert parse(copy).get_all("List-Id") == ['"weekly-news" <weekly-news.shop.example>']

    [copy] = await relayed(relay, downstream, newsletter([ALICE]), "news@shop.example", [ALICE])
    assert parse(copy).get_all("List-Id") is None  # neither campaign nor topic: no list
