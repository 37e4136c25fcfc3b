"""The shared store against the embedded one, same machine, same run: the RCPT suppression
check (median and 99th percentile), opens recorded through the pixel, and the PostgreSQL
driver choice (psycopg 3 on the engine's threads against asyncpg's coroutines).

It starts a private PostgreSQL server (as the tests do: tests/postgres.py; root runs it as
the postgres user) and an SQLite store in a temporary directory, fills both with the same
suppressions, then measures each in turn:

- check: `SuppressionStore.check`, the call the front door makes at RCPT, one at a time and
  16 at once (a busy front door), over addresses half of which are suppressed;
- pixel: the real tracking app (token check, verdict, an open event per request) served on
  a loopback port, fetched by 32 concurrent clients for a few seconds: requests answered per
  second, and the opens found in the store afterwards;
- drivers: a primary-key lookup and batches of 500 event rows inserted, by psycopg through
  the engine (a thread hop per call, as the stores run) and by asyncpg directly.

    python bench/shared_store.py            # about a minute
    python bench/shared_store.py --checks 5000 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.settings import Settings, SigningSettings, StorageSettings
from relay.stores import Stores
from suppression import Entry, Reason
from tests.postgres import running_postgres, unavailable_reason
from tracking import RecipientRef, Signer, TrackingUrls, create_app

KEYS = ("bench-signing-key-0123456789abcdef",)
PUBLIC = "https://t.example"
SUPPRESSED = 10_000


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def fill(stores: Stores) -> None:
    hasher = stores.suppressions.hasher
    entries = [
        Entry(hasher.hash(f"s{n}@example.org"), "global", Reason.UNSUBSCRIBE, "bench")
        for n in range(SUPPRESSED)
    ]
    for start in range(0, len(entries), 5000):
        await stores.suppressions.apply(entries[start : start + 5000], actor="bench")
    await stores.suppressions.remember([f"r{n}@example.org" for n in range(5000)])


async def checks(stores: Stores, count: int, concurrency: int) -> list[float]:
    latencies: list[float] = []
    addresses = [f"{'s' if n % 2 else 'x'}{n % SUPPRESSED}@example.org" for n in range(count)]

    async def worker(mine: list[str]) -> None:
        for address in mine:
            started = time.perf_counter()
            await stores.suppressions.check(address)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker(addresses[k::concurrency]) for k in range(concurrency)))
    return latencies


async def pixel(stores: Stores, seconds: float) -> tuple[float, int]:
    import aiohttp
    from aiohttp import web

    urls = TrackingUrls(PUBLIC, Signer(KEYS))
    app = create_app(stores.suppressions, stores.events, urls, event_process=True, fetch_limit=None)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    hasher = stores.suppressions.hasher
    paths = [
        urls.pixel_url(
            RecipientRef(hasher.hash(f"r{n}@example.org"), "global", "bench", f"Q{n}")
        ).removeprefix(PUBLIC)
        for n in range(5000)
    ]
    answered = 0
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:

        async def client(k: int) -> None:
            nonlocal answered
            n = k
            while time.monotonic() < deadline:
                async with http.get(paths[n % len(paths)]) as response:
                    await response.read()
                    answered += response.status == 200
                n += 32

        started = time.monotonic()
        await asyncio.gather(*(client(k) for k in range(32)))
        elapsed = time.monotonic() - started
    await runner.cleanup()  # the event process writes what it has before it stops
    opens = await stores.database.read(
        lambda db: db.execute("SELECT count(*) FROM events WHERE type = 'open'").fetchone()[0]
    )
    return answered / elapsed, int(opens)


async def timed(fn: Callable[[], Awaitable[Any]], times: int) -> list[float]:
    latencies = []
    for _ in range(times):
        started = time.perf_counter()
        await fn()
        latencies.append(time.perf_counter() - started)
    return latencies


async def drivers(url: str, stores: Stores, times: int) -> dict[str, tuple[float, float]]:
    import asyncpg

    key = stores.suppressions.hasher.hash("s1@example.org")
    rows = [("open", "2026-01-01T00:00:00.000Z", key, "bench", 0) for _ in range(500)]
    insert = "INSERT INTO events (type, at, address_hash, campaign, machine) VALUES "
    results: dict[str, tuple[float, float]] = {}

    async def psycopg_lookup() -> Any:
        return await stores.database.read(
            lambda db: db.execute(
                "SELECT reason FROM suppressions WHERE address_hash = ? AND scope = 'global'",
                [key],
            ).fetchone()
        )

    async def psycopg_batch() -> Any:
        return await stores.database.write(
            lambda db: db.executemany(insert + "(?, ?, ?, ?, ?)", rows)
        )

    conn = await asyncpg.connect(url)
    try:

        async def asyncpg_lookup() -> Any:
            return await conn.fetchrow(
                "SELECT reason FROM suppressions WHERE address_hash = $1 AND scope = 'global'",
                key,
            )

        async def asyncpg_batch() -> Any:
            async with conn.transaction():
                await conn.executemany(insert + "($1, $2, $3, $4, $5)", rows)

        for name, fn in (
            ("psycopg lookup", psycopg_lookup),
            ("asyncpg lookup", asyncpg_lookup),
        ):
            lat = await timed(fn, times)
            results[name] = (statistics.median(lat) * 1e3, percentile(lat, 0.99) * 1e3)
        for name, fn in (
            ("psycopg 500-row batch", psycopg_batch),
            ("asyncpg 500-row batch", asyncpg_batch),
        ):
            lat = await timed(fn, 20)
            results[name] = (statistics.median(lat) * 1e3, percentile(lat, 0.99) * 1e3)
    finally:
        await conn.close()
    return results


async def main(args: argparse.Namespace) -> None:
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"cannot start PostgreSQL: {reason}")
    with running_postgres() as server, tempfile.TemporaryDirectory() as tmp:
        url = server.create_database()
        report: dict[str, dict[str, Any]] = {}
        for engine, database in (("sqlite", None), ("postgresql", url)):
            settings = Settings(
                storage=StorageSettings(Path(tmp) / engine, database=database),
                signing=SigningSettings(KEYS),
            )
            async with Stores(settings) as stores:
                await fill(stores)
                one = await checks(stores, args.checks, 1)
                many = await checks(stores, args.checks, 16)
                rate, opens = await pixel(stores, args.seconds)
                report[engine] = {
                    "check": (statistics.median(one) * 1e3, percentile(one, 0.99) * 1e3),
                    "check16": (statistics.median(many) * 1e3, percentile(many, 0.99) * 1e3),
                    "pixel": (rate, opens),
                }
                if database is not None:
                    report["drivers"] = await drivers(url, stores, args.checks)
        print(f"RCPT suppression check ({args.checks} checks, {SUPPRESSED} entries), ms:")
        print(f"{'':12} {'median':>8} {'p99':>8} {'16 at once: median':>20} {'p99':>8}")
        for engine in ("sqlite", "postgresql"):
            (m1, p1), (m16, p16) = report[engine]["check"], report[engine]["check16"]
            print(f"{engine:12} {m1:8.3f} {p1:8.3f} {m16:20.3f} {p16:8.3f}")
        print(f"\nPixel ({args.seconds:.0f} s, 32 clients, event process):")
        for engine in ("sqlite", "postgresql"):
            rate, opens = report[engine]["pixel"]
            print(f"{engine:12} {rate:8.0f} req/s, {opens} opens written")
        ratio = report["postgresql"]["pixel"][0] / report["sqlite"]["pixel"][0]
        print(f"postgresql / sqlite: {ratio:.2f}")
        print("\nDrivers on the same server, ms (median, p99):")
        for name, (median, p99) in report["drivers"].items():
            print(f"{name:24} {median:8.3f} {p99:8.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=5.0)
    asyncio.run(main(parser.parse_args()))
