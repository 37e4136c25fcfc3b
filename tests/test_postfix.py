"""The end-to-end path with Debian's Postfix as the downstream MTA."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import (
    StartRelay,
    asubmit,
    body_of,
    local_url,
    newsletter,
    relay_settings,
    wait_for,
)
from tests.postfix import Postfix, running_postfix, unavailable_reason

pytestmark = pytest.mark.postfix

ALICE = "alice@example.org"
BOB = "bob@example.org"


@pytest.fixture
def postfix() -> Iterator[Postfix]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"Postfix integration test skipped: {reason}")
    with running_postfix() as instance:
        yield instance


async def test_through_postfix_to_a_maildir(
    tmp_path: Path, postfix: Postfix, start_relay: StartRelay
) -> None:
    relay = await start_relay(relay_settings(tmp_path, postfix.port))
    port = relay.addresses.smtp[1]
    result = await asubmit(port, newsletter([ALICE, BOB]), "news@shop.example", [ALICE, BOB])
    assert result.refused == {}
    await wait_for(lambda: len(postfix.delivered()) == 2, within=30, what="2 in the Maildir")

    copies = {}
    for raw in postfix.delivered():
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
        copies[message["X-Original-To"]] = message
        assert message["Return-Path"] == "<news@shop.example>"
        assert message.get_all("List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"]
    assert set(copies) == {ALICE, BOB}
    urls = {a: m["List-Unsubscribe"].strip("<>") for a, m in copies.items()}
    assert urls[ALICE] != urls[BOB]
    for address, message in copies.items():
        assert urls[address] in body_of(message, "plain")
        assert urls[address] in body_of(message, "html")
        assert "/o/" in body_of(message, "html")

    async with (
        aiohttp.ClientSession() as http,
        http.post(
            local_url(relay, urls[ALICE]),
            data={"List-Unsubscribe": "One-Click"},
            allow_redirects=False,
        ) as response,
    ):
        assert response.status == 200

    again = await asubmit(port, newsletter([ALICE, BOB]), "news@shop.example", [ALICE, BOB])
    assert again.refused[ALICE][0] == 550
    await wait_for(lambda: len(postfix.delivered()) == 3, within=30, what="bob's second")
    newest = [
        email.message_from_bytes(raw, policy=email.policy.compat32)["X-Original-To"]
        for raw in postfix.delivered()
    ]
    assert newest.count(BOB) == 2 and newest.count(ALICE) == 1
