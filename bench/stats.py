"""Statistics benchmark: `stats` on 10 million events, from the rollup, against a grouped
scan of the events table.

    python bench/stats.py [--events 10000000] [--runs 5] [--keep DIR]

Writes EVENTS events into a fresh optout.db with one SQL statement (30 days, 50 campaigns,
a million recipients; delivered, opens human and machine, clicks, deferrals, bounces,
unsubscribes, complaints), builds the rollup from them (what the migration does on an
existing store; `insert_events` keeps it up to date batch by batch afterwards), then times:

- `Statistics.report()`: all campaigns, all time, and one campaign over the last 7 days;
- the baseline: the same numbers by GROUP BY over the events table (indexes included),
  unique openers by COUNT(DISTINCT), which is what `stats` would cost without a rollup;
- `optout-relay stats --format json` as a process (start-up included);
- what the rollup and the webhook check cost a writer: 200 batches of 500 opens through
  `insert_events`, against the bare INSERT of the same batches (each into a fresh file).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlite_utils

from relay.settings import Settings, StorageSettings
from relay.stores import STORE_FILE, Stores
from suppression import Database
from tracking.events import MIGRATIONS, Event, EventType, _insert_rows, insert_events
from tracking.statistics import Selection, count_events

ROOT = Path(__file__).resolve().parent.parent
DAYS = 30
CAMPAIGNS = 50
RECIPIENTS = 1_000_000

# i -> an event, spread like a month of campaign mail: per 1000 events, 400 delivered, 250
# human and 100 machine opens, 60 human and 20 machine clicks, 80 deferrals, 50 bounces (30
# hard 5xx, 20 soft), 30 unsubscribes, 10 complaints.
_GENERATE = f"""
WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i + 1 < ?),
gen AS (
    SELECT i, i % 1000 AS slot,
        strftime('%Y-%m-%dT%H:%M:%f', '2026-10-01', '+' || (i * {DAYS * 86400} / ?) || ' seconds')
            || 'Z' AS at,
        'c' || ((i / 997) % {CAMPAIGNS}) AS campaign,
        'h' || ((i * 7919) % {RECIPIENTS}) AS address_hash,
        'Q' || (i / 500) AS queue_id
    FROM seq
)
INSERT INTO events (type, at, address_hash, campaign, queue_id, machine, detail)
SELECT
    CASE WHEN slot < 400 THEN 'delivered' WHEN slot < 750 THEN 'open'
         WHEN slot < 830 THEN 'click' WHEN slot < 910 THEN 'deferred'
         WHEN slot < 960 THEN 'bounced' WHEN slot < 990 THEN 'unsubscribe'
         ELSE 'complaint' END,
    at, address_hash, campaign, queue_id,
    CASE WHEN slot BETWEEN 400 AND 749 THEN slot >= 650
         WHEN slot BETWEEN 750 AND 829 THEN slot >= 810 END,
    CASE WHEN slot < 400 THEN '{{"reply":"250 ok","attempt":1,"from_domain":"shop.example"}}'
         WHEN slot < 750 THEN '{{"reason":"x"}}'
         WHEN slot BETWEEN 830 AND 909 THEN '{{"reply":"451 later","attempt":1}}'
         WHEN slot BETWEEN 910 AND 939 THEN '{{"reply":"550 no such user","attempt":1}}'
         WHEN slot BETWEEN 940 AND 959 THEN '{{"reply":"452 full","attempt":5}}'
    END
FROM gen
"""

# The same numbers as stats, the plain way: one grouped pass over the events.
_BASELINE = """
SELECT campaign,
    SUM(type = 'delivered'), SUM(type = 'deferred'),
    SUM(type = 'bounced' AND json_extract(detail, '$.reply') LIKE '5%'),
    SUM(type = 'bounced' AND json_extract(detail, '$.reply') NOT LIKE '5%'),
    SUM(type = 'complaint'), SUM(type = 'unsubscribe'),
    COUNT(DISTINCT CASE WHEN type = 'open' AND NOT machine THEN address_hash END),
    COUNT(DISTINCT CASE WHEN type = 'open' AND machine THEN address_hash END),
    COUNT(DISTINCT CASE WHEN type = 'click' AND NOT machine THEN address_hash END)
FROM events {where} GROUP BY campaign
"""


def median_time(action: object, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def build(directory: Path, events: int) -> None:
    async with Stores(Settings(storage=StorageSettings(directory))):
        pass  # every table, trigger and index, as serve makes them
    db = sqlite_utils.Database(directory / STORE_FILE)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")  # a benchmark's own file: no need to survive a crash
    started = time.perf_counter()
    with db.conn:
        db.execute(_GENERATE, [events, events])
    print(f"generated {events:,} events with SQL: {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    with db.conn:
        db.execute("DELETE FROM stats_counts")
        db.execute("DELETE FROM stats_reach")
        count_events(db, 0)
    rollup_rows = db.execute("SELECT COUNT(*) FROM stats_counts").fetchone()[0]
    print(
        f"rollup built from them once (as the migration does): "
        f"{time.perf_counter() - started:.1f} s, {rollup_rows:,} rows"
    )
    db.execute("ANALYZE")
    db.close()


async def time_stats(directory: Path, runs: int) -> None:
    settings = Settings(storage=StorageSettings(directory))
    async with Stores(settings) as stores:
        for label, selection in (
            ("all campaigns, all time", Selection()),
            ("one campaign, last 7 days", Selection(campaign="c7", since_hour="2026-10-24T00")),
        ):
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                report = await stores.statistics.report(selection)
                times.append(time.perf_counter() - started)
            ours = statistics.median(times)
            where = (
                ""
                if selection.campaign is None
                else "WHERE campaign = 'c7' AND at >= '2026-10-24T00'"
            )
            db = sqlite_utils.Database(directory / STORE_FILE)
            baseline = median_time(
                lambda db=db, where=where: db.execute(_BASELINE.format(where=where)).fetchall(),
                max(1, runs // 2),
            )
            db.close()
            print(
                f"stats, {label}: {ours * 1000:.1f} ms ({len(report)} rows) vs grouped scan "
                f"{baseline * 1000:.0f} ms: {baseline / ours:.0f}x faster"
            )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    config = directory / "bench.toml"
    config.write_text(f'[storage]\ndir = "{directory}"\n')
    command = [sys.executable, "-m", "relay", "stats", "--format", "json", "--config", str(config)]
    cli = median_time(
        lambda: subprocess.run(command, check=True, capture_output=True, env=env), runs
    )
    print(f"`optout-relay stats --format json` as a process: {cli * 1000:.0f} ms (median)")


async def time_writes(batches: int = 200, size: int = 500) -> None:
    """insert_events (rollup and webhook check included) vs the bare INSERT, each into a
    fresh file: what the rollup costs a writer such as the event process."""
    events = [
        [
            Event(
                EventType.OPEN,
                f"w{(b * size + i) % 50_000}",
                f"c{b % CAMPAIGNS}",
                f"Q{b}",
                i % 3 == 0,
                {"reason": "x"},
            )
            for i in range(size)
        ]
        for b in range(batches)
    ]

    async def write(full: bool) -> float:
        directory = Path(tempfile.mkdtemp(prefix="stats-bench-writes-"))
        try:
            if full:
                async with Stores(Settings(storage=StorageSettings(directory))):
                    pass
            own = tuple(m for m in MIGRATIONS if m.name.startswith("tracking/00"))
            database = await Database.open(directory / STORE_FILE, () if full else own)
            # The bare INSERT: insert_events less its counts and webhooks.
            insert = insert_events if full else _insert_rows
            started = time.perf_counter()
            for batch in events:
                await database.write(lambda db, batch=batch: insert(db, batch))
            elapsed = time.perf_counter() - started
            await database.close()
            return elapsed
        finally:
            shutil.rmtree(directory)

    rounds = [(await write(True), await write(False)) for _ in range(3)]
    full = min(r[0] for r in rounds)
    bare = min(r[1] for r in rounds)
    count = batches * size
    print(
        f"writing {count:,} opens in batches of {size} (best of 3): insert_events"
        f" {full / count * 1e6:.1f} us/event, the bare INSERT {bare / count * 1e6:.1f}"
        f" us/event: {full / bare:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="build here and keep it (default: a temp dir)")
    args = parser.parse_args()
    directory = args.keep or Path(tempfile.mkdtemp(prefix="stats-bench-"))
    try:
        if not (directory / STORE_FILE).exists():
            asyncio.run(build(directory, args.events))
        asyncio.run(time_stats(directory, args.runs))
        asyncio.run(time_writes())
    finally:
        if args.keep is None:
            shutil.rmtree(directory)


if __name__ == "__main__":
    main()
