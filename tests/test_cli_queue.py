"""`optout-relay queue`: what waits, why, and the operator's retry and delete."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import StartRelay, asubmit, newsletter, relay_settings, run_cli, wait_for


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


def queue(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("queue", *args, "--config", str(config), cwd=config.parent)


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
    assert (retried.returncode, retried.stdout.strip()) == (0, "1 deliveries due now")

    deleted = queue(config, "delete", first)
    assert deleted.returncode == 0
    assert first not in queue(config, "list").stdout
    missing = queue(config, "delete", first)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"no such message in the queue: {first}"


def test_empty_queue(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f'[storage]\ndir = "{tmp_path / "data"}"\n')
    result = queue(config, "list")
    assert (result.returncode, result.stdout.strip()) == (0, "Mail queue is empty")
