"""`http.processes`: more than one process answers HTTP on the listen address, and they act as
one: every answered open is recorded, per-client caps and rate limits hold across them,
/metrics counts them all, and a worker that dies is replaced and forgotten."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import pytest

from relay.app import Relay
from relay.errors import ConfigError
from relay.settings import Listen, Settings
from relay.stores import STORE_FILE, tracking_urls
from tests.helpers import StartRelay, relay_settings, wait_for
from tracking import RecipientRef
from tracking.tokens import AggregateRef

HUMAN = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Thunderbird/128.0"


def two_processes(tmp_path: Path, **http: object) -> Settings:
    settings = relay_settings(tmp_path / "data", None)
    return replace(settings, http=replace(settings.http, processes=2, **http))


def counted_per_client(tmp_path: Path, per_client: int = 3) -> Settings:
    """Loopback is a client like any other here (not a trusted proxy)."""
    return two_processes(tmp_path, trusted_proxies=(), max_connections_per_client=per_client)


def pixel_path(relay: Relay, recipient: int) -> str:
    urls = tracking_urls(relay.settings, relay.stores.signer())
    address_hash = relay.stores.suppressions.hasher.hash(f"reader{recipient}@example.org")
    url = urls.pixel_url(RecipientRef(address_hash, "global", "spring", f"Q{recipient}"))
    return url.removeprefix("https://mail.shop.example")


class Connection:
    """One kept-alive HTTP/1.1 connection to the relay, and the process that holds its other
    end (read from /proc: which of the HTTP processes accepted it)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, relay: Relay, source: str = "127.0.0.1") -> Connection:
        host, port = relay.addresses.http
        return cls(*await asyncio.open_connection(host, port, local_addr=(source, 0)))

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """Status and body; status 0 if the connection was closed instead."""
        head = f"{method} {path} HTTP/1.1\r\nHost: mail.shop.example\r\n"
        if body:
            head += "Content-Type: application/x-www-form-urlencoded\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n"
        try:
            self.writer.write(head.encode() + body)
            status_line = await self.reader.readline()
            if not status_line:
                return 0, b""
            length = 0
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            return int(status_line.split()[1]), await self.reader.readexactly(length)
        except (ConnectionError, asyncio.IncompleteReadError):
            return 0, b""

    async def server_pid(self, pids: list[int]) -> int:
        local_port = self.writer.get_extra_info("sockname")[1]
        server_port = self.writer.get_extra_info("peername")[1]

        def holder() -> int | None:
            inode = _server_inode(server_port, local_port)
            if inode is None:
                return None
            for pid in pids:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    try:
                        if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                            return pid
                    except OSError:
                        continue  # closed meanwhile
            return None

        found: list[int] = []

        async def accepted() -> bool:
            pid = await asyncio.to_thread(holder)
            found.append(pid or 0)
            return pid is not None

        await wait_for(accepted, what="the connection to be accepted by an HTTP process")
        return found[-1]

    def close(self) -> None:
        self.writer.close()


def _server_inode(server_port: int, client_port: int) -> str | None:
    """The socket inode of the server's end of a loopback connection (/proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(local.split(":")[1], 16) == server_port and (
            int(remote.split(":")[1], 16) == client_port and inode != "0"
        ):
            return inode
    return None


def http_pids(relay: Relay) -> list[int]:
    assert relay.http_workers is not None
    return [os.getpid(), *relay.http_workers.pids]  # the test runs the main one


async def metric(relay: Relay, sample: str) -> float:
    connection = await Connection.open(relay, source="127.0.0.2")  # a client of its own
    try:
        status, body = await connection.request("GET", "/metrics")
    finally:
        connection.close()
    assert status == 200
    found = re.search(rf"^{re.escape(sample)} (\S+)$", body.decode(), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def open_rows(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / STORE_FILE) as db:
        return int(db.execute("SELECT COUNT(*) FROM events WHERE type = 'open'").fetchone()[0])


async def test_both_processes_answer_and_every_open_they_answered_is_recorded(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    relay = await start_relay(two_processes(tmp_path))
    pids = http_pids(relay)
    assert len(pids) == 2
    connections = [await Connection.open(relay) for _ in range(24)]
    answers = [await c.request("GET", pixel_path(relay, n)) for n, c in enumerate(connections)]
    assert {status for status, _ in answers} == {200}
    holders = {await c.server_pid(pids) for c in connections}
    assert holders == set(pids)  # the kernel spread them (all 24 on one: 1 in 8 million)
    for connection in connections:
        assert await connection.request("GET", "/healthz") == (200, b"ok\n")

    # /metrics, asked of any process, counts the requests of both (a worker reports each second).
    pixels = 'optout_http_requests_total{method="GET",route="pixel",status="200"}'

    async def all_counted() -> bool:
        return await metric(relay, pixels) == 24

    await wait_for(all_counted, what="/metrics to count both processes' pixels")
    for connection in connections:
        connection.close()
    # Answered, then stopped at once: the worker hands its opens over before the writer stops.
    await relay.stop()
    assert open_rows(tmp_path / "data") == 24


async def test_the_per_client_connection_cap_holds_across_the_processes(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    relay = await start_relay(counted_per_client(tmp_path, per_client=3))
    connections = [await Connection.open(relay) for _ in range(10)]
    statuses = [(await c.request("GET", "/healthz"))[0] for c in connections]
    # Three kept open, wherever they were accepted; the rest refused at once.
    assert sorted(statuses) == [200] * 3 + [503] * 7
    for connection in connections:
        connection.close()


async def test_a_worker_that_dies_is_restarted_and_its_connections_forgotten(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    relay = await start_relay(counted_per_client(tmp_path, per_client=3))
    main, worker = http_pids(relay)
    held: list[Connection] = []
    on_worker: list[Connection] = []

    async def three_open_one_on_the_worker() -> bool:
        """One try: three connections open (the last try's released by now), at least one
        of them held by the worker."""
        for connection in held:
            connection.close()
        held[:] = [await Connection.open(relay) for _ in range(3)]
        if [(await c.request("GET", "/healthz"))[0] for c in held] != [200] * 3:
            return False
        on_worker[:] = [c for c in held if await c.server_pid([main, worker]) == worker]
        return bool(on_worker)

    await wait_for(three_open_one_on_the_worker, what="a connection held by the worker")
    healthz = 'optout_http_requests_total{method="GET",route="healthz",status="200"}'

    async def worker_reported() -> bool:  # every /healthz so far answered 200, and counted
        return await metric(relay, healthz) >= 3 and len(on_worker) > 0

    await wait_for(worker_reported, what="the worker's counts at the hub")
    counted = await metric(relay, healthz)

    os.kill(worker, signal.SIGKILL)
    assert relay.http_workers is not None
    workers = relay.http_workers

    def replaced() -> bool:
        return bool(workers.pids) and workers.pids != [worker]

    await wait_for(replaced, what="a new worker, listening")
    assert await metric(relay, healthz) >= counted  # a dead worker's counters stay counted
    survivors = [c for c in held if c not in on_worker]
    for connection in on_worker:
        assert (await connection.request("GET", "/healthz"))[0] == 0  # gone with its process
    for connection in survivors:
        assert (await connection.request("GET", "/healthz"))[0] == 200

    # What the dead worker held is free again, and the cap still holds.
    more = [await Connection.open(relay) for _ in range(8)]
    statuses = [(await c.request("GET", "/healthz"))[0] for c in more]
    assert sorted(statuses) == [200] * len(on_worker) + [503] * (8 - len(on_worker))
    for connection in held + more:
        connection.close()


async def test_the_post_rate_limit_holds_across_the_processes(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    settings = counted_per_client(tmp_path, per_client=64)
    settings = replace(
        settings, tracking=replace(settings.tracking, rate_burst=4, rate_per_minute=1.0)
    )
    relay = await start_relay(settings)
    statuses, pids = [], set()
    for _ in range(12):  # each on a new connection: the kernel spreads them
        connection = await Connection.open(relay)
        statuses.append((await connection.request("POST", "/u/forged", b"x=1"))[0])
        pids.add(await connection.server_pid(http_pids(relay)))
        connection.close()
    assert statuses == [404] * 4 + [429] * 8  # four tries of a forged link, then no more
    assert len(pids) == 2


async def test_a_second_relay_on_the_same_http_port_is_refused(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    """SO_REUSEPORT lets the relay's own processes share the port, never another relay."""
    first = await start_relay(two_processes(tmp_path / "first"))
    taken = Listen(*first.addresses.http)
    second = two_processes(tmp_path / "second")
    second = replace(second, http=replace(second.http, listen=taken))
    with pytest.raises(ConfigError) as refused:
        await start_relay(second)
    assert refused.value.key == "http.listen"
    assert f"cannot listen on {taken}" in str(refused.value)


async def test_an_aggregate_click_reader_counts_once_whichever_process_answers(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    settings = two_processes(tmp_path)
    settings = replace(settings, tracking=replace(settings.tracking, clicks="aggregate"))
    relay = await start_relay(settings)
    urls = tracking_urls(relay.settings, relay.stores.signer())
    link = urls.aggregate_click_url(
        AggregateRef("spring", "shop.example"), "https://shop.example/sale", int(time.time())
    )
    path = link.removeprefix("https://mail.shop.example")
    pids = set()
    for _ in range(16):  # each on a new connection: the kernel spreads them
        connection = await Connection.open(relay)
        connection.writer.write(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: {HUMAN}\r\n"
            "X-Forwarded-For: 192.0.2.7\r\n\r\n".encode()
        )
        assert (await connection.reader.readline()).split()[1] == b"302"
        pids.add(await connection.server_pid(http_pids(relay)))
        connection.close()
    assert len(pids) == 2
    await relay.stop()
    with sqlite3.connect(tmp_path / "data" / STORE_FILE) as db:
        counts = db.execute("SELECT metric, n FROM aggregate_counts").fetchall()
    assert counts == [("click_machine", 1)]  # clicked at once: a machine's, by the verdict


async def test_a_worker_that_will_not_stop_is_killed_and_the_stop_goes_on(
    tmp_path: Path, start_relay: StartRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    import relay.http_workers

    monkeypatch.setattr(relay.http_workers, "STOP_TIMEOUT", 2.0)
    running = await start_relay(two_processes(tmp_path))
    [worker] = http_pids(running)[1:]
    os.kill(worker, signal.SIGSTOP)  # its loop never runs again: it cannot leave by itself
    try:
        await asyncio.wait_for(running.stop(), 30)  # before: held for ever
        assert _reaped(worker)  # killed, and its exit collected, by the relay
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)


def _reaped(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()
