"""`optout-relay queue`: what waits, why, and the operator's retry, hold, release and delete,
as Postfix's mailq and postsuper."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from relay.spool import Spool
from tests.helpers import (
    ROOT,
    StartRelay,
    asubmit,
    newsletter,
    relay_settings,
    wait_for,
    with_delivery,
)


@pytest.fixture
async def queued(
    tmp_path: Path, closed_port: int, start_relay: StartRelay
) -> tuple[Path, list[str]]:
    """A data dir with two messages deferred because the downstream is down."""
    relay = await start_relay(relay_settings(tmp_path / "data", closed_port))
    for who in ("lena", "mike"):
        rcpt = f"{who}@example.org"
        await asubmit(relay.addresses.smtp[1], newsletter([rcpt]), "news@shop.example", [rcpt])

    async def both_tried() -> bool:
        return all(e.attempts >= 1 for e in await relay.spool.entries())

    await wait_for(both_tried, what="a first attempt for each")
    ids = [e.queue_id for e in await relay.spool.entries()]
    await relay.stop()  # the CLI works on the data dir of a stopped relay
    config = tmp_path / "relay.toml"
    config.write_text(f'[storage]\ndir = "{tmp_path / "data"}"\n')
    return config, ids


def queue(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "queue", *args, "--config", str(config)],
        cwd=config.parent,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )


def test_list_show_retry_delete(queued: tuple[Path, list[str]]) -> None:
    config, (first, second) = queued
    listed = queue(config, "list")
    assert listed.returncode == 0, listed.stderr
    assert first in listed.stdout and second in listed.stdout
    assert "lena@example.org" in listed.stdout
    assert "connect to 127.0.0.1:" in listed.stdout  # why it waits
    assert listed.stdout.rstrip().endswith("-- 2 messages, 2 recipients waiting")

    shown = queue(config, "show", first)
    assert shown.returncode == 0
    assert "Subject: Spring sale" in shown.stdout

    retried = queue(config, "retry", first)
    # A second line says delivery is paused, if the relay's short pause is still running.
    assert (retried.returncode, retried.stdout.splitlines()[0]) == (0, "1 deliveries due now")

    deleted = queue(config, "delete", first)
    assert deleted.returncode == 0
    assert first not in queue(config, "list").stdout
    missing = queue(config, "delete", first)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"no such message in the queue: {first}"


async def test_no_spool_is_said_and_not_created_and_an_empty_one_is_empty(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f'[storage]\ndir = "{tmp_path / "data"}"\n')
    missing = queue(config, "list")
    assert missing.returncode == 2
    assert missing.stderr.startswith(f"optout-relay: error: no store in {tmp_path / 'data'}")
    assert not (tmp_path / "data" / "spool.db").exists()

    await (await Spool.open(tmp_path / "data" / "spool.db")).close()  # as serve leaves it
    result = queue(config, "list")
    assert (result.returncode, result.stdout.strip()) == (0, "Mail queue is empty")


def test_hold_and_release_by_id_from_stdin_and_all(queued: tuple[Path, list[str]]) -> None:
    config, (first, second) = queued
    held = queue(config, "hold", first)
    assert (held.returncode, held.stdout) == (0, f"held {first}\n1 messages held\n")
    listed = queue(config, "list").stdout
    assert f"{first}!  " in listed and f"{second}  " in listed  # mailq's hold mark
    assert "(held: by the operator)" in listed
    assert listed.rstrip().endswith("-- 2 messages, 2 recipients waiting, 1 held")

    retried = queue(config, "retry")  # a retry leaves a held message held
    assert retried.stdout.startswith("1 deliveries due now")
    again = queue(config, "hold", first)
    assert again.returncode == 1
    assert again.stderr.strip() == f"no such message waiting (or it is held already): {first}"

    # Ids on stdin, as `queue list | grep ... | queue release -`: the first word of a line.
    released = queue(config, "release", "-", stdin=f"{first}!  1234  2026-01-01  x\nnoise\n")
    assert (released.returncode, released.stdout) == (0, f"released {first}\n1 messages released\n")
    assert "!" not in queue(config, "list").stdout

    everything = queue(config, "hold", "ALL")
    assert everything.stdout.endswith("2 messages held\n")
    assert queue(config, "list").stdout.rstrip().endswith("2 held")
    assert queue(config, "release", "ALL").stdout.endswith("2 messages released\n")
    not_held = queue(config, "release", second)
    assert (not_held.returncode, not_held.stderr.strip()) == (
        1,
        f"no such held message: {second}",
    )


def test_delete_from_stdin_and_all(queued: tuple[Path, list[str]]) -> None:
    config, (first, _) = queued
    deleted = queue(config, "delete", "-", stdin=f"{first}\n")
    assert (deleted.returncode, deleted.stdout) == (0, f"deleted {first} (1 deliveries)\n")
    assert first not in queue(config, "list").stdout
    everything = queue(config, "delete", "ALL")
    assert (everything.returncode, everything.stdout) == (0, "deleted 1 messages (1 deliveries)\n")
    assert queue(config, "list").stdout.strip() == "Mail queue is empty"
    nothing = queue(config, "delete")
    assert nothing.returncode == 2
    assert "name queue ids, ALL, or -" in nothing.stderr


async def test_retry_says_when_a_pause_delays_it_beside_a_running_serve(
    tmp_path: Path, closed_port: int, start_relay: StartRelay
) -> None:
    """The next hop is down: the delivery process pauses all delivery; the CLI, run beside
    the serve, says until when instead of promising an immediate retry."""
    settings = with_delivery(
        relay_settings(tmp_path / "data", closed_port), retry_initial_delay=60, retry_max_delay=600
    )
    relay = await start_relay(settings)
    rcpt = "lena@example.org"
    await asubmit(relay.addresses.smtp[1], newsletter([rcpt]), "news@shop.example", [rcpt])
    paused = tmp_path / "data" / "delivery-0.paused"
    await wait_for(paused.exists, within=20, what="the pause to be written")
    config = tmp_path / "relay.toml"
    config.write_text(f'[storage]\ndir = "{tmp_path / "data"}"\n')

    retried = queue(config, "retry")
    assert retried.returncode == 0, retried.stderr
    first, second = retried.stdout.splitlines()
    assert first == "1 deliveries due now"
    assert second.startswith("delivery is paused until 20")
    assert f"next hop unreachable (connect to 127.0.0.1:{closed_port} failed" in second
    assert second.endswith("; they go out then")
    assert queue(config, "list").stdout.startswith("delivery is paused until ")
