"""What each copy carries so that its feedback comes back: a return path of its own, a
mailto: unsubscribe address, CFBL and Feedback-ID fields under the DKIM signature; and what
comes back to those addresses from real copies."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from relay.app import Relay
from relay.settings import DkimKey, DkimSettings
from tests.feedback_helpers import (
    FEEDBACK_DOMAIN,
    arf,
    dsn,
    feedback_port,
    person_message,
    send_report,
    with_feedback,
)
from tests.helpers import (
    Captured,
    CaptureServer,
    StartRelay,
    asubmit,
    events_of,
    newsletter,
    parse,
    relay_settings,
    run_cli,
    wait_for,
)

dkim = pytest.importorskip("dkim", reason="dkimpy (test extra) verifies the signatures")

ALICE, BOB = "alice@example.org", "bob@example.org"
CAMPAIGN = {"X-Optout-Campaign": "spring-2026", "X-Optout-Topic": "news"}


async def signing_relay(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> tuple[Relay, bytes]:
    """A relay with feedback on and a DKIM key for shop.example; the key's TXT record."""
    config = tmp_path / "relay.toml"
    config.write_text(f'[storage]\ndir = "{tmp_path / "data"}"\n')
    made = run_cli("dkim", "keygen", "shop.example", "s1", "--config", str(config), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    line = made.stdout.strip()
    record = "".join(line[line.index("(") + 1 : line.rindex(")")].split('"')[1::2]).encode()
    settings = replace(
        with_feedback(relay_settings(tmp_path / "data", downstream.port)),
        dkim=DkimSettings((DkimKey("shop.example", "s1", Path("dkim/shop.example.s1.pem")),)),
    )
    return await start_relay(settings), record


async def sent(relay: Relay, downstream: CaptureServer, **headers: str) -> dict[str, Captured]:
    message = newsletter([ALICE, BOB], headers={**CAMPAIGN, **headers})
    result = await asubmit(relay.addresses.smtp[1], message, "news@shop.example", [ALICE, BOB])
    assert result.refused == {}
    await wait_for(lambda: len(downstream.handler.messages) == 2, what="two copies")
    return {m.recipients[0]: m for m in downstream.handler.messages}


async def test_each_copy_carries_its_own_signed_feedback_addresses(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    relay, record = await signing_relay(tmp_path, downstream, start_relay)
    copies = await sent(relay, downstream)

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"s1._domainkey.shop.example."
        return record

    senders = {copy.mail_from for copy in copies.values()}
    assert len(senders) == 2  # one return path per copy
    for address, copy in copies.items():
        local, _, domain = copy.mail_from.partition("@")
        assert domain == FEEDBACK_DOMAIN and local.startswith("b-") and len(local) <= 64
        assert address.split("@")[0] not in copy.mail_from
        message = parse(copy.content)
        uris = [u.strip().strip("<>") for u in message["List-Unsubscribe"].split(",")]
        assert uris[0].startswith("https://mail.shop.example/u/")  # https first
        assert uris[1].startswith("mailto:u-") and uris[1].endswith(f"@{FEEDBACK_DOMAIN}")
        assert message.get_all("CFBL-Address") == [f"<fbl@{FEEDBACK_DOMAIN}>; report=arf"]
        assert message["CFBL-Feedback-ID"].startswith("r-")
        assert message.get_all("Feedback-ID") == ["spring-2026::topic-news:shop.example"]
        assert dkim.verify(copy.content, dnsfunc=dns)
        signature = b"".join(copy.content.split(b"\r\nFrom:")[0].split())
        signed = signature.split(b"h=")[1].split(b";")[0].lower().split(b":")
        for name in (b"cfbl-address", b"cfbl-feedback-id", b"feedback-id", b"list-unsubscribe"):
            assert name in signed, name
    mailtos = {parse(c.content)["List-Unsubscribe"].split(",")[1] for c in copies.values()}
    assert len(mailtos) == 2


async def test_a_senders_own_feedback_id_is_kept_and_unaligned_domains_get_no_cfbl(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    relay = await start_relay(
        with_feedback(relay_settings(tmp_path / "data", downstream.port))
    )  # no DKIM key: nothing signs the CFBL-Address domain, so none is added
    copies = await sent(relay, downstream, **{"Feedback-ID": "a:b:c:ShopSender"})
    for copy in copies.values():
        message = parse(copy.content)
        assert message.get_all("Feedback-ID") == ["a:b:c:ShopSender"]
        assert message.get("CFBL-Address") is None
        assert copy.mail_from.endswith(f"@{FEEDBACK_DOMAIN}")


async def test_bounce_mailto_and_redacted_complaint_from_real_copies(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    relay, _ = await signing_relay(tmp_path, downstream, start_relay)
    copies = await sent(relay, downstream)
    port = feedback_port(relay)
    suppressions = relay.stores.suppressions

    # Alice's mailbox is gone: the DSN comes back to her copy's return path.
    alice = copies[ALICE]
    await asyncio.to_thread(send_report, port, dsn(alice.mail_from, ALICE), [alice.mail_from])
    await wait_for(lambda: _suppressed(relay, ALICE), what="alice suppressed")
    assert (await suppressions.check(ALICE)).reason == "hard_bounce"  # type: ignore[union-attr]

    # Bob writes to his copy's mailto: address: he leaves the copy's topic.
    bob = parse(copies[BOB].content)
    mailto = bob["List-Unsubscribe"].split(",")[1].strip().strip("<>").removeprefix("mailto:")
    await asyncio.to_thread(send_report, port, person_message(BOB, mailto), [mailto], BOB)
    await wait_for(lambda: _suppressed(relay, BOB, "topic:news"), what="bob unsubscribed")
    [unsubscribe] = await events_of(relay, "unsubscribe")
    assert unsubscribe["detail"]["method"] == "mailto"
    assert unsubscribe["campaign"] == "spring-2026"

    # Then he reports it as spam; the reporter strips his address from what it returns.
    headers = copies[BOB].content.split(b"\r\n\r\n", 1)[0].decode()
    returned = [
        line
        for line in headers.replace("\r\n ", " ").replace("\r\n\t", " ").split("\r\n")
        if not line.lower().startswith(("to:", "dkim-signature:", "list-unsubscribe:"))
    ]
    await asyncio.to_thread(send_report, port, arf(returned), [f"fbl@{FEEDBACK_DOMAIN}"])
    await wait_for(lambda: _suppressed(relay, BOB), what="bob's complaint")
    assert (await suppressions.check(BOB)).reason == "complaint"  # type: ignore[union-attr]
    [complaint] = await events_of(relay, "complaint")
    assert complaint["detail"]["matched_by"] == "reference"
    assert complaint["queue_id"] == unsubscribe["queue_id"]

    again = await asubmit(
        relay.addresses.smtp[1], newsletter([ALICE, BOB]), "news@shop.example", [ALICE, BOB]
    )
    assert {a: r[0] for a, r in again.refused.items()} == {ALICE: 550, BOB: 550}


async def _suppressed(relay: Relay, address: str, scope: str = "global") -> bool:
    return await relay.stores.suppressions.check(address, [scope]) is not None


@pytest.mark.parametrize(
    ("reply", "suppressed", "kind"),
    [
        ("550 5.1.1 <alice@example.org>: Recipient address rejected: User unknown", True, "hard"),
        ("550 5.7.1 Message rejected as spam", False, "policy"),
    ],
)
async def test_a_synchronous_refusal_of_a_mailbox_is_a_hard_bounce(
    tmp_path: Path,
    downstream: CaptureServer,
    start_relay: StartRelay,
    reply: str,
    suppressed: bool,
    kind: str,
) -> None:
    downstream.handler.rcpt_replies[ALICE] = reply
    relay = await start_relay(with_feedback(relay_settings(tmp_path / "data", downstream.port)))
    message = newsletter([ALICE])
    assert (
        await asubmit(relay.addresses.smtp[1], message, "news@shop.example", [ALICE])
    ).refused == {}

    async def bounced() -> bool:
        return bool(await events_of(relay, "bounced"))

    await wait_for(bounced, what="the bounced event")
    [event] = await events_of(relay, "bounced")
    assert event["detail"]["kind"] == kind and event["detail"]["source"] == "sync"
    entry = await relay.stores.suppressions.check(ALICE)
    assert (entry is not None) is suppressed
    if suppressed:
        assert entry is not None and entry.reason == "hard_bounce"
        shown = await relay.stores.suppressions.show(ALICE)
        assert shown.history[-1].source == "bounce:sync"


async def test_mail_from_the_null_sender_keeps_it(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    relay = await start_relay(with_feedback(relay_settings(tmp_path / "data", downstream.port)))
    report = dsn("news@shop.example", "gone@example.net")
    assert (await asubmit(relay.addresses.smtp[1], report, "", [ALICE])).refused == {}
    await wait_for(lambda: len(downstream.handler.messages) == 1, what="the relayed report")
    [copy] = downstream.handler.messages
    assert copy.mail_from in ("", "<>")


async def test_automatic_mail_from_a_real_sender_keeps_its_return_path(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    """An auto-reply or a report is not marketing mail: what comes back to it is not the
    copy's feedback, so it gets no VERP return path, no mailto: and no CFBL fields."""
    relay = await start_relay(with_feedback(relay_settings(tmp_path / "data", downstream.port)))
    copies = await sent(relay, downstream, **{"Auto-Submitted": "auto-replied"})
    for copy in copies.values():
        assert copy.mail_from == "news@shop.example"
        headers = parse(copy.content)
        assert headers["CFBL-Address"] is None and headers["CFBL-Feedback-ID"] is None
        assert headers["List-Unsubscribe"] is None
