"""Delivery to a real downstream SMTP server: success, deferral and retry, failure, restart."""

from __future__ import annotations

import asyncio
import email
import email.policy
import smtplib
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path

from relay.app import Relay
from tests.helpers import (
    CaptureServer,
    StartDownstream,
    StartRelay,
    asubmit,
    events_of,
    newsletter,
    relay_settings,
    self_signed_context,
    spool_depth,
    wait_for,
    with_delivery,
)

ALICE = "alice@example.org"
BOB = "bob@example.org"


async def _has(relay: Relay, kind: str) -> bool:
    return bool(await events_of(relay, kind))


async def _deliveries_waiting_are(relay: Relay, count: int) -> bool:
    _, deliveries = await relay.spool.depth()
    return deliveries == count


async def _spool_empty(relay: Relay) -> bool:
    return await _deliveries_waiting_are(relay, 0)


async def test_4xx_stays_spooled_and_is_retried(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    downstream.handler.rcpt_replies[ALICE] = "451 4.7.1 Greylisted, try again later"
    relay = await start_relay(relay_settings(tmp_path, downstream.port))
    await asubmit(
        relay.addresses.smtp[1], newsletter([ALICE, BOB]), "news@shop.example", [ALICE, BOB]
    )
    await wait_for(lambda: len(downstream.handler.messages) == 1, what="bob's copy")
    await wait_for(lambda: _has(relay, "deferred"), what="a deferred event")
    deferred = (await events_of(relay, "deferred"))[0]
    assert deferred["recipient"] == ALICE
    assert deferred["detail"]["reply"].startswith("451 4.7.1")
    assert "retry_at" in deferred["detail"]
    await wait_for(lambda: _deliveries_waiting_are(relay, 1), what="only alice left in the spool")

    del downstream.handler.rcpt_replies[ALICE]
    await wait_for(lambda: len(downstream.handler.for_recipient(ALICE)) == 1, what="retry")
    await wait_for(lambda: _spool_empty(relay), what="an empty spool")


async def test_dead_downstream_then_back(
    tmp_path: Path,
    closed_port: int,
    start_relay: StartRelay,
    start_downstream: StartDownstream,
) -> None:
    relay = await start_relay(relay_settings(tmp_path, closed_port))
    await asubmit(relay.addresses.smtp[1], newsletter([ALICE]), "news@shop.example", [ALICE])
    await wait_for(lambda: _has(relay, "deferred"), what="a deferred event")
    deferred = (await events_of(relay, "deferred"))[0]
    assert "connect" in deferred["detail"]["reply"]
    server = await start_downstream(port=closed_port)
    await wait_for(lambda: len(server.handler.messages) == 1, what="delivery after restart")
    await wait_for(lambda: _spool_empty(relay), what="an empty spool")


async def test_5xx_fails_for_good_and_the_sender_gets_a_dsn(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    downstream.handler.rcpt_replies[ALICE] = "550 5.1.1 No such user"
    relay = await start_relay(relay_settings(tmp_path, downstream.port))
    await asubmit(
        relay.addresses.smtp[1], newsletter([ALICE, BOB]), "news@shop.example", [ALICE, BOB]
    )
    await wait_for(lambda: len(downstream.handler.messages) == 2, what="bob's copy and a DSN")
    await wait_for(lambda: _spool_empty(relay), what="an empty spool")
    # The spool row and the event are committed side by side: wait for the event too.
    await wait_for(lambda: _has(relay, "bounced"), what="a bounced event")
    bounced = (await events_of(relay, "bounced"))[0]
    assert bounced["recipient"] == ALICE
    assert bounced["detail"]["reply"] == "550 5.1.1 No such user"
    await relay.stop()
    assert len(downstream.handler.for_recipient(BOB)) == 1
    [report] = downstream.handler.for_recipient("news@shop.example")
    assert report.mail_from == "<>"  # the null sender: no DSN loops
    dsn = email.message_from_bytes(report.content, policy=email.policy.compat32)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert dsn["Auto-Submitted"] == "auto-replied"
    parts = dsn.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    per_message, per_recipient = parts[1].get_payload()
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert per_message["Arrival-Date"]
    assert per_recipient["Final-Recipient"] == f"rfc822; {ALICE}"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    assert "Subject: Spring sale" in parts[2].get_payload()
    assert "List-Unsubscribe" not in report.content.decode()


async def test_no_dsn_for_the_null_sender(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    downstream.handler.rcpt_replies[ALICE] = "550 5.1.1 No such user"
    relay = await start_relay(relay_settings(tmp_path, downstream.port))
    await asubmit(relay.addresses.smtp[1], newsletter([ALICE]), "", [ALICE])
    await wait_for(lambda: _has(relay, "bounced"), what="a bounced event")
    await wait_for(lambda: _spool_empty(relay), what="an empty spool")
    assert downstream.handler.messages == []


async def test_expired_mail_fails_with_a_dsn(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    downstream.handler.rcpt_replies[ALICE] = "451 4.3.0 Try later"
    settings = with_delivery(relay_settings(tmp_path, downstream.port), max_queue_age=0.3)
    relay = await start_relay(settings)
    await asubmit(relay.addresses.smtp[1], newsletter([ALICE]), "news@shop.example", [ALICE])
    await wait_for(lambda: _has(relay, "bounced"), what="expiry")
    bounced = (await events_of(relay, "bounced"))[0]
    assert bounced["detail"]["reply"].startswith("4.4.7 message expired")
    assert bounced["detail"]["reply"].endswith("last reply: 451 4.3.0 Try later")
    await wait_for(lambda: len(downstream.handler.messages) == 1, what="the DSN")
    report = downstream.handler.messages[0].content.decode()
    assert "Status: 4.4.7" in report


async def test_spooled_mail_is_delivered_after_a_restart(
    tmp_path: Path, closed_port: int, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    first = await start_relay(relay_settings(tmp_path, closed_port))
    await asubmit(
        first.addresses.smtp[1], newsletter([ALICE, BOB]), "news@shop.example", [ALICE, BOB]
    )
    await first.stop()
    _, deliveries = await spool_depth(tmp_path)
    assert deliveries == 2

    second = await start_relay(relay_settings(tmp_path, downstream.port))
    await wait_for(lambda: len(downstream.handler.messages) == 2, what="both after restart")
    await wait_for(lambda: _spool_empty(second), what="an empty spool")


async def test_topic_opt_out_is_enforced_at_delivery(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    relay = await start_relay(relay_settings(tmp_path, downstream.port))
    await relay.stores.suppressions.add(ALICE, scope="topic:news")
    message = newsletter([ALICE, BOB], headers={"X-Optout-Topic": "news"})
    result = await asubmit(relay.addresses.smtp[1], message, "news@shop.example", [ALICE, BOB])
    assert result.refused == {}  # only global opt-outs are known at RCPT
    await wait_for(lambda: _has(relay, "suppressed"), what="a suppressed event")
    await wait_for(lambda: _spool_empty(relay), what="an empty spool")
    assert [m.recipients for m in downstream.handler.messages] == [[BOB]]
    suppressed = (await events_of(relay, "suppressed"))[0]
    assert suppressed["recipient"] == ALICE
    assert suppressed["detail"]["scope"] == "topic:news"


async def test_outbox_delivery_without_downstream(tmp_path: Path, start_relay: StartRelay) -> None:
    relay = await start_relay(relay_settings(tmp_path, None))
    await asubmit(relay.addresses.smtp[1], newsletter([ALICE]), "news@shop.example", [ALICE])
    outbox = tmp_path / "outbox"
    await wait_for(lambda: len(list(outbox.glob("*.eml"))) == 1, what="an .eml file")
    [eml] = outbox.glob("*.eml")
    content = eml.read_bytes()
    assert content.startswith(
        b"Return-Path: <news@shop.example>\r\nX-Original-To: " + ALICE.encode()
    )
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in content
    assert not list(outbox.glob(".*.tmp"))


async def test_starttls_is_used_when_the_mta_offers_it(
    tmp_path: Path, start_downstream: StartDownstream, start_relay: StartRelay
) -> None:
    server = await start_downstream(tls=self_signed_context(tmp_path))
    relay = await start_relay(relay_settings(tmp_path / "data", server.port))
    await asubmit(relay.addresses.smtp[1], newsletter([ALICE]), "news@shop.example", [ALICE])
    await wait_for(lambda: len(server.handler.messages) == 1, what="a copy over TLS")
    assert server.handler.messages[0].encrypted


async def test_8bit_mail_goes_7bit_to_a_downstream_without_8bitmime(
    tmp_path: Path, start_downstream: StartDownstream, start_relay: StartRelay
) -> None:
    server = await start_downstream(eight_bit=False)
    relay = await start_relay(relay_settings(tmp_path / "data", server.port))
    message = EmailMessage()
    message["From"] = "news@shop.example"
    message["To"] = ALICE
    message["Subject"] = "Sommer"
    message.set_content("Grüße aus dem Laden, 20 % günstiger\n", cte="8bit")
    message.add_alternative("<html><body><p>Grüße</p></body></html>", subtype="html", cte="8bit")
    await asubmit(relay.addresses.smtp[1], message, "news@shop.example", [ALICE])
    await wait_for(lambda: len(server.handler.messages) == 1, what="a 7-bit copy")
    await relay.stop()
    content = server.handler.messages[0].content
    assert content.isascii()
    copy = email.message_from_bytes(content, policy=email.policy.default)
    text = copy.get_body(("plain",))
    assert text is not None
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert "Grüße aus dem Laden" in text.get_content()


async def test_a_header_dkim_cannot_read_is_still_delivered(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    from relay.dkim import generate_key
    from relay.settings import DkimKey, DkimSettings

    (tmp_path / "data" / "dkim").mkdir(parents=True)
    generate_key("shop.example", "s1", tmp_path / "data" / "dkim")
    settings = relay_settings(tmp_path / "data", downstream.port)
    settings = replace(
        settings,
        dkim=DkimSettings((DkimKey("shop.example", "s1", Path("dkim/shop.example.s1.pem")),)),
    )
    relay = await start_relay(settings)
    raw = (
        b"From: news@shop.example\r\nTo: alice@example.org\r\nSubject: odd\r\n"
        b"this header line has no colon\r\n\r\nHello\r\n"
    )
    result = await asubmit(relay.addresses.smtp[1], raw, "news@shop.example", [ALICE])
    assert result.error is None
    await wait_for(lambda: len(downstream.handler.messages) == 1, what="the odd message")
    await wait_for(lambda: _spool_empty(relay), what="an empty spool")


async def test_8bit_headers_to_a_downstream_without_8bitmime_bounce_saying_why(
    tmp_path: Path, start_downstream: StartDownstream, start_relay: StartRelay
) -> None:
    """A raw UTF-8 Subject cannot become 7-bit in transit (RFC 6532 needs SMTPUTF8): the
    copy is bounced at once with the reason, never deferred for ever."""
    server = await start_downstream(eight_bit=False)
    relay = await start_relay(relay_settings(tmp_path / "data", server.port))
    raw = (
        "From: news@shop.example\r\nTo: alice@example.org\r\nSubject: Grüße aus dem Laden\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHallo\r\n"
    ).encode()
    result = await asubmit(relay.addresses.smtp[1], raw, "news@shop.example", [ALICE])
    assert result.error is None
    await wait_for(lambda: _has(relay, "bounced"), what="the bounce")
    [bounced] = await events_of(relay, "bounced")
    assert bounced["detail"]["reply"] == (
        f"554 5.6.3 127.0.0.1:{server.port} does not accept 8-bit data (no 8BITMIME) and this"
        " message cannot be converted to 7-bit: its header fields are 8-bit (raw UTF-8 needs"
        " SMTPUTF8, RFC 6532)"
    )
    assert bounced["detail"]["attempt"] == 1
    assert not await events_of(relay, "deferred")
    # The sender's DSN goes through the same old MTA: 7-bit, the headers quoted-printable.
    await wait_for(lambda: bool(server.handler.messages), what="the DSN")
    [dsn] = server.handler.messages
    assert dsn.recipients == ["news@shop.example"]
    assert dsn.content.isascii()
    assert b"Status: 5.6.3" in dsn.content
    assert b"Subject: Gr=C3=BC=C3=9Fe aus dem Laden" in dsn.content


async def test_an_smtputf8_recipient_past_a_next_hop_without_it_bounces_with_a_dsn(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    """RFC 6531 §3.4: a next hop without SMTPUTF8 cannot take the address; the sender
    hears of it (a DSN), it is never dropped in silence."""
    relay = await start_relay(relay_settings(tmp_path / "data", downstream.port))
    jurgen = "jürgen@example.org"

    def submit() -> None:
        with smtplib.SMTP("127.0.0.1", relay.addresses.smtp[1], timeout=30) as client:
            client.ehlo("tool.test")
            client.sendmail(
                "news@shop.example",
                [jurgen],
                newsletter(["friends@example.org"]).as_bytes(),
                mail_options=["SMTPUTF8"],
            )

    await asyncio.to_thread(submit)
    await wait_for(lambda: _has(relay, "bounced"), what="the bounce")
    [bounced] = await events_of(relay, "bounced")
    assert bounced["recipient"] == jurgen
    assert bounced["detail"]["reply"] == (
        f"553 5.6.7 127.0.0.1:{downstream.port} does not offer SMTPUTF8 for this address"
    )
    await wait_for(lambda: bool(downstream.handler.messages), what="the DSN")
    [dsn] = downstream.handler.messages
    assert (dsn.mail_from, dsn.recipients) == ("<>", ["news@shop.example"])
    assert b"Final-Recipient: rfc822; j\\xfcrgen@example.org" in dsn.content
    assert b"Status: 5.6.7" in dsn.content
    await wait_for(lambda: _spool_empty(relay), what="an empty spool")
