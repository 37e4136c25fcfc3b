"""Suppression store benchmark: a large CSV import and RCPT-time checks.

    python bench/suppression_import.py [--rows 1000000] [--checks 100000]

Imports ROWS addresses from a CSV (normalising and HMAC-hashing every one, batched
transactions, audit rows included), then checks CHECKS addresses of which half are
suppressed. The same CSV is loaded with sqlite-utils' own `insert_all` (no hashing, no
index, no audit) into a fresh file as the yardstick; the target is within 2x of it.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gc
import random
import sys
import tempfile
import time
from pathlib import Path

import sqlite_utils

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from suppression import (
    MIGRATIONS,
    AddressHasher,
    Database,
    ImportOptions,
    SuppressionStore,
    import_file,
)
from suppression.store import find

DOMAINS = ["gmail.com", "yahoo.com", "outlook.com", "web.de", "example.org", "bücher.example"]


def make_csv(path: Path, rows: int, rng: random.Random) -> list[str]:
    addresses = []
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["email", "first_name", "signed_up"])
        for i in range(rows):
            domain = DOMAINS[i % len(DOMAINS)] if i % 3 else f"shop{i % 5000}.example"
            address = f"User.{i}.{rng.randrange(10**6)}@{domain}"
            addresses.append(address)
            writer.writerow([address, f"Name{i}", "2024-05-01"])
    return addresses


def baseline(csv_path: Path, db_path: Path) -> float:
    started = time.perf_counter()
    db = sqlite_utils.Database(db_path)
    with csv_path.open(newline="", encoding="utf-8") as file:
        db.table("rows").insert_all(csv.DictReader(file))
    db.close()
    return time.perf_counter() - started


async def ours(
    csv_path: Path, db_path: Path, addresses: list[str], checks: int, rng: random.Random
) -> dict[str, float]:
    db = await Database.open(db_path, MIGRATIONS)
    store = SuppressionStore(db, AddressHasher(b"bench-key-0123456789abcdef012345"))
    try:
        started = time.perf_counter()
        gc.disable()  # as `optout-relay suppress import` does
        try:
            with csv_path.open("rb") as raw:
                report = await import_file(store, raw, csv_path.name, ImportOptions())
        finally:
            gc.enable()
        import_seconds = time.perf_counter() - started
        assert report.added == len(addresses) and report.bad == 0, report

        half = checks // 2
        probes = [a.upper() if i % 2 else a for i, a in enumerate(rng.sample(addresses, half))]
        probes += [f"absent.{i}@{DOMAINS[i % len(DOMAINS)]}" for i in range(checks - half)]
        rng.shuffle(probes)

        started = time.perf_counter()
        hits = 0
        for address in probes:
            hits += await store.check(address) is not None
        sequential = time.perf_counter() - started
        assert hits == half, hits

        started = time.perf_counter()
        for i in range(0, len(probes), 100):
            found = await asyncio.gather(*(store.check(a) for a in probes[i : i + 100]))
            hits -= sum(f is not None for f in found)
        concurrent = time.perf_counter() - started
        assert hits == 0

        # The lookup itself, without the thread hop: hash + one indexed query.
        hasher = store.hasher

        def direct(handle: sqlite_utils.Database) -> float:
            begun = time.perf_counter()
            for address in probes:
                find(handle, hasher.lookup_keys(address), ["global"], "2000-01-01")
            return time.perf_counter() - begun

        in_thread = await db.read(direct)
    finally:
        await db.close()
    return {
        "import": import_seconds,
        "sequential": sequential,
        "concurrent": concurrent,
        "direct": in_thread,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--checks", type=int, default=100_000)
    parser.add_argument("--dir", type=Path, default=None, help="work here (default: a tempdir)")
    args = parser.parse_args()
    rng = random.Random(6)
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        directory = Path(work)
        csv_path = directory / "suppressions.csv"
        addresses = make_csv(csv_path, args.rows, rng)
        size = csv_path.stat().st_size
        print(f"CSV: {args.rows:,} rows, {size / 2**20:.1f} MiB")
        base = baseline(csv_path, directory / "baseline.db")
        result = asyncio.run(ours(csv_path, directory / "optout.db", addresses, args.checks, rng))
        stored = (directory / "optout.db").stat().st_size
    rows = args.rows
    print(f"sqlite-utils insert_all : {base:7.2f} s  {rows / base:10,.0f} rows/s")
    print(
        f"suppress import         : {result['import']:7.2f} s  {rows / result['import']:10,.0f}"
        f" rows/s  (normalise + HMAC + audit, {stored / 2**20:.0f} MiB)"
    )
    print(f"ratio import/insert_all : {result['import'] / base:7.2f}x  (target <= 2x)")
    checks = args.checks
    print(f"check, one at a time    : {result['sequential'] / checks * 1e6:7.1f} us/check")
    print(f"check, 100 concurrent   : {result['concurrent'] / checks * 1e6:7.1f} us/check")
    print(f"check, lookup only      : {result['direct'] / checks * 1e6:7.1f} us/check")


if __name__ == "__main__":
    main()
