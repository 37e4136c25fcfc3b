"""Kill -9 the relay while it takes and delivers mail: nothing that got 250 is ever lost."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from email.message import EmailMessage
from pathlib import Path

from tests.helpers import ROOT, CaptureServer, free_ports, wait_for, wait_until_listening

MESSAGES = 1500
CLIENTS = 4
KILLS = 4
WORKERS = 4
TEST_ID = re.compile(rb"^X-Test-Id: (\d+)\r?$", re.MULTILINE)


class LoadGenerator:
    """Clients submitting numbered messages; remembers which ones got 250."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.accepted: set[int] = set()
        self._next = 0
        self._lock = threading.Lock()

    def _take(self) -> int | None:
        with self._lock:
            if self._next >= MESSAGES:
                return None
            self._next += 1
            return self._next

    def run(self) -> None:
        while (number := self._take()) is not None:
            message = EmailMessage()
            message["From"] = "news@shop.example"
            message["To"] = f"user{number}@example.org"
            message["Subject"] = f"Message {number}"
            message["X-Test-Id"] = str(number)
            message.set_content(f"Body of message {number}\n" * 20)
            while True:
                try:
                    with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
                        client.send_message(message)
                except (OSError, smtplib.SMTPException):
                    # Killed mid-session: not accepted, so send it again once it is back.
                    self._poll_until_listening()
                    continue
                with self._lock:
                    self.accepted.add(number)
                break

    def _poll_until_listening(self, within: float = 30.0) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.02)


def start_relay(config: Path, cwd: Path, smtp_port: int) -> subprocess.Popen[bytes]:
    log = cwd / "relay.log"
    with open(log, "ab") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(config)],
            cwd=cwd,
            stderr=stderr,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    try:
        wait_until_listening(smtp_port, process)
    except AssertionError as exc:
        lines = log.read_text(errors="replace").splitlines()[-5:]
        raise AssertionError(f"{exc}; the relay said: {' | '.join(lines)}") from None
    return process


async def test_sigkill_at_random_moments_loses_nothing_accepted(
    tmp_path: Path, downstream: CaptureServer
) -> None:
    smtp_port, http_port = free_ports(2)
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[storage]\ndir = "{tmp_path / "data"}"\n'
        f'[smtp]\nlisten = "127.0.0.1:{smtp_port}"\n'
        f'[http]\nlisten = "127.0.0.1:{http_port}"\n'
        f'[delivery]\ndownstream = "smtp://127.0.0.1:{downstream.port}"\n'
        f"workers = {WORKERS}\nretry_initial_delay = 0.2\nretry_max_delay = 1.0\n"
    )
    load = LoadGenerator(smtp_port)
    relay = await asyncio.to_thread(start_relay, config, tmp_path, smtp_port)
    clients = [asyncio.create_task(asyncio.to_thread(load.run)) for _ in range(CLIENTS)]
    rng = random.Random(20261129)
    try:
        for _ in range(KILLS):
            accepted_before = len(load.accepted)
            # Let some mail flow in and out, then kill at an unannounced moment.
            await wait_for(lambda b=accepted_before: len(load.accepted) >= b + 50, within=60)
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            relay.send_signal(signal.SIGKILL)
            await asyncio.to_thread(relay.wait)
            relay = await asyncio.to_thread(start_relay, config, tmp_path, smtp_port)
        await asyncio.gather(*clients)

        def delivered() -> Counter[int]:
            return Counter(
                int(match.group(1))
                for captured in downstream.handler.messages
                if (match := TEST_ID.search(captured.content))
            )

        await wait_for(lambda: load.accepted <= set(delivered()), within=120, what="all accepted")
        copies = delivered()
        assert len(load.accepted) == MESSAGES
        assert load.accepted <= set(copies)  # at least once: nothing lost
        duplicates = sum(n - 1 for n in copies.values())
        print(f"{MESSAGES} accepted, {KILLS} kills, {duplicates} duplicate copies")
        # At most the copies between "sent" and "recorded" at each kill: WORKERS per kill.
        assert duplicates <= KILLS * WORKERS, duplicates
    finally:
        relay.send_signal(signal.SIGTERM)
        await asyncio.to_thread(relay.wait)
        for task in clients:
            task.cancel()
