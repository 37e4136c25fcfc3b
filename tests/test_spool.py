"""The spool's own guarantees: partitions never overlap, counts follow the rows."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from relay.spool import COPY_CHUNK, Partition, Spilled, SpillFile, Spool
from tests.helpers import (
    CaptureServer,
    StartRelay,
    asubmit,
    newsletter,
    relay_settings,
    wait_for,
    with_delivery,
)


async def test_partitions_split_the_spool_without_overlap(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool.db")
    try:
        ids = {
            await spool.accept(
                "news@shop.example", [f"r{i}@example.org"], b"Subject: x\r\n\r\n", "t"
            )
            for i in range(64)
        }
        later = time.time() + 1
        for count in (1, 2, 3, 16):
            shares = [
                {q for q, _ in await spool.due(later, limit=1000, partition=Partition(i, count))}
                for i in range(count)
            ]
            assert set().union(*shares) == ids
            assert sum(len(share) for share in shares) == len(ids)  # disjoint
        assert spool.waiting == 64
    finally:
        await spool.close()


async def test_two_delivery_processes_send_each_message_once(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    relay = await start_relay(with_delivery(relay_settings(tmp_path, downstream.port), processes=2))
    recipients = [f"user{i}@example.org" for i in range(24)]
    for recipient in recipients:
        await asubmit(
            relay.addresses.smtp[1], newsletter([recipient]), "news@shop.example", [recipient]
        )
    await wait_for(lambda: len(downstream.handler.messages) >= 24, what="24 copies")
    await wait_for(lambda: relay.spool.waiting == 0, what="an empty spool")
    await relay.stop()
    assert sorted(m.recipients[0] for m in downstream.handler.messages) == sorted(recipients)


def spill(directory: Path, content: bytes, piece: int = 100_000) -> Spilled:
    file = SpillFile(directory)
    for start in range(0, len(content), piece):
        file.write([content[start : start + piece]])
    return Spilled(content[:1000], file, file.size)


async def test_a_spilled_message_is_copied_whole_into_the_spool(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool.db")
    try:
        # Not a whole number of copy pieces, so the last piece is a short one.
        content = b"Subject: big\r\n\r\n" + os.urandom(3 * COPY_CHUNK + 12345)
        spilled = await asyncio.to_thread(spill, spool.incoming, content)
        queue_id = await spool.accept("news@shop.example", ["a@example.org"], spilled, "t")
        assert await spool.content(queue_id) == content
        [entry] = await spool.entries(queue_id)
        assert entry.size == len(content)
        # The file is the caller's to discard once the message is in.
        assert os.listdir(spool.incoming) == [spilled.file.path.name]
        await asyncio.to_thread(spilled.file.discard)
        assert os.listdir(spool.incoming) == []
    finally:
        await spool.close()


async def test_a_spilled_message_that_cannot_be_read_is_not_spooled(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool.db")
    try:
        spilled = await asyncio.to_thread(spill, spool.incoming, b"x" * 1000)
        await asyncio.to_thread(spilled.file.discard)
        with pytest.raises(OSError):
            await spool.accept("news@shop.example", ["a@example.org"], spilled, "t")
        assert spool.waiting == 0
        assert await spool.depth() == (0, 0)
    finally:
        await spool.close()


async def test_files_left_in_incoming_are_removed_when_the_receiving_spool_opens(
    tmp_path: Path,
) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for name in ("1A2B.msg", "3C4D.msg"):
        (incoming / name).write_bytes(b"half a message")
    # A delivery process or a CLI command opening the spool leaves them to the front door.
    spool = await Spool.open(tmp_path / "spool.db")
    await spool.close()
    assert sorted(os.listdir(incoming)) == ["1A2B.msg", "3C4D.msg"]
    spool = await Spool.open(tmp_path / "spool.db", receiving=True)
    try:
        assert spool.incoming == incoming
        assert os.listdir(incoming) == []
    finally:
        await spool.close()
