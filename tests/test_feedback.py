"""The feedback listener: bounces, complaints and mailto: unsubscribes through real SMTP
sessions into the suppression list and the event log."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import smtplib
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from relay.app import Relay
from relay.feedback import CopyTokens
from relay.feedback.addresses import FeedbackAddresses
from relay.feedback.effects import Rules, apply_report
from relay.feedback.runner import examine
from relay.feedback.store import FeedbackStore, Report
from relay.stores import signer
from suppression import GLOBAL
from tests.feedback_helpers import (
    ARF_DIR,
    FEEDBACK_DOMAIN,
    SentCopy,
    arf,
    dsn,
    feedback_port,
    person_message,
    qmail_bounce,
    relay_urls,
    send_report,
    sent_copy,
    with_feedback,
)
from tests.helpers import (
    CaptureServer,
    StartRelay,
    asubmit,
    cli,
    events_of,
    newsletter,
    relay_settings,
    wait_for,
)

CAROL = "carol@example.org"
DAVE = "dave@example.org"


@pytest.fixture
async def feedback_relay(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> Relay:
    return await start_relay(with_feedback(relay_settings(tmp_path / "data", downstream.port)))


async def processed(relay: Relay, count: int = 1) -> list[dict[str, Any]]:
    """Wait until `count` reports are processed; all processed reports, oldest first."""
    store = FeedbackStore(relay.stores.suppressions.database)

    async def done() -> bool:
        reports = await store.reports()
        return sum(r["state"] != "new" for r in reports) >= count

    await wait_for(done, what=f"{count} reports processed")
    return [r for r in reversed(await store.reports()) if r["state"] != "new"]


async def suppressed(relay: Relay, address: str) -> Any:
    return await relay.stores.suppressions.check(address)


# ---------------------------------------------------------------- the listener is an MX


async def test_only_feedback_addresses_are_taken_and_no_auth(feedback_relay: Relay) -> None:
    copy = await sent_copy(feedback_relay, CAROL)
    await asyncio.to_thread(_probe_listener, feedback_port(feedback_relay), copy)


def _tampered(address: str) -> str:
    """`address` with one character of its MAC changed."""
    local, _, domain = address.partition("@")
    last = "a" if local[-1] != "a" else "b"
    return f"{local[:-1]}{last}@{domain}"


def _probe_listener(port: int, copy: SentCopy) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        code, features = client.ehlo("mx.example.org")
        assert code == 250
        assert b"AUTH" not in features
        assert client.docmd("AUTH", "PLAIN AGFsaWNlAHB3")[0] == 502
        assert client.mail("")[0] == 250
        refused = client.rcpt("someone@example.com")
        assert refused[0] == 550 and refused[1].startswith(b"5.7.1")
        for forged in (
            f"nobody@{FEEDBACK_DOMAIN}",
            _tampered(copy.return_path),
            _tampered(copy.mailto),
            f"{copy.reference}@{FEEDBACK_DOMAIN}",  # a header token is no address
        ):
            refused = client.rcpt(forged)
            assert refused[0] == 550 and refused[1].startswith(b"5.1.1"), forged
        for good in (
            copy.return_path,
            copy.return_path.upper(),  # providers fold the case of local parts
            copy.mailto,
            f"Postmaster@{FEEDBACK_DOMAIN}",
            f"abuse@{FEEDBACK_DOMAIN.upper()}",
            f"fbl@{FEEDBACK_DOMAIN}",
        ):
            assert client.rcpt(good)[0] == 250, good


# ---------------------------------------------------------------- bounces


async def test_a_hard_bounce_suppresses_and_the_next_rcpt_is_refused(
    feedback_relay: Relay, tmp_path: Path
) -> None:
    copy = await sent_copy(feedback_relay, CAROL)
    refused = await asyncio.to_thread(
        send_report, feedback_port(feedback_relay), dsn(copy.return_path, CAROL), [copy.return_path]
    )
    assert refused == {}
    [report] = await processed(feedback_relay)
    assert report["state"] == "done"
    assert report["outcome"]["action"] == "hard-bounce"
    entry = await suppressed(feedback_relay, CAROL)
    assert entry is not None and entry.reason == "hard_bounce" and entry.scope == GLOBAL
    assert entry.expires_at is None
    [bounced] = await events_of(feedback_relay, "bounced")
    assert bounced["recipient"] == CAROL
    assert bounced["campaign"] == "spring"
    assert bounced["detail"]["kind"] == "hard"
    assert bounced["detail"]["status"] == "5.1.1"
    assert bounced["detail"]["source"] == "dsn"
    assert bounced["detail"]["reporting_mta"] == "mx.example.org"
    assert "User unknown" in bounced["detail"]["diagnostic"]

    again = await asubmit(
        feedback_relay.addresses.smtp[1], newsletter([CAROL]), "news@shop.example", [CAROL]
    )
    assert again.refused[CAROL][0] == 550
    assert again.refused[CAROL][1].startswith(b"5.7.1")


async def test_proof_of_a_bounce_in_suppress_show_also_after_erasure(
    feedback_relay: Relay, tmp_path: Path
) -> None:
    copy = await sent_copy(feedback_relay, CAROL)
    await asyncio.to_thread(
        send_report, feedback_port(feedback_relay), dsn(copy.return_path, CAROL), [copy.return_path]
    )
    await processed(feedback_relay)
    await feedback_relay.stop()
    config = tmp_path / "relay.toml"
    config.write_text(f'[storage]\ndir = "{tmp_path / "data"}"\n')
    for erased in (False, True):
        if erased:
            result = cli(config, "subject", "erase", "--yes", CAROL)
            assert result.returncode == 0, result.stderr
        shown = cli(config, "suppress", "show", "--format", "json", CAROL)
        assert shown.returncode == 0, shown.stderr
        proof = json.loads(shown.stdout)
        [added] = [h for h in proof["history"] if h["action"] == "add"]
        assert added["reason"] == "hard_bounce"
        assert added["source"] == "bounce:dsn"
        assert added["detail"]["status"] == "5.1.1"
        assert added["detail"]["kind"] == "hard"
        assert added["detail"]["reporting_mta"] == "mx.example.org"
        assert CAROL not in shown.stdout.replace(f'"address": "{CAROL}"', "")


async def test_a_text_bounce_is_read_by_mailmans_detectors(feedback_relay: Relay) -> None:
    copy = await sent_copy(feedback_relay, CAROL)
    await asyncio.to_thread(
        send_report,
        feedback_port(feedback_relay),
        qmail_bounce(copy.return_path, CAROL),
        [copy.return_path],
    )
    [report] = await processed(feedback_relay)
    assert report["outcome"]["action"] == "hard-bounce"
    assert report["outcome"]["nature"] == "text"
    [bounced] = await events_of(feedback_relay, "bounced")
    assert bounced["detail"]["source"] == "text"
    assert (await suppressed(feedback_relay, CAROL)) is not None


async def test_one_soft_bounce_does_not_suppress_the_limit_does(feedback_relay: Relay) -> None:
    port = feedback_port(feedback_relay)
    limit = feedback_relay.settings.feedback.soft_bounce_limit
    for attempt in range(limit):
        copy = await sent_copy(feedback_relay, CAROL, queue_id=f"00000000000{attempt}")
        report = dsn(
            copy.return_path,
            CAROL,
            action="delayed" if attempt % 2 else "failed",
            status="4.2.2",
            diagnostic="smtp; 452 4.2.2 Mailbox full",
        )
        await asyncio.to_thread(send_report, port, report, [copy.return_path])
        await processed(feedback_relay, attempt + 1)
        entry = await suppressed(feedback_relay, CAROL)
        if attempt + 1 < limit:
            assert entry is None, f"suppressed after {attempt + 1} soft bounces"
    assert entry is not None
    assert entry.reason == "soft_bounce"
    assert entry.expires_at is not None
    bounces = await events_of(feedback_relay, "bounced")
    assert [b["detail"]["kind"] for b in bounces] == ["soft"] * limit


async def test_policy_refusals_never_suppress(
    feedback_relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    port = feedback_port(feedback_relay)
    alert = feedback_relay.settings.feedback.policy_alert
    for attempt in range(alert):
        copy = await sent_copy(feedback_relay, CAROL, queue_id=f"10000000000{attempt}")
        report = dsn(
            copy.return_path,
            CAROL,
            status="5.7.26" if attempt % 2 else "4.7.0",
            diagnostic="smtp; 550 5.7.26 Unauthenticated email is not accepted",
        )
        await asyncio.to_thread(send_report, port, report, [copy.return_path])
    await processed(feedback_relay, alert)
    assert (await suppressed(feedback_relay, CAROL)) is None
    assert await events_of(feedback_relay, "bounced") == []
    refusals = await events_of(feedback_relay, "policy_refusal")
    assert len(refusals) == alert
    assert {r["detail"]["domain"] for r in refusals} == {"example.org"}
    loud = [r for r in caplog.records if "policy refusals from example.org" in r.getMessage()]
    assert loud and loud[-1].levelname == "ERROR"


async def test_forged_bounces_change_nothing(
    feedback_relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    copy = await sent_copy(feedback_relay, CAROL)
    port = feedback_port(feedback_relay)
    # A DSN to a tampered return path never gets past RCPT.
    tampered = _tampered(copy.return_path)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        await asyncio.to_thread(send_report, port, dsn(tampered, CAROL), [tampered])
    assert refused.value.recipients[tampered][0] == 550
    # Logged as Postfix names a client: its address, and its HELO apart (only a claim).
    assert "reject: RCPT from unknown[127.0.0.1] helo=<" in caplog.text
    # A DSN to postmaster naming her: not through her copy's return path, so not believed.
    await asyncio.to_thread(
        send_report,
        port,
        dsn(f"postmaster@{FEEDBACK_DOMAIN}", CAROL),
        [f"postmaster@{FEEDBACK_DOMAIN}"],
    )
    # A DSN to the mailto: address: she may unsubscribe there, not bounce.
    await asyncio.to_thread(send_report, port, dsn(copy.mailto, CAROL), [copy.mailto])
    reports = await processed(feedback_relay, 2)
    assert [r["state"] for r in reports] == ["kept", "kept"]
    assert (await suppressed(feedback_relay, CAROL)) is None
    assert await events_of(feedback_relay, "bounced") == []


# ---------------------------------------------------------------- complaints


@pytest.mark.parametrize("example", ["rfc5965-b1.eml", "rfc5965-b2.eml"])
async def test_rfc5965_examples_match_no_copy_and_are_kept(
    feedback_relay: Relay, example: str
) -> None:
    await sent_copy(feedback_relay, CAROL)
    content = (ARF_DIR / example).read_bytes()
    await asyncio.to_thread(
        send_report, feedback_port(feedback_relay), content, [f"abuse@{FEEDBACK_DOMAIN}"]
    )
    [report] = await processed(feedback_relay)
    assert report["state"] == "kept"
    assert report["outcome"]["nature"] == "arf"
    assert report["outcome"]["feedback_type"] == "abuse"
    assert "matches no copy" in report["outcome"]["why"]
    assert await events_of(feedback_relay, "complaint") == []
    assert (await suppressed(feedback_relay, CAROL)) is None


async def test_a_kept_report_is_listed_and_shown_to_the_operator(
    feedback_relay: Relay, tmp_path: Path
) -> None:
    content = (ARF_DIR / "rfc5965-b1.eml").read_bytes()
    await asyncio.to_thread(
        send_report, feedback_port(feedback_relay), content, [f"abuse@{FEEDBACK_DOMAIN}"]
    )
    [report] = await processed(feedback_relay)
    await feedback_relay.stop()
    config = tmp_path / "relay.toml"
    config.write_text(f'[storage]\ndir = "{tmp_path / "data"}"\n')

    listed = cli(config, "feedback", "list", "--state", "kept")
    assert listed.returncode == 0, listed.stderr
    [line] = listed.stdout.splitlines()
    assert line.split()[:2] == [str(report["id"]), "kept"]
    assert f"to=<abuse@{FEEDBACK_DOMAIN}>" in line and "matches no copy" in line
    assert cli(config, "feedback", "list", "--state", "new").stdout == (
        "No feedback reports in state new\n"
    )
    as_json = cli(config, "feedback", "list", "--format", "jsonl")
    assert json.loads(as_json.stdout)["outcome"]["feedback_type"] == "abuse"

    shown = cli(config, "feedback", "show", str(report["id"]))
    assert shown.returncode == 0, shown.stderr
    head, _, message = shown.stdout.partition("\n\n")
    assert head.splitlines()[0] == line
    assert message == content.decode().replace("\r\n", "\n")  # as it arrived
    missing = cli(config, "feedback", "show", "999999")
    assert (missing.returncode, missing.stderr) == (1, "No feedback report 999999\n")


@pytest.mark.parametrize(
    ("kept", "matched_by"),
    [
        ("reference", "reference"),
        ("return-path", "return-path"),
        ("list-unsubscribe", "list-unsubscribe"),
    ],
)
async def test_a_redacted_complaint_is_matched_by_our_tokens(
    feedback_relay: Relay, kept: str, matched_by: str
) -> None:
    copy = await sent_copy(feedback_relay, CAROL, scope="topic:news")
    headers = {
        "reference": [f"CFBL-Feedback-ID: {copy.reference}"],
        "return-path": [f"Return-Path: <{copy.return_path}>"],
        "list-unsubscribe": [f"List-Unsubscribe: <{copy.unsubscribe_url}>"],
    }[kept]
    returned = [
        *headers,
        "From: Shop <news@shop.example>",
        "To: redacted@redacted.invalid",  # Microsoft's JMRP removes the recipient
        "Subject: Spring sale",
    ]
    await asyncio.to_thread(
        send_report, feedback_port(feedback_relay), arf(returned), [f"fbl@{FEEDBACK_DOMAIN}"]
    )
    [report] = await processed(feedback_relay)
    assert report["outcome"]["action"] == "complaint"
    assert report["outcome"]["matched_by"] == matched_by
    entry = await suppressed(feedback_relay, CAROL)
    assert entry is not None and entry.reason == "complaint" and entry.scope == GLOBAL
    [complaint] = await events_of(feedback_relay, "complaint")
    assert complaint["recipient"] == CAROL
    assert complaint["detail"]["feedback_type"] == "abuse"
    assert complaint["detail"]["reporter"] == "mail.hotmail.example"


async def test_not_spam_feedback_suppresses_nobody(feedback_relay: Relay) -> None:
    copy = await sent_copy(feedback_relay, CAROL)
    returned = [f"CFBL-Feedback-ID: {copy.reference}", "Subject: Spring sale"]
    await asyncio.to_thread(
        send_report,
        feedback_port(feedback_relay),
        arf(returned, feedback_type="not-spam"),
        [f"fbl@{FEEDBACK_DOMAIN}"],
    )
    [report] = await processed(feedback_relay)
    assert report["state"] == "kept"
    assert (await suppressed(feedback_relay, CAROL)) is None


# ---------------------------------------------------------------- mailto: unsubscribes


async def test_mailto_unsubscribe_through_smtplib(feedback_relay: Relay) -> None:
    copy = await sent_copy(feedback_relay, CAROL, scope="topic:news")
    await asyncio.to_thread(
        send_report,
        feedback_port(feedback_relay),
        person_message(CAROL, copy.mailto),
        [copy.mailto],
        CAROL,
    )
    [report] = await processed(feedback_relay)
    assert report["outcome"]["action"] == "unsubscribe"
    entry = await feedback_relay.stores.suppressions.check(CAROL, ["topic:news"])
    assert entry is not None and entry.reason == "unsubscribe" and entry.scope == "topic:news"
    assert (await suppressed(feedback_relay, CAROL)) is None  # her topic only, as the copy said
    [event] = await events_of(feedback_relay, "unsubscribe")
    assert event["detail"]["method"] == "mailto"
    assert event["recipient"] == CAROL


@pytest.mark.parametrize(
    ("sender", "headers"),
    [
        (CAROL, {"Auto-Submitted": "auto-replied"}),
        (CAROL, {"X-Autoreply": "yes"}),
        (CAROL, {"Precedence": "auto_reply"}),
        (CAROL, {"Subject": "Out of office: back on Monday"}),
        ("", {}),  # responders send from the null sender (RFC 3834)
    ],
)
async def test_automatic_replies_to_mailto_or_return_path_change_nothing(
    feedback_relay: Relay, sender: str, headers: dict[str, str]
) -> None:
    copy = await sent_copy(feedback_relay, CAROL)
    port = feedback_port(feedback_relay)
    for to in (copy.mailto, copy.return_path):
        message = person_message(CAROL, to, headers=headers)
        if "Subject" in headers:
            message = message.replace(b"Subject: unsubscribe\r\n", b"", 1)
        await asyncio.to_thread(send_report, port, message, [to], sender)
    reports = await processed(feedback_relay, 2)
    assert [r["state"] for r in reports] == ["kept", "kept"]
    assert (await suppressed(feedback_relay, CAROL)) is None
    assert await events_of(feedback_relay, "unsubscribe") == []


# ---------------------------------------------------------------- exactly once


async def test_a_report_is_acted_on_once_however_often_it_is_processed(
    feedback_relay: Relay,
) -> None:
    """What a runner restarted after a crash between its commit and its bookkeeping does:
    the same report again, here three times at once (twice by hand, once by the relay's
    own runner). Its effects happen once."""
    copy = await sent_copy(feedback_relay, CAROL)
    store = FeedbackStore(feedback_relay.stores.suppressions.database)
    report_id = await store.accept("", [copy.return_path], dsn(copy.return_path, CAROL), "test")
    report = Report(report_id, "", "test", "", (copy.return_path,), dsn(copy.return_path, CAROL))
    settings = feedback_relay.settings
    addresses = FeedbackAddresses(settings.feedback_domains(), CopyTokens(signer(settings)))
    examined = examine(report, addresses, relay_urls(feedback_relay))
    rules = Rules(3, timedelta(days=14), timedelta(days=7))
    database = store.database
    results = await asyncio.gather(
        database.write(functools.partial(apply_report, examined=examined, rules=rules)),
        database.write(functools.partial(apply_report, examined=examined, rules=rules)),
    )
    assert sum(not r.already_done for r in results) <= 1
    await wait_for(_no_pending(store), what="nothing pending")
    assert len(await events_of(feedback_relay, "bounced")) == 1
    [history] = (await feedback_relay.stores.suppressions.show(CAROL)).history
    assert history.action == "add"


def _no_pending(store: FeedbackStore) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await store.count_pending() == 0

    return check
