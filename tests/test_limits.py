"""Bounded work per message, whatever its shape (issue 13, item 1, the rewrite's side).

Past a limit a message is refused at DATA where the front door can tell cheaply (parts,
nesting); else it is delivered with a text part carrying the unsubscribe link appended to
its multipart/mixed; else returned to its sender with a DSN saying why. Never sent without
an unsubscribe link. The two bombs of the issue cost the rewrite bounded memory.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from relay.app import Relay
from relay.settings import RewriteSettings
from tests.helpers import (
    ROOT,
    CaptureServer,
    StartRelay,
    asubmit,
    events_of,
    parse,
    relay_settings,
    spool_depth,
    wait_for,
)

HEAD = (
    b"From: Shop <news@shop.example>\r\nTo: ann@example.org\r\nSubject: shapes\r\n"
    b"Date: Tue, 10 Mar 2026 09:14:01 +0000\r\nMessage-ID: <shape@shop.example>\r\n"
    b"MIME-Version: 1.0\r\n"
)


def boundary_lines(count: int) -> bytes:
    """A multipart/mixed whose body is nothing but `count` delimiter lines."""
    return HEAD + b"Content-Type: multipart/mixed; boundary=z\r\n\r\n" + b"--z\r\n" * count


def nested(depth: int) -> bytes:
    opening = b"".join(
        b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
        for i in range(depth)
    )
    return (
        HEAD
        + b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n"
        + opening
        + b"--b%d\r\nContent-Type: text/plain\r\n\r\ndeep\r\n" % depth
    )


SHAPES = {
    "2,000 parts in memory": (boundary_lines(2000), b"more than 1000 MIME parts"),
    "40,000 parts spilled to a file": (boundary_lines(40_000), b"more than 1000 MIME parts"),
    "nested 101 deep": (nested(101), b"nested deeper than 100"),
}


@pytest.mark.parametrize("shape", SHAPES)
async def test_the_front_door_refuses_what_is_past_the_structure_limits(
    relay: Relay, tmp_path: Path, shape: str
) -> None:
    raw, reason = SHAPES[shape]
    result = await asubmit(relay.addresses.smtp[1], raw, "news@shop.example", ["ann@example.org"])
    assert result.reply is not None, shape
    code, text = result.reply
    assert code == 554 and text.startswith(b"5.6.0 ") and reason in text, (shape, text)
    assert await spool_depth(tmp_path / "data") == (0, 0)


async def test_a_shape_within_the_limits_is_taken(relay: Relay, downstream: CaptureServer) -> None:
    result = await asubmit(
        relay.addresses.smtp[1], nested(99), "news@shop.example", ["ann@example.org"]
    )
    assert result.refused == {} and result.reply == (250, b"")
    await wait_for(lambda: len(downstream.handler.messages) == 1, what="the deep message")
    assert b"Unsubscribe: https://mail.shop.example/u/" in downstream.handler.messages[0].content


def html_with_comments(count: int) -> bytes:
    return b"<html><body><p>Hello</p>" + b"<!-- x -->" * count + b"</body></html>\r\n"


@pytest.fixture
async def small_limits(tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay) -> Relay:
    """A relay whose HTML token limit (20) is passed by what the front door cannot see."""
    settings = relay_settings(tmp_path / "data", downstream.port)
    return await start_relay(replace(settings, rewrite=RewriteSettings(max_html_tokens=20)))


async def test_past_a_limit_a_mixed_message_gets_a_footer_part(
    small_limits: Relay, downstream: CaptureServer
) -> None:
    body = (
        b"--m\r\nContent-Type: text/plain\r\n\r\nHello\r\n"
        b"--m\r\nContent-Type: text/html\r\n\r\n" + html_with_comments(30) + b"--m--\r\n"
    )
    raw = HEAD + b"Content-Type: multipart/mixed; boundary=m\r\n\r\n" + body
    await asubmit(small_limits.addresses.smtp[1], raw, "news@shop.example", ["ann@example.org"])
    await wait_for(lambda: len(downstream.handler.messages) == 1, what="the copy")
    copy = downstream.handler.messages[0].content
    message = parse(copy)
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    parts = message.get_payload()
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html", "text/plain"]
    footer = parts[-1].get_payload(decode=True)
    assert footer.startswith(b"-- \r\nUnsubscribe: https://mail.shop.example/u/")
    # The sender's parts as sent: the limit stopped the rewrite, not the delivery.
    assert body[: -len(b"--m--\r\n")] in copy


async def test_past_a_limit_with_nowhere_for_a_link_the_sender_gets_a_dsn(
    small_limits: Relay, downstream: CaptureServer
) -> None:
    raw = HEAD + b"Content-Type: text/html\r\n\r\n" + html_with_comments(30)
    await asubmit(small_limits.addresses.smtp[1], raw, "news@shop.example", ["ann@example.org"])
    await wait_for(lambda: len(downstream.handler.messages) == 1, what="the DSN")
    [dsn] = downstream.handler.messages
    assert dsn.mail_from == "<>" and dsn.recipients == ["news@shop.example"]
    report = parse(dsn.content)
    assert report.get_content_type() == "multipart/report"
    assert b"5.6.0" in dsn.content and b"more than 20 tags and comments" in dsn.content

    # The bounced event reaches the event log through the spool's journal, after the DSN.
    async def bounced_event() -> bool:
        return len(await events_of(small_limits, "bounced")) == 1

    await wait_for(bounced_event, what="the bounced event")
    [bounced] = await events_of(small_limits, "bounced")
    assert bounced["detail"]["reply"].startswith("554 5.6.0 message not sent")
    assert await events_of(small_limits, "delivered") == []


async def test_past_a_limit_mail_that_needs_no_link_goes_as_it_came(
    small_limits: Relay, downstream: CaptureServer
) -> None:
    body = html_with_comments(30)
    raw = HEAD + b"X-Optout-Category: transactional\r\nContent-Type: text/html\r\n\r\n" + body
    await asubmit(small_limits.addresses.smtp[1], raw, "news@shop.example", ["ann@example.org"])
    await wait_for(lambda: len(downstream.handler.messages) == 1, what="the copy")
    assert downstream.handler.messages[0].content.endswith(b"\r\n\r\n" + body)


BOMBS = textwrap.dedent(
    """
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    from relay.pipeline import Pipeline
    from suppression import AddressHasher
    from tracking import TrackingUrls
    from tracking.signing import Signer

    head = b"From: news@shop.example\\nSubject: bomb\\n"
    bombs = {
        "boundaries": head + b"Content-Type: multipart/mixed; boundary=z\\n\\n"
        + b"--z\\n" * 6_000_000,
        "attributes": head + b"Content-Type: text/html\\n\\n<html><body><a"
        + b" a" * 9_000_000 + b' href="https://shop.example/">x</a></body></html>\\n',
    }
    urls = TrackingUrls("https://m.example", Signer(["a-signing-key-of-16-chars-or-more"]))
    hasher = AddressHasher(b"an-address-hash-key-0123456789ab")
    for name, raw in bombs.items():
        prepared = Pipeline(clicks=True).prepare("Q" + name, "news@shop.example", raw)
        copy = prepared.personalise("ann@example.org", urls, hasher)
        assert b"https://m.example/u/" in copy, name
        print(name, "|", "; ".join(prepared.meta.decisions))
        del raw, prepared, copy
    """
)


def test_the_bombs_of_issue_13_rewrite_within_512_mb() -> None:
    """A 23 MB multipart/mixed of six million delimiter lines and an HTML tag with nine
    million attributes, rewritten in a process that may not map more than 512 MB."""
    script = BOMBS.replace("ADDRESS_SPACE", str(512 * 1024 * 1024))
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    decisions = dict(line.split(" | ", 1) for line in done.stdout.splitlines())
    assert "over the limits on work: more than 1000 MIME parts" in decisions["boundaries"]
    assert "a text part with the unsubscribe link appended" in decisions["boundaries"]
    assert "text/html (us-ascii, 7bit) personalised: footer" in decisions["attributes"]
