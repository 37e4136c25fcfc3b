"""The data dir: one serve at a time (the CLI beside it), and every file in it private."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from tests.helpers import (
    CaptureServer,
    StartRelay,
    asubmit,
    cli,
    free_ports,
    newsletter,
    relay_settings,
    run_cli,
    wait_for,
)


async def test_a_second_serve_on_the_same_data_dir_exits_at_once_naming_the_first(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    data = tmp_path / "data"
    relay = await start_relay(relay_settings(data, downstream.port))
    smtp, http = free_ports(2)
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[storage]\ndir = "{data}"\n[smtp]\nlisten = "127.0.0.1:{smtp}"\n'
        f'[http]\nlisten = "127.0.0.1:{http}"\n'
    )
    started = time.monotonic()
    second = run_cli("serve", "--config", str(config), cwd=tmp_path)
    assert second.returncode == 2
    assert second.stderr.strip() == (
        f"optout-relay: error: config: storage.dir: {data} is in use by another"
        f" optout-relay serve (pid {os.getpid()}); stop it first"
    )
    assert time.monotonic() - started < 30  # it did not go on to serve

    # The CLI works beside the running serve, reading and writing.
    assert cli(config, "queue", "list").stdout.strip() == "Mail queue is empty"
    assert cli(config, "suppress", "add", "ann@example.org").returncode == 0
    assert cli(config, "suppress", "check", "ann@example.org").returncode == 0

    await relay.stop()  # the lock goes with the process's descriptor
    again = await start_relay(relay_settings(data, downstream.port))
    assert again.addresses.smtp[1]


async def test_every_file_in_the_data_dir_is_private_even_in_a_0755_directory(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)  # as an operator makes it
    first = await start_relay(relay_settings(data, downstream.port))
    await first.stop()
    for name in ("optout.db", "spool.db"):  # as an older relay left them (SQLite's 0644)
        (data / name).chmod(0o644)

    relay = await start_relay(relay_settings(data, downstream.port))
    rcpt = "ann@example.org"
    await asubmit(relay.addresses.smtp[1], newsletter([rcpt]), "news@shop.example", [rcpt])
    await wait_for(lambda: len(downstream.handler.messages) == 1, what="a delivery")

    files = [p for p in data.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"optout.db", "optout.db-wal", "spool.db", "spool.db-wal", "serve.lock"} <= names
    readable = {
        str(p.relative_to(data)): stat.filemode(p.stat().st_mode)
        for p in files
        if p.stat().st_mode & 0o077
    }
    assert readable == {}


async def test_outbox_copies_are_private(tmp_path: Path, start_relay: StartRelay) -> None:
    relay = await start_relay(relay_settings(tmp_path / "data", None))
    rcpt = "ann@example.org"
    await asubmit(relay.addresses.smtp[1], newsletter([rcpt]), "news@shop.example", [rcpt])
    outbox = tmp_path / "data" / "outbox"
    await wait_for(lambda: any(outbox.glob("*.eml")), what="an .eml file")
    [copy] = outbox.glob("*.eml")
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert stat.S_IMODE(outbox.stat().st_mode) == 0o700
