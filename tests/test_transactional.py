"""Transactional mail is known at RCPT: by the account it logs in as (`category`) or by
the listener it comes to (`smtp.transactional_listen`), as ESPs separate streams. Then only
hard bounces and complaints refuse a recipient; an unsubscribe from marketing does not,
and the copy leaves undecorated. Marketing mail is refused for every opt-out."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay.accounts import Account, hash_password
from relay.app import Relay
from relay.settings import Listen
from suppression import Reason
from tests.helpers import (
    PASSWORD,
    CaptureServer,
    StartRelay,
    events_of,
    newsletter,
    relay_settings,
    run_cli,
    session,
    submit,
    untrusted,
    wait_for,
    with_smtp,
)

SENDER = "orders@shop.example"
UNSUBSCRIBED = "unsub@example.org"  # opted out of marketing mail: receipts still go
BOUNCED = "bounced@example.org"  # a hard bounce: no mail at all
COMPLAINED = "complained@example.org"  # a complaint about shop.example's mail: none from it
FRESH = "fresh@example.org"
HASH = hash_password(PASSWORD)
MARKETING = Account("mautic", HASH, ("shop.example",))
RECEIPTS = Account("shopapp", HASH, ("shop.example",), category="transactional")


async def suppress_the_three(relay: Relay) -> None:
    suppressions = relay.stores.suppressions
    await suppressions.add(UNSUBSCRIBED, reason=Reason.UNSUBSCRIBE)
    await suppressions.add(BOUNCED, reason=Reason.HARD_BOUNCE)
    await suppressions.add(COMPLAINED, scope="sender:shop.example", reason=Reason.COMPLAINT)


def receipt(to: list[str], *, big: bool = False) -> bytes:
    message = newsletter(to, sender=SENDER, subject="Your order")
    if big:  # past the spill threshold: written to a file as it arrives
        message.add_attachment(b"x" * 300_000, maintype="application", subtype="pdf")
    return message.as_bytes()


def refused_codes(refused: dict[str, tuple[int, bytes]]) -> dict[str, int]:
    return {address: code for address, (code, _) in refused.items()}


async def delivered_to(downstream: CaptureServer, address: str) -> bytes:
    await wait_for(lambda: bool(downstream.handler.for_recipient(address)), what=address)
    [copy] = downstream.handler.for_recipient(address)
    return copy.content


def assert_undecorated(copy: bytes) -> None:
    headers = copy.split(b"\r\n\r\n", 1)[0]
    assert b"List-Unsubscribe" not in headers
    assert b"X-Optout-Category" not in headers  # the relay's stamp is read and removed
    assert b"/o/" not in copy and b"/u/" not in copy  # no pixel, no unsubscribe link
    assert b"Subject: Your order" in headers


async def test_an_accounts_category_decides_at_rcpt(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    relay = await start_relay(untrusted(tmp_path, downstream.port, (MARKETING, RECEIPTS)))
    await suppress_the_three(relay)
    everyone = [UNSUBSCRIBED, BOUNCED, COMPLAINED, FRESH]

    def send(login: str) -> dict[str, tuple[int, bytes]]:
        with session(relay.addresses.smtp[1], login=login) as client:
            return client.sendmail(SENDER, everyone, receipt(everyone))

    marketing = await asyncio.to_thread(send, "mautic")
    transactional = await asyncio.to_thread(send, "shopapp")

    assert refused_codes(marketing) == {UNSUBSCRIBED: 550, BOUNCED: 550, COMPLAINED: 550}
    assert refused_codes(transactional) == {BOUNCED: 550, COMPLAINED: 550}
    assert_undecorated(await delivered_to(downstream, UNSUBSCRIBED))
    await wait_for(lambda: len(downstream.handler.for_recipient(FRESH)) == 2, what="both")
    by_kind = {
        b"List-Unsubscribe" in copy.content: copy.content
        for copy in downstream.handler.for_recipient(FRESH)
    }
    assert set(by_kind) == {True, False}  # the marketing copy decorated, the receipt not
    assert_undecorated(by_kind[False])
    details = [(e["detail"]["reason"], e["detail"]["account"]) for e in await refused(relay)]
    assert sorted(details) == [
        ("complaint", "mautic"),
        ("complaint", "shopapp"),
        ("hard_bounce", "mautic"),
        ("hard_bounce", "shopapp"),
        ("unsubscribe", "mautic"),
    ]


async def refused(relay: Relay) -> list[dict[str, object]]:
    return await events_of(relay, "refused")


@pytest.mark.parametrize("big", [False, True], ids=["in memory", "spilled"])
async def test_the_transactional_listener_takes_receipts_to_the_unsubscribed(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay, big: bool
) -> None:
    settings = with_smtp(
        relay_settings(tmp_path / "data", downstream.port),
        transactional_listen=Listen("127.0.0.1", 0),
    )
    relay = await start_relay(settings)
    await suppress_the_three(relay)
    assert relay.addresses.transactional is not None
    everyone = [UNSUBSCRIBED, BOUNCED, FRESH]

    marketing = await asyncio.to_thread(
        submit, relay.addresses.smtp[1], receipt(everyone, big=big), SENDER, everyone
    )
    transactional = await asyncio.to_thread(
        submit, relay.addresses.transactional[1], receipt(everyone, big=big), SENDER, everyone
    )

    assert refused_codes(marketing.refused) == {UNSUBSCRIBED: 550, BOUNCED: 550}
    assert refused_codes(transactional.refused) == {BOUNCED: 550}
    copy = await delivered_to(downstream, UNSUBSCRIBED)
    assert_undecorated(copy)
    if big:
        assert len(copy) > 300_000  # the whole message, attachment and all


async def test_a_sender_cannot_make_a_receipt_marketing_again(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    """The stream decides: the relay's stamp comes first, whatever the message says."""
    settings = with_smtp(
        relay_settings(tmp_path / "data", downstream.port),
        transactional_listen=Listen("127.0.0.1", 0),
    )
    relay = await start_relay(settings)
    assert relay.addresses.transactional is not None
    message = newsletter([FRESH], sender=SENDER, subject="Your order")
    message["X-Optout-Category"] = "marketing"

    result = await asyncio.to_thread(
        submit, relay.addresses.transactional[1], message.as_bytes(), SENDER, [FRESH]
    )

    assert result.error is None
    assert_undecorated(await delivered_to(downstream, FRESH))


def test_an_unknown_category_is_a_config_error(tmp_path: Path) -> None:
    cert = tmp_path / "tls.pem"
    cert.write_text("")
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[storage]\ndir = "{tmp_path}"\n[smtp]\ntls_cert = "{cert}"\ntls_key = "{cert}"\n'
        f'[[accounts]]\nusername = "a"\npassword_hash = "{HASH}"\n'
        'from_domains = ["shop.example"]\ncategory = "bulk"\n'
    )
    result = run_cli("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert (
        "accounts[0].category: must be one of marketing, transactional (got 'bulk')"
        in result.stderr
    )
