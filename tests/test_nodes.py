"""Relay nodes sharing one PostgreSQL store, as separate `serve` processes: an opt-out at
one is refused at the other's RCPT at once, both list every event and agree on the figures;
and a node rides out the server going away under load."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import (
    ROOT,
    CaptureServer,
    asubmit,
    body_of,
    cli,
    free_ports,
    newsletter,
    parse,
    wait_for,
    wait_until_listening,
)
from tests.postgres import PostgresServer

PUBLIC = "https://mail.shop.example"
SENDER = "news@shop.example"


class Node:
    def __init__(self, directory: Path, database: str, downstream: int) -> None:
        self.directory = directory
        self.smtp, self.http = free_ports(2)
        directory.mkdir()
        self.config = directory / "relay.toml"
        self.config.write_text(
            f'[storage]\ndir = "{directory / "data"}"\ndatabase = "{database}"\n'
            f'[smtp]\nlisten = "127.0.0.1:{self.smtp}"\n'
            f'[http]\nlisten = "127.0.0.1:{self.http}"\npublic_url = "{PUBLIC}"\n'
            f'[delivery]\ndownstream = "smtp://127.0.0.1:{downstream}"\n'
            "[rewrite]\npixel_min_html = 0\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.directory / "relay.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--config", str(self.config)],
                cwd=self.directory,
                stderr=log,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )

    def url(self, public_url: str) -> str:
        return public_url.replace(PUBLIC, f"http://127.0.0.1:{self.http}")

    def log(self) -> str:
        return (self.directory / "relay.log").read_text(errors="replace")


@pytest.fixture
async def nodes(
    tmp_path: Path, postgres_url: str, downstream: CaptureServer
) -> AsyncIterator[Callable[[int], list[Node]]]:
    started: list[Node] = []

    def start(count: int) -> list[Node]:
        made = [
            Node(tmp_path / f"node{n}", postgres_url, downstream.port)
            for n in range(len(started), len(started) + count)
        ]
        for node in made:  # together: the schema is made once, under its lock
            node.start()
        for node in made:
            assert node.process is not None
            wait_until_listening(node.http, node.process, within=60)
            wait_until_listening(node.smtp, node.process, within=60)
        started.extend(made)
        return made

    yield start
    for node in started:
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(signal.SIGTERM)
    for node in started:
        if node.process is not None:
            await asyncio.to_thread(node.process.wait, 60)


def links(content: bytes) -> tuple[str, str]:
    """A copy's one-click unsubscribe URL and pixel URL."""
    copy = parse(content)
    unsubscribe = re.fullmatch(r"<(https://[^>]+/u/[^>]+)>", copy["List-Unsubscribe"])
    pixel = re.search(r'<img src="(https://[^"]+/o/[^"]+\.gif)"', body_of(copy, "html"))
    assert unsubscribe and pixel
    return unsubscribe.group(1), pixel.group(1)


def events(node: Node) -> list[dict[str, Any]]:
    result = cli(node.config, "events", "--format", "jsonl")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


async def test_two_nodes_on_one_database_act_as_one(
    nodes: Callable[[int], list[Node]], downstream: CaptureServer
) -> None:
    a, b = nodes(2)
    handler = downstream.handler
    message = newsletter(
        ["alice@example.org", "bob@example.org"], headers={"X-Optout-Campaign": "spring"}
    )
    sent = await asubmit(a.smtp, message, SENDER, ["alice@example.org", "bob@example.org"])
    assert sent.refused == {}
    await wait_for(lambda: len(handler.messages) == 2, within=30, what="two copies from A")
    copies = {m.recipients[0]: m.content for m in handler.messages}
    alice_unsubscribe, _ = links(copies["alice@example.org"])
    _, bob_pixel = links(copies["bob@example.org"])

    async with aiohttp.ClientSession() as http:
        async with http.post(
            a.url(alice_unsubscribe), data={"List-Unsubscribe": "One-Click"}
        ) as response:
            assert response.status == 200
        # At once, at the other node's front door: no cache anywhere to be stale.
        again = await asubmit(
            b.smtp,
            newsletter(["alice@example.org", "bob@example.org"]),
            SENDER,
            ["alice@example.org", "bob@example.org"],
        )
        assert again.refused["alice@example.org"][0] == 550
        assert again.refused["alice@example.org"][1].startswith(b"5.7.1")
        assert "bob@example.org" not in again.refused
        async with http.get(b.url(bob_pixel)) as response:  # the open, at node B
            assert response.status == 200
            assert response.headers["Content-Type"] == "image/gif"
    await wait_for(lambda: len(handler.messages) == 3, within=30, what="bob's copy from B")

    def complete(listed: list[dict[str, Any]]) -> bool:
        kinds = [(e["type"], e["recipient"]) for e in listed]
        return (
            kinds.count(("delivered", "bob@example.org")) == 2
            and ("open", "bob@example.org") in kinds
            and ("unsubscribe", "alice@example.org") in kinds
            and ("refused", "alice@example.org") in kinds
        )

    await wait_for(lambda: complete(events(b)), within=30, what="both nodes' events")
    from_a, from_b = events(a), events(b)
    assert from_a == from_b
    queue_ids = {e["queue_id"] for e in from_a if e["type"] == "delivered"}
    assert len(queue_ids) == 2  # one message through each node
    stats_a = cli(a.config, "stats", "--format", "json")
    stats_b = cli(b.config, "stats", "--format", "json")
    assert stats_a.returncode == 0, stats_a.stderr
    assert json.loads(stats_a.stdout) == json.loads(stats_b.stdout)
    [spring] = [row for row in json.loads(stats_a.stdout) if row["campaign"] == "spring"]
    # The open came seconds after delivery: a machine's by the relay's verdict.
    opens = spring["opens_human"] + spring["opens_machine"]
    assert (spring["delivered"], spring["unsubscribes"], opens) == (2, 1, 1)


async def test_the_database_stopped_under_load_loses_nothing_acknowledged(
    nodes: Callable[[int], list[Node]],
    downstream: CaptureServer,
    postgres_server: PostgresServer,
) -> None:
    [node] = nodes(1)
    handler = downstream.handler
    # Copies whose pixels will be fetched while the database is away.
    first = [f"early{n}@example.org" for n in range(5)]
    for address in first:
        assert (await asubmit(node.smtp, newsletter([address]), SENDER, [address])).refused == {}
    await wait_for(lambda: len(handler.messages) == 5, within=30, what="the early copies")
    pixels = [links(m.content)[1] for m in handler.messages]

    accepted: list[str] = []
    deferred: list[str] = []
    down = asyncio.Event()
    stop_load = asyncio.Event()

    async def load() -> None:
        n = 0
        while not stop_load.is_set():
            address = f"load{n}@example.org"
            n += 1
            result = await asubmit(node.smtp, newsletter([address]), SENDER, [address])
            if result.refused:
                code, text = result.refused[address]
                assert (code, text[:5]) == (451, b"4.3.0"), result.refused
                deferred.append(address)
            else:
                assert result.reply == (250, b""), result.reply
                accepted.append(address)

    loader = asyncio.create_task(load())
    try:
        await wait_for(lambda: len(accepted) >= 5, within=30, what="mail accepted before")
        await asyncio.to_thread(postgres_server.stop)
        down.set()
        try:
            async with aiohttp.ClientSession() as http:
                for pixel in pixels:  # each copy's pixel once, while the store is away
                    async with http.get(node.url(pixel)) as response:
                        assert response.status == 200
                        assert response.headers["Content-Type"] == "image/gif"
                async with http.get(f"http://127.0.0.1:{node.http}/healthz") as response:
                    assert response.status == 503
            await wait_for(lambda: len(deferred) >= 3, within=30, what="451s while down")
        finally:
            await asyncio.to_thread(postgres_server.start)
        before = len(accepted)
        await wait_for(lambda: len(accepted) >= before + 5, within=30, what="mail after")
    finally:
        stop_load.set()
        await loader

    # Every 250 delivered, once; nothing refused at RCPT was accepted.
    def delivered() -> set[str]:
        return {r for m in handler.messages for r in m.recipients}

    try:
        await wait_for(lambda: set(accepted) <= delivered(), within=60)
    except AssertionError:
        missing = set(accepted) - delivered()
        lines = [
            line
            for line in node.log().splitlines()
            if "storage" in line or any(address in line for address in missing)
        ]
        captured = [(m.recipients, len(m.content)) for m in handler.messages[-8:]]
        raise AssertionError(
            f"never delivered: {missing}\nlast captured: {captured}\n" + "\n".join(lines)
        ) from None
    assert not set(deferred) & delivered()

    # No open lost: each pixel fetched while the store was away is an open event now.
    def opened() -> set[str]:
        return {e["recipient"] for e in events(node) if e["type"] == "open"}

    await wait_for(lambda: opened() == set(first), within=30, what="the opens written later")
    log = node.log()
    # Once per state change (away, back) and process, however many delivery processes
    # "auto" gives this machine.
    said = collections.Counter(
        match.group(1) for match in re.finditer(r"\[(\d+)\]: \w+: storage: PostgreSQL at", log)
    )
    assert said and max(said.values()) <= 2, log
    assert "Traceback" not in log, log
