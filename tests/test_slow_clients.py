"""Slow and greedy HTTP clients against a real relay: real sockets, a relay process under a low
open-files limit, and the SMTP greeting and /healthz asserted while they are at it.

Loopback is all of 127.0.0.0/8, so a client can come from 127.0.0.x: one address stands for
a single attacker, several for many; the relays here trust no proxy on loopback, so each of
those is a client of its own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from relay.settings import Settings, SigningSettings, StorageSettings
from relay.stores import Stores
from tests.helpers import (
    ROOT,
    StartRelay,
    free_ports,
    poll_until,
    relay_settings,
    wait_until_listening,
)
from tracking import RecipientRef, Signer, TrackingUrls, create_app

HEADERS = b"GET /healthz HTTP/1.1\r\nHost: relay.test\r\nUser-Agent: slow\r\nX-Pad: "


def connect(port: int, source: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def greeting(port: int, source: str = "127.0.0.1") -> bytes:
    with connect(port, source) as sock:
        return sock.recv(100)


def healthz(port: int, source: str = "127.0.0.1", timeout: float = 5.0) -> bytes:
    with connect(port, source, timeout) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\r\n")
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    with contextlib.suppress(OSError):
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def relay_process(
    tmp_path: Path, http: str, *, smtp: str = "", open_files: int = 256
) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """`optout-relay serve` with RLIMIT_NOFILE at `open_files` (soft and hard: it cannot
    raise it), trusting no proxy on loopback. Yields (process, smtp port, http port); the
    log is tmp_path/serve.log once it stopped."""
    smtp_port, http_port = free_ports(2)
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[storage]\ndir = "{tmp_path / "data"}"\n'
        f'[smtp]\nlisten = "127.0.0.1:{smtp_port}"\nhostname = "relay.test"\n{smtp}\n'
        f'[http]\nlisten = "127.0.0.1:{http_port}"\ntrusted_proxies = ["192.0.2.0/24"]\n'
        f"{http}\n"
    )

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    with open(tmp_path / "serve.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(config)],
            stderr=log,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            preexec_fn=limited,  # sets a limit, nothing else, before exec
        )
    try:
        wait_until_listening(http_port, process)
        # Every listener and process up (the HTTP port answers first): its rest state.
        poll_until(lambda: "listening: smtp=" in serve_log(tmp_path), "serve to be up")
        yield process, smtp_port, http_port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def trickle(sockets: list[socket.socket], sent: int, rounds: int, pause: float) -> int:
    """A byte more of a request's headers on each socket (`sent` of them sent already), every
    `pause` seconds; how many are sent then."""
    for index in range(sent, sent + rounds):
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.send(HEADERS[index : index + 1])
        time.sleep(pause)
    return sent + rounds


def serve_log(tmp_path: Path) -> str:
    return (tmp_path / "serve.log").read_text()


def test_300_slow_clients_on_one_address_leave_smtp_and_healthz_answering(
    tmp_path: Path,
) -> None:
    http = "max_connections_per_client = 10\nheader_timeout = 2.0\n"
    with relay_process(tmp_path, http, smtp="max_connections = 20") as (process, smtp, port):
        at_rest = descriptors(process.pid)
        slow = []
        for _ in range(300):
            sock = connect(port)
            with contextlib.suppress(OSError):
                sock.send(HEADERS[:1])
            slow.append(sock)
        sent = trickle(slow, 1, 2, 0.2)
        # The relay holds 10 of them: its descriptors stay far from its limit.
        assert descriptors(process.pid) <= at_rest + 10 + 5
        assert greeting(smtp).startswith(b"220 ")
        assert healthz(port, "127.0.0.2").startswith(b"HTTP/1.1 200 ")
        # Their own address is at its share: answered at once, not left hanging.
        assert healthz(port).startswith(b"HTTP/1.1 503 ")
        trickle(slow, sent, 8, 0.3)  # past the 2 s header timeout
        answers = [read_all(sock) for sock in slow]
        assert sum(a.startswith(b"HTTP/1.1 408 ") for a in answers) == 10
        assert sum(a.startswith(b"HTTP/1.1 503 ") for a in answers) >= 250  # the rest: RST
        for sock in slow:
            sock.close()
        assert healthz(port).startswith(b"HTTP/1.1 200 ")
        assert greeting(smtp).startswith(b"220 ")
    log = serve_log(tmp_path)
    assert "Traceback" not in log
    assert len(log.splitlines()) < 20, log
    assert "file descriptors: limit 256;" in log


def test_slow_clients_from_many_addresses_fill_only_the_http_share(tmp_path: Path) -> None:
    http = "max_connections = 30\nmax_connections_per_client = 10\nheader_timeout = 1.0\n"
    with relay_process(tmp_path, http, smtp="max_connections = 20") as (_, smtp, port):
        slow = []
        for client in range(6):  # 60 clients, 10 from each of 6 addresses
            for _ in range(10):
                sock = connect(port, f"127.0.0.{10 + client}")
                sock.send(HEADERS[:1])
                slow.append(sock)
        # HTTP is full (the other 30 wait in the kernel's queue); SMTP has its own share.
        assert greeting(smtp).startswith(b"220 ")
        # Queued behind them, /healthz is answered once the slow ones are cut (1 s each).
        assert healthz(port, "127.0.0.2", timeout=15).startswith(b"HTTP/1.1 200 ")

        def header_timeouts() -> float:
            """As /metrics counts them, over every HTTP process (a worker's count reaches
            the main process within a second)."""
            with connect(port, "127.0.0.2") as sock:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                metrics = read_all(sock).decode()
            line = next(
                line
                for line in metrics.splitlines()
                if line.startswith("optout_http_header_timeouts")
            )
            return float(line.split()[-1])

        poll_until(lambda: header_timeouts() >= 30, "30 header timeouts counted")
        for sock in slow:
            sock.close()
    log = serve_log(tmp_path)
    assert "Traceback" not in log
    assert log.count("30 connections open, the most allowed") >= 1
    assert log.count("accepting connections again") >= 1
    assert len(log.splitlines()) < 30, log


@pytest.mark.parametrize(
    ("smtp", "http", "key"),
    [
        (20, "max_connections = 1000", "http.max_connections"),
        (200, "", "smtp.max_connections"),  # the default: 2 x 200 + 100 of the 256
    ],
)
def test_caps_that_do_not_fit_the_open_files_limit_stop_serve(
    tmp_path: Path, smtp: int, http: str, key: str
) -> None:
    smtp_port, http_port = free_ports(2)
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[storage]\ndir = "{tmp_path / "data"}"\n'
        f'[smtp]\nlisten = "127.0.0.1:{smtp_port}"\nmax_connections = {smtp}\n'
        f'[http]\nlisten = "127.0.0.1:{http_port}"\n{http}\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)),
        check=False,
    )
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"optout-relay: error: config: {key}: ")
    assert "open-files limit" in line and "256" in line


async def test_a_connection_slow_with_its_headers_is_closed_keep_alive_or_not(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    settings = relay_settings(tmp_path / "data", None)
    settings = replace(settings, http=replace(settings.http, header_timeout=1.0))
    relay = await start_relay(settings)
    port = relay.addresses.http[1]

    def slow_first_request() -> bytes:
        with connect(port) as sock:
            sock.send(b"GET /hea")
            return read_all(sock)

    def slow_second_request() -> tuple[bytes, bytes]:
        with connect(port) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: relay.test\r\n\r\n")
            first = sock.recv(4096)
            sock.send(b"GET /hea")  # the next request on the kept-alive connection stalls
            return first, read_all(sock)

    started = time.monotonic()
    answer = await asyncio.to_thread(slow_first_request)
    assert answer.startswith(b"HTTP/1.1 408 ")
    first, rest = await asyncio.to_thread(slow_second_request)
    assert first.startswith(b"HTTP/1.1 200 ")
    assert rest == b""  # closed by the keep-alive timeout, which is the header timeout
    assert time.monotonic() - started < 5 * settings.http.header_timeout


async def test_a_slow_request_body_gets_408_and_changes_nothing(
    aiohttp_server: object, tmp_path: Path
) -> None:
    keys = ("slow-body-key-0123456789abcdef",)
    settings = Settings(storage=StorageSettings(tmp_path), signing=SigningSettings(keys))
    async with Stores(settings) as stores:
        urls = TrackingUrls("https://mail.shop.example", Signer(keys))
        app = create_app(stores.suppressions, stores.events, urls, body_timeout=0.5)
        server = await aiohttp_server(app)  # type: ignore[operator]
        token = urls.unsubscribe_url(RecipientRef("h" * 20)).rpartition("/")[2]

        def post_slowly() -> bytes:
            with connect(server.port) as sock:
                sock.sendall(
                    f"POST /u/{token} HTTP/1.1\r\nHost: x\r\nContent-Length: 26\r\n"
                    "Content-Type: application/x-www-form-urlencoded\r\n\r\nList".encode()
                )
                return read_all(sock)  # and nothing more is sent

        answer = await asyncio.to_thread(post_slowly)
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert await stores.suppressions.count() == 0


def test_failed_accepts_are_logged_when_they_start_and_stop(tmp_path: Path) -> None:
    """Out of descriptors, the HTTP listener and asyncio's own servers (the SMTP side) each
    log one line when accepting starts failing and one when it works again, however many
    attempts fail in between."""
    script = textwrap.dedent(
        """
        import asyncio, logging, os, resource, sys
        from relay.descriptors import QuietAcceptErrors
        from tracking.listener import ConnectionCaps, HttpListener

        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")

        class Hold(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport
            def eof_received(self):
                return False  # closes

        async def main():
            loop = asyncio.get_running_loop()
            QuietAcceptErrors(loop).install()
            smtp = await loop.create_server(Hold, "127.0.0.1", 0)
            http = HttpListener(Hold, ConnectionCaps(1000, 1000))
            await http.start("127.0.0.1", 0)
            print(smtp.sockets[0].getsockname()[1], http.addresses[0][1], flush=True)
            in_use = len(os.listdir("/proc/self/fd"))
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 10, hard))
            await loop.run_in_executor(None, sys.stdin.readline)  # until the test is done
            http.close()
            smtp.close()

        asyncio.run(main())
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stdin is not None and process.stdout is not None
    assert process.stderr is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    listeners = ("http: ", "smtp listener 127.0.0.1:")

    def failing_now() -> list[bool]:
        """Per listener, whether its last line says accepting fails (no line yet: False)."""
        last = {listener: False for listener in listeners}
        for line in list(lines):
            for listener in listeners:
                if line.startswith(listener):
                    last[listener] = "cannot accept connections" in line
        return list(last.values())

    def settled() -> bool:
        """Both listeners accepting again, and quiet for a second and a half: the
        connections queued meanwhile are taken one by one and may run out of descriptors
        once more before the last is taken."""
        if any(failing_now()):
            return False
        seen = len(lines)
        time.sleep(1.5)
        return len(lines) == seen and not any(failing_now())

    smtp_port, http_port = map(int, process.stdout.readline().split())
    clients = []
    with contextlib.suppress(OSError):
        for _ in range(15):  # each listener: more than the 10 descriptors left
            for port in (smtp_port, http_port):
                sock = socket.socket()
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    sock.connect(("127.0.0.1", port))
                clients.append(sock)
    poll_until(lambda: all(failing_now()), "both listeners saying accepting fails")
    time.sleep(1.5)  # failing a while, retried all along: still one line each
    for sock in clients:
        sock.close()  # the held connections end: accepting works again
    poll_until(settled, "both listeners accepting again for good")
    process.stdin.close()
    process.wait(timeout=30)
    reader.join(timeout=30)
    process.stdout.close()
    process.stderr.close()
    lines = [line.rstrip("\n") for line in lines]
    stderr = "\n".join(lines)
    assert "Traceback" not in stderr, stderr
    for listener in listeners:
        # Each change of state once: failing, accepting again (and maybe again, as the
        # queued connections are taken), never a line per attempt.
        states = [
            "failing" if "cannot accept connections" in line else "accepting"
            for line in lines
            if line.startswith(listener)
        ]
        assert states[::2] == ["failing"] * len(states[::2]), stderr
        assert states[1::2] == ["accepting"] * len(states[1::2]), stderr
        assert states and states[-1] == "accepting" and len(states) <= 6, stderr
    started = [line for line in lines if "cannot accept connections" in line]
    assert all("Too many open files" in line and "limit" in line for line in started)
    # asyncio's server retries at once, many times a second: all of it in one line.
    attempts = [int(line.split(" after ")[1].split()[0]) for line in lines if " after " in line]
    assert sum(attempts) > len(lines), stderr
