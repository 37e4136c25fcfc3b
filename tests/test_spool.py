"""The spool's own guarantees: partitions never overlap, counts follow the rows."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from relay.app import Relay
from relay.spool import Partition, Spool
from tests.conftest import relay_settings
from tests.helpers import CaptureServer, asubmit, newsletter, wait_for


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
    tmp_path: Path, downstream: CaptureServer
) -> None:
    settings = relay_settings(tmp_path, downstream.port)
    settings = replace(settings, delivery=replace(settings.delivery, processes=2))
    relay = await Relay.start(settings)
    recipients = [f"user{i}@example.org" for i in range(24)]
    try:
        for recipient in recipients:
            await asubmit(
                relay.addresses.smtp[1], newsletter([recipient]), "news@shop.example", [recipient]
            )
        await wait_for(lambda: len(downstream.handler.messages) >= 24, what="24 copies")
        await wait_for(lambda: relay.spool.waiting == 0, what="an empty spool")
    finally:
        await relay.stop()
    assert sorted(m.recipients[0] for m in downstream.handler.messages) == sorted(recipients)
