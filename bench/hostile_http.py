"""The HTTP side of bench/soak.py (issue 13 items 2 and 3): slow clients holding connections
open, one genuine pixel URL fetched over and over, and, meanwhile, /healthz and the SMTP
greeting asked every second."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

PIXEL = re.compile(r'src="(http://[^"]+/o/[^"]+)"')
SLOW_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: soak\r\nX-Slow: " + b"a" * 10_000


@dataclass
class HttpFigures:
    slow_opened: int = 0
    slow_closed_after: list[float] = field(default_factory=list)  # by the server
    replay_answers: dict[int, int] = field(default_factory=dict)  # status -> count; 0: error
    health: list[tuple[float, int]] = field(default_factory=list)  # seconds, status
    greeting: list[float] = field(default_factory=list)  # seconds; inf: none came
    open_rows: int = 0
    open_fetches: int = 0


def pixel_url(copy: bytes) -> str | None:
    """The open pixel's URL in a delivered copy's quoted-printable HTML."""
    text = copy.decode("ascii", "replace").replace("=\r\n", "").replace("=3D", "=")
    found = PIXEL.search(text)
    return found.group(1) if found else None


async def slow_client(port: int, until: float, figures: HttpFigures) -> None:
    """One header byte every 5 s until the server closes the connection (or `until`)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    figures.slow_opened += 1
    started = time.monotonic()
    try:
        for byte in SLOW_REQUEST:
            if time.monotonic() > until:
                return
            writer.write(bytes([byte]))
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(4096), 5.0) == b"":
                    figures.slow_closed_after.append(time.monotonic() - started)
                    return
    except OSError:
        figures.slow_closed_after.append(time.monotonic() - started)
    finally:
        writer.close()


async def replay_flood(url: str, fetches: int, figures: HttpFigures) -> None:
    """`fetches` GETs of one pixel URL over 16 connections."""
    remaining = iter(range(fetches))
    answers = figures.replay_answers
    async with aiohttp.ClientSession() as http:

        async def fetcher() -> None:
            for _ in remaining:
                try:
                    async with http.get(url) as response:
                        await response.read()
                        answers[response.status] = answers.get(response.status, 0) + 1
                except aiohttp.ClientError:
                    answers[0] = answers.get(0, 0) + 1

        await asyncio.gather(*(fetcher() for _ in range(16)))


async def probe(http_port: int, smtp_port: int, stop: asyncio.Event, figures: HttpFigures) -> None:
    """/healthz and an SMTP greeting, once a second: how long each took."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        while not stop.is_set():
            started = time.monotonic()
            try:
                async with http.get(f"http://127.0.0.1:{http_port}/healthz") as response:
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0
            figures.health.append((time.monotonic() - started, status))
            figures.greeting.append(await greeting_time(smtp_port))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


async def greeting_time(port: int) -> float:
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
    except (OSError, TimeoutError):
        return float("inf")
    try:
        line = await asyncio.wait_for(reader.readline(), 30)
    except (OSError, TimeoutError):
        line = b""
    finally:
        writer.close()
    return time.monotonic() - started if line.startswith(b"220") else float("inf")


async def hostile_http(
    http_port: int, smtp_port: int, url: str | None, slow: int, replays: int, seconds: float
) -> HttpFigures:
    """`slow` slow clients for `seconds`, and `replays` fetches of `url`, probed meanwhile."""
    figures = HttpFigures()
    stop = asyncio.Event()
    probing = asyncio.create_task(probe(http_port, smtp_port, stop, figures))
    until = time.monotonic() + seconds
    work = [slow_client(http_port, until, figures) for _ in range(slow)]
    if url is not None:
        work.append(replay_flood(url, replays, figures))
    await asyncio.gather(*work)
    stop.set()
    await probing
    return figures


def count_opens(data: Path, figures: HttpFigures) -> None:
    """What the replay flood left in the event log: rows and the fetches they count."""
    uri = f"file:{data / 'optout.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
        rows, fetches = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(count), 0) FROM events WHERE type = 'open'"
        ).fetchone()
    figures.open_rows, figures.open_fetches = int(rows), int(fetches)


def describe(figures: HttpFigures) -> list[str]:
    closed = sorted(figures.slow_closed_after)
    still_open = figures.slow_opened - len(closed)
    slow = (
        f"slow HTTP clients: {figures.slow_opened} opened, {len(closed)} closed by the relay"
        + (f" after {closed[len(closed) // 2]:.0f} s (median)" if closed else "")
        + f", {still_open} still open at the end"
    )
    worst_health = max((t for t, _ in figures.health), default=0.0)
    statuses = sorted({s for _, s in figures.health})
    worst_greeting = max(figures.greeting, default=0.0)
    probes = (
        f"while they ran: /healthz worst {worst_health:.2f} s (statuses {statuses}),"
        f" SMTP greeting worst {worst_greeting:.2f} s over {len(figures.greeting)} probes"
    )
    replay = (
        f"pixel replay flood: {sum(figures.replay_answers.values())} fetches, answers"
        f" {figures.replay_answers}; open events: {figures.open_rows} rows counting"
        f" {figures.open_fetches} fetches"
    )
    return [slow, probes, replay]
