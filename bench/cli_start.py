"""CLI start-up benchmark: `optout-relay suppress check ADDR` against `sqlite-utils tables DB`.

    python bench/cli_start.py [--runs 21] [--entries 1000]

Both commands run as fresh processes on the same store (the relay's own `optout.db`, with
ENTRIES suppressions in it), one after the other, alternating, so that whatever else the
machine does falls on both alike. Prints the median wall time of each and their ratio; the
target is at most 1.5x. The commands are found next to this Python (a venv's bin/).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def command(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        sys.exit(f"{name} not found: pip install '.[test]' first")
    return found


def timed(argv: list[str], cwd: Path, expect: int) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, cwd=cwd, capture_output=True, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != expect:
        sys.exit(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.decode()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--entries", type=int, default=1000)
    args = parser.parse_args()
    relay, sqlite_utils = command("optout-relay"), command("sqlite-utils")
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        listing = cwd / "list.txt"
        listing.write_text("".join(f"user{i}@shop.example\n" for i in range(args.entries)))
        subprocess.run(
            [relay, "suppress", "import", str(listing), "--format", "list"],
            cwd=cwd,
            check=True,
            capture_output=True,
        )
        database = cwd / "optout-data" / "optout.db"
        ours_argv = [relay, "suppress", "check", "user7@shop.example"]
        theirs_argv = [sqlite_utils, "tables", str(database)]
        timed(ours_argv, cwd, 0)  # warm the page cache and the bytecode of both
        timed(theirs_argv, cwd, 0)
        ours, theirs = [], []
        for _ in range(args.runs):
            ours.append(timed(ours_argv, cwd, 0))
            theirs.append(timed(theirs_argv, cwd, 0))
    ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {args.runs} runs each")
    print(f"optout-relay suppress check  median {ours_s * 1000:7.1f} ms")
    print(f"sqlite-utils tables          median {theirs_s * 1000:7.1f} ms")
    print(f"ratio {ours_s / theirs_s:.2f}x (target: at most 1.5x)")


if __name__ == "__main__":
    main()
