"""Corruption is never silent (issue 13, item 5): real bytes flipped in real files.

A damaged message is held, not sent altered; frames lost from the WAL after a crash are
counted and reported; a damaged page makes /healthz say 503 with a clear reason.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
from email.message import EmailMessage
from pathlib import Path

import aiohttp
import pytest

from relay.app import Relay
from relay.spool import Spool
from relay.stores import SPOOL_FILE
from tests.helpers import (
    CaptureServer,
    StartRelay,
    cli,
    newsletter,
    relay_settings,
    spool_depth,
    wait_for,
)

SENDER = "news@shop.example"


async def health(relay: Relay) -> tuple[int, str]:
    host, port = relay.addresses.http
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{host}:{port}/healthz") as response,
    ):
        return response.status, await response.text()


def checkpointed(path: Path) -> bytes:
    """The database file once everything in its WAL is in it."""
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path.read_bytes()


def scramble_table(path: Path, table: str) -> None:
    """Overwrite the start of `table`'s root page with bytes no B-tree page holds."""
    with sqlite3.connect(path) as conn:
        [root] = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", [table])
        [page_size] = conn.execute("PRAGMA page_size")
    conn.close()
    with open(path, "r+b") as file:
        file.seek((root[0] - 1) * page_size[0])
        file.write(b"\x0d\xff\xff\xff" * 64)


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x20]))


async def test_a_message_damaged_on_disk_is_held_not_sent(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    data = tmp_path / "data"
    spool = await Spool.open(data / SPOOL_FILE)
    damaged = EmailMessage()
    damaged["From"] = SENDER
    damaged["To"] = "ann@example.org"
    damaged["Subject"] = "Price list"
    damaged.set_content("Everything is 20 EUR today-and-only-today.\n")
    damaged_id = await spool.accept(SENDER, ["ann@example.org"], damaged.as_bytes(), "t")
    await spool.accept(SENDER, ["bob@example.org"], newsletter(["bob@example.org"]).as_bytes(), "t")
    await spool.close()
    content = checkpointed(data / SPOOL_FILE)
    flip(data / SPOOL_FILE, content.index(b"20 EUR today"))  # "20 EUR" becomes "\x120 EUR"

    relay = await start_relay(relay_settings(data, downstream.port))

    async def held() -> bool:
        entries = await relay.spool.entries(damaged_id)
        return bool(entries) and entries[0].held

    await wait_for(held, within=20, what="the damaged message held")
    await wait_for(lambda: len(downstream.handler.messages) == 1, what="the intact message")
    assert downstream.handler.messages[0].recipients == ["bob@example.org"]
    [entry] = await relay.spool.entries(damaged_id)
    assert entry.held_reason == (
        "its stored copy is damaged (its SHA-256 digest differs from the one taken when it"
        " was accepted); nothing was sent"
    )

    async def held_event() -> bool:
        return "held" in [e["type"] async for e in relay.stores.events.export()]

    await wait_for(held_event, what="the held event")
    config = tmp_path / "relay.toml"
    config.write_text(f'[storage]\ndir = "{data}"\n')
    assert "(held: its stored copy is damaged" in cli(config, "queue", "list").stdout


async def test_frames_lost_from_the_wal_are_counted_and_reported(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    live = tmp_path / "live"
    spool = await Spool.open(live / SPOOL_FILE, receiving=True)
    for number in range(20):
        rcpt = f"user{number}@example.org"
        await spool.accept(SENDER, [rcpt], newsletter([rcpt]).as_bytes(), "t")
    # What a crash leaves: the WAL not yet checkpointed, and the count outside it.
    data = tmp_path / "data"
    data.mkdir()
    for name in (SPOOL_FILE, f"{SPOOL_FILE}-wal", "spool.accepted"):
        shutil.copy(live / name, data / name)
    await spool.close()
    wal = data / f"{SPOOL_FILE}-wal"
    frames = (wal.stat().st_size - 32) // (24 + 4096)
    assert frames > 20
    flip(wal, 32 + (frames // 2) * (24 + 4096) + 24 + 2048)  # inside a middle frame's page
    # What SQLite keeps of the image, counted on a copy before the relay starts delivering it.
    probe = tmp_path / "probe"
    probe.mkdir()
    for name in (SPOOL_FILE, f"{SPOOL_FILE}-wal"):
        shutil.copy(data / name, probe / name)
    messages, _ = await spool_depth(probe)

    relay = await start_relay(relay_settings(data, downstream.port))
    lost = 20 - messages
    assert 0 < lost < 20  # SQLite kept the frames before the damaged one, silently
    assert relay.spool.problems == [
        f"{lost} acknowledged message{'s' if lost > 1 else ''} missing from the spool:"
        f" spool.accepted counts 20 accepted, spool.db only {messages} (committed"
        " transactions were lost from its WAL; mail accepted since then is gone, unless it"
        " had already been delivered)"
    ]
    status, text = await health(relay)
    assert status == 503
    assert f"{lost} acknowledged message" in text
    await wait_for(lambda: len(downstream.handler.messages) == messages, what="what is left")

    # Said once: the next start counts on from what was acknowledged.
    await relay.stop()
    again = await start_relay(relay_settings(data, downstream.port))
    assert again.spool.problems == []
    assert await health(again) == (200, "ok\n")


async def test_a_damaged_spool_page_makes_healthz_503_with_a_clear_reason(
    tmp_path: Path,
    downstream: CaptureServer,
    start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = tmp_path / "data"
    spool = await Spool.open(data / SPOOL_FILE)
    for number in range(5):
        rcpt = f"user{number}@example.org"
        await spool.accept(SENDER, [rcpt], newsletter([rcpt]).as_bytes(), "t")
    await spool.close()
    checkpointed(data / SPOOL_FILE)
    scramble_table(data / SPOOL_FILE, "deliveries")

    caplog.set_level(logging.INFO, logger="optout")
    relay = await start_relay(relay_settings(data, downstream.port))
    [line] = [r.getMessage() for r in caplog.records if "integrity check found" in r.getMessage()]
    assert line.startswith("spool.db: integrity check found ")
    assert "repair it (sqlite3 spool.db '.recover') while the relay is stopped" in line
    status, text = await health(relay)
    assert status == 503
    assert text.startswith("spool.db is damaged: ")
    # The delivery process says so once in spool.damaged (not a traceback every 5 s).
    damaged = data / "spool.damaged"
    await wait_for(damaged.exists, within=20, what="the delivery process's report")
    assert "spool.db is damaged (database disk image is malformed)" in damaged.read_text()
