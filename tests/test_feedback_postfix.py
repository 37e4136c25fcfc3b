"""A real Postfix downstream bounces a copy to an unknown user with its own DSN, which it
routes to the feedback listener (transport_maps for the feedback domain): the recipient is
suppressed and the next RCPT to it is refused."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.settings import Listen
from tests.feedback_helpers import FEEDBACK_DOMAIN, with_feedback
from tests.helpers import (
    StartRelay,
    asubmit,
    events_of,
    free_port,
    newsletter,
    relay_settings,
    wait_for,
)
from tests.postfix import Postfix, running_postfix, unavailable_reason

pytestmark = pytest.mark.postfix

ALICE = "alice@example.org"
GHOST = "ghost@example.org"


@pytest.fixture
def feedback_port() -> int:
    return free_port()


@pytest.fixture
def postfix(feedback_port: int) -> Iterator[Postfix]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"Postfix integration test skipped: {reason}")
    extra = (
        # Only alice has a mailbox; others are taken at RCPT and bounced by the virtual
        # delivery agent afterwards, with a DSN of Postfix's own to the envelope sender.
        "virtual_mailbox_maps = inline:{ alice@example.org=catchall/ }",
        "smtpd_reject_unlisted_recipient = no",
        f"transport_maps = inline:{{ {FEEDBACK_DOMAIN}=smtp:[127.0.0.1]:{feedback_port} }}",
    )
    with running_postfix(extra=extra) as instance:
        yield instance


async def test_postfix_dsn_for_an_unknown_user_suppresses_it(
    tmp_path: Path, postfix: Postfix, feedback_port: int, start_relay: StartRelay
) -> None:
    settings = with_feedback(
        relay_settings(tmp_path / "data", postfix.port), listen=Listen("127.0.0.1", feedback_port)
    )
    relay = await start_relay(settings)
    port = relay.addresses.smtp[1]
    result = await asubmit(port, newsletter([ALICE, GHOST]), "news@shop.example", [ALICE, GHOST])
    assert result.refused == {}
    await wait_for(lambda: len(postfix.delivered()) == 1, within=30, what="alice's copy")
    [delivered] = postfix.delivered()
    message = email.message_from_bytes(delivered, policy=email.policy.compat32)
    assert message["Return-Path"].strip("<>").endswith(f"@{FEEDBACK_DOMAIN}")

    async def ghost_suppressed() -> bool:
        return await relay.stores.suppressions.check(GHOST) is not None

    await wait_for(ghost_suppressed, within=60, what=f"Postfix's DSN\n{postfix.log()}")
    entry = await relay.stores.suppressions.check(GHOST)
    assert entry is not None and entry.reason == "hard_bounce"
    [bounced] = [e for e in await events_of(relay, "bounced") if e["recipient"] == GHOST]
    assert bounced["detail"]["source"] == "dsn"
    assert bounced["detail"]["status"].startswith("5.1.")
    assert bounced["detail"]["reporting_mta"] == "postfix.test"
    assert await relay.stores.suppressions.check(ALICE) is None

    again = await asubmit(port, newsletter([ALICE, GHOST]), "news@shop.example", [ALICE, GHOST])
    assert again.refused[GHOST][0] == 550
    assert again.refused[GHOST][1].startswith(b"5.7.1")
    assert ALICE not in again.refused
