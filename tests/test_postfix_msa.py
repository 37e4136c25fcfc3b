"""The relay between a marketing tool and a real Postfix (issue 14, items 1 and 2): a bounce
Postfix makes travels back through the relay undecorated, and a submission without Date or
Message-ID still verifies (dkimpy and OpenDKIM) after Postfix added its own Received field."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Iterator
from dataclasses import replace
from email.message import Message
from pathlib import Path

import pytest

from relay.dkim import DkimTxtRecord, generate_key
from relay.settings import DkimKey, DkimSettings, Settings
from tests.helpers import StartRelay, asubmit, free_port, newsletter, relay_settings, wait_for
from tests.opendkim import OpenDkim
from tests.postfix import Postfix, running_postfix, unavailable_reason

dkim = pytest.importorskip("dkim", reason="dkimpy (test extra) verifies the signatures")
pytestmark = pytest.mark.postfix

SENDER = "news@shop.example"
KNOWN = "alice@example.org"
UNKNOWN = "nobody@example.org"
# Where Postfix puts what reaches the sender: its own bounce (a copy, as Postfix made it)
# and the same bounce once it came back through the relay.
BOUNCE_AS_MADE = "bounce-as-made@example.org"
BOUNCE_RELAYED = "sender-inbox@example.org"


def maildir(postfix: Postfix) -> dict[str, list[tuple[Message, bytes]]]:
    """What Postfix delivered, by final recipient: each message parsed and as stored."""
    found: dict[str, list[tuple[Message, bytes]]] = {}
    for raw in postfix.delivered():
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
        found.setdefault(str(message["Delivered-To"]), []).append((message, raw))
    return found


def crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def signed_settings(
    tmp_path: Path, postfix: Postfix, domains: tuple[str, ...]
) -> tuple[Settings, list[DkimTxtRecord]]:
    keys, records = [], []
    for domain in domains:
        path, record = generate_key(domain, "s1", tmp_path / "data" / "dkim")
        keys.append(DkimKey(domain, "s1", path))
        records.append(record)
    settings = relay_settings(tmp_path / "data", postfix.port)
    return replace(settings, dkim=DkimSettings(tuple(keys))), records


def dkimpy_verifies(raw: bytes, records: list[DkimTxtRecord]) -> bool:
    by_name = {f"{r.name}.": r.text.encode() for r in records}
    return bool(dkim.verify(crlf(raw), dnsfunc=lambda name, timeout=5: by_name[name.decode()]))


@pytest.fixture
def relay_port() -> int:
    return free_port()


@pytest.fixture
def postfix(relay_port: int) -> Iterator[Postfix]:
    """Postfix as the relay's downstream: example.org has only the known mailboxes, and the
    sender's domain is reached through the relay, so Postfix's bounces go through it."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"Postfix integration test skipped: {reason}")
    with running_postfix(
        mailboxes=(KNOWN, BOUNCE_AS_MADE, BOUNCE_RELAYED),
        transports={"shop.example": f"smtp:[127.0.0.1]:{relay_port}"},
        aliases={SENDER: f"{SENDER},{BOUNCE_AS_MADE}"},
        smtp_aliases={SENDER: BOUNCE_RELAYED},
    ) as instance:
        yield instance


async def test_a_postfix_bounce_comes_back_through_the_relay_undecorated(
    tmp_path: Path, postfix: Postfix, relay_port: int, start_relay: StartRelay
) -> None:
    settings, records = signed_settings(tmp_path, postfix, ("shop.example", "postfix.test"))
    settings = replace(
        settings, smtp=replace(settings.smtp, listen=replace(settings.smtp.listen, port=relay_port))
    )
    await start_relay(settings)
    result = await asubmit(relay_port, newsletter([KNOWN, UNKNOWN]), SENDER, [KNOWN, UNKNOWN])
    assert result.refused == {}

    await wait_for(
        lambda: {KNOWN, BOUNCE_AS_MADE, BOUNCE_RELAYED} <= maildir(postfix).keys(),
        within=60,
        what="the newsletter, and Postfix's bounce as made and as relayed",
    )
    boxes = maildir(postfix)
    [(made, as_made)], [(relayed, as_relayed)] = boxes[BOUNCE_AS_MADE], boxes[BOUNCE_RELAYED]
    assert made.get_content_type() == "multipart/report"  # Postfix's own DSN
    assert UNKNOWN in str(made.get_payload(0).get_payload())

    # The relay signed it and added its hop, and nothing else.
    assert relayed["Return-Path"] == "<>"
    assert relayed["List-Unsubscribe"] is None and relayed["List-Unsubscribe-Post"] is None
    assert relayed["DKIM-Signature"] is not None and " d=postfix.test;" in " ".join(
        str(relayed["DKIM-Signature"]).split()
    )
    assert "(optout-relay)" in " ".join(str(r) for r in relayed.get_all("Received"))
    assert as_relayed.split(b"\n\n", 1)[1] == as_made.split(b"\n\n", 1)[1]  # byte for byte
    notice = relayed.get_payload(0).get_payload(decode=True)
    assert b"Unsubscribe" not in notice and b"mail.shop.example" not in notice
    assert dkimpy_verifies(as_relayed, records)

    # The newsletter itself was decorated as usual.
    [(newsletter_copy, _)] = boxes[KNOWN]
    assert newsletter_copy["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


async def test_without_date_and_message_id_the_signature_survives_postfix(
    tmp_path: Path, postfix: Postfix, start_relay: StartRelay, opendkim: OpenDkim
) -> None:
    settings, records = signed_settings(tmp_path, postfix, ("shop.example",))
    relay = await start_relay(settings)
    message = newsletter([KNOWN])
    del message["Message-ID"]
    result = await asubmit(relay.addresses.smtp[1], message, SENDER, [KNOWN])
    assert result.refused == {}
    await wait_for(lambda: KNOWN in maildir(postfix), within=30, what="the delivered copy")

    [raw] = postfix.delivered()
    delivered = email.message_from_bytes(raw, policy=email.policy.compat32)
    received = [" ".join(str(r).split()) for r in delivered.get_all("Received")]
    assert "by postfix.test (Postfix)" in received[0]  # Postfix's hop on top...
    assert "by relay.test (optout-relay)" in received[1]  # ...of the relay's
    assert len(delivered.get_all("Date")) == 1 and len(delivered.get_all("Message-ID")) == 1
    assert str(delivered["Message-ID"]).endswith("@relay.test>")
    assert dkimpy_verifies(raw, records)
    [verdict] = opendkim.verify([crlf(raw)], records, tmp_path)
    assert verdict.passed, verdict
