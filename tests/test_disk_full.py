"""A full disk under the spool: 451 and never 250, and the relay recovers when space returns."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.helpers import CaptureServer, StartRelay, asubmit, newsletter, relay_settings, wait_for

RCPT = "nina@example.org"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB filesystem (tmpfs), so ENOSPC comes from the kernel, not from a fake."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    if os.geteuid() != 0:
        pytest.skip("disk-full test skipped: mounting a small tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"disk-full test skipped: cannot mount tmpfs ({mounted.stderr.strip()})")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(directory: Path) -> Path:
    """Take every free byte of the filesystem."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as file:
        for size in (65536, 4096, 512, 1):
            try:
                while file.write(b"\0" * size):
                    pass
            except OSError:
                continue
    return filler


def big_newsletter() -> EmailMessage:
    message = newsletter([RCPT])
    message.add_attachment(
        os.urandom(300_000),
        maintype="application",
        subtype="octet-stream",
        filename="catalogue.bin",
    )
    return message


async def test_full_disk_gets_451_then_recovers(
    small_disk: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    relay = await start_relay(relay_settings(small_disk / "data", downstream.port))
    port = relay.addresses.smtp[1]
    filler = await asyncio.to_thread(fill, small_disk)
    for _ in range(3):
        refused = await asubmit(port, big_newsletter(), "news@shop.example", [RCPT])
        assert refused.reply is not None and refused.reply[0] == 451, refused
        assert refused.reply[1].startswith(b"4.3.0")
    assert downstream.handler.messages == []

    filler.unlink()  # space returns
    accepted = await asubmit(port, big_newsletter(), "news@shop.example", [RCPT])
    assert accepted.error is None and accepted.refused == {}
    await wait_for(lambda: len(downstream.handler.messages) == 1, what="delivery")


async def test_sent_copies_are_not_sent_again_while_their_outcome_cannot_be_written(
    small_disk: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    downstream.handler.rcpt_replies[RCPT] = "451 4.3.0 Not yet"
    relay = await start_relay(relay_settings(small_disk / "data", downstream.port))
    accepted = await asubmit(
        relay.addresses.smtp[1], newsletter([RCPT]), "news@shop.example", [RCPT]
    )
    assert accepted.error is None

    async def deferred_once() -> bool:
        return any(e.attempts for e in await relay.spool.entries())

    await wait_for(deferred_once, what="a first deferral")
    filler = await asyncio.to_thread(fill, small_disk)
    del downstream.handler.rcpt_replies[RCPT]  # the MTA takes it; recording it fails
    await wait_for(lambda: len(downstream.handler.messages) >= 1, what="the copy")
    # An observation window, not a wait for readiness: resends would show up here
    # (before the fix, hundreds of copies arrived within a second).
    await asyncio.sleep(1.5)
    copies_while_full = len(downstream.handler.messages)
    filler.unlink()
    await wait_for(lambda: relay.spool.waiting == 0, within=30, what="an empty spool")
    # Not a storm of resends: the copy was sent once, its outcome written later.
    assert copies_while_full == 1
    assert len(downstream.handler.messages) == 1
