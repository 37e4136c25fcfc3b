"""The open pixel under load: the real tracking app (token check, verdict, an open event for
every request, written to SQLite in batches) against a bare aiohttp handler that returns the
same GIF, side by side on this machine with `wrk` (Debian package `wrk`).

The app runs as `serve` runs it (relay.app.Relay, so with its SMTP side idle): behind its
HTTP listener (tracking.listener: connection caps, header deadlines), on `http.processes`
processes (`--processes`, default as "auto" on this machine: one per core), which hand their
opens to one event process that checks, judges and writes them; `--in-process` does that on
the main HTTP process's event loop instead (http.event_process = false). The bare handler is
one aiohttp process.

Each server runs in its own process on a free loopback port; wrk fetches 5,000 distinct
recipients' pixel URLs in turn, and the two servers take turns for several rounds so that
other load on the machine hits both alike. Afterwards the app is stopped cleanly and the open
rows in its SQLite file are counted against the requests wrk saw answered.

Run from the repository root:

    python bench/pixel.py                          # 3 rounds of 10 s each, 64 connections
    python bench/pixel.py --processes 1            # the app on one HTTP process
    python bench/pixel.py --seconds 5 --rounds 2 --durable
    python bench/pixel.py --seconds 5 --rounds 2 --in-process

`--durable` answers each pixel only after its open is committed (tracking.durable_events);
by default opens are committed within one batch round after the answer.
`--replay` fetches one recipient's pixel URL over and over (a replay flood): every fetch is
counted, on one row per repeat window. `--aggregate` fetches the pixels of copies measured in
aggregate (tracking.opens = "aggregate": one URL per message, here 50 messages), each fetch
from another client address (X-Forwarded-For, believed from loopback), so that every fetch is
a new reader and is counted: the counts in aggregate_counts, no event rows.

Every request comes from one client (127.0.0.1), so the app runs with its per-client limit on
recorded opens raised out of reach (tracking.fetch_rate_*): each fetch is resolved and
counted, as fetches from many clients would be.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web

from relay.cores import auto_http_processes
from tracking import PIXEL_GIF, RecipientRef, Signer, TrackingUrls
from tracking.tokens import AggregateRef

KEYS = ("bench-pixel-key-0123456789abcdef",)
PUBLIC = "https://mail.shop.example"
AGENT = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Thunderbird/128.0"
RECIPIENTS = 5000
MESSAGES = 50  # aggregate pixel URLs: one per message


# --- the two servers (run as child processes) ----------------------------------------------


async def bare_gif(request: web.Request) -> web.Response:
    return web.Response(
        body=PIXEL_GIF, content_type="image/gif", headers={"Cache-Control": "no-store"}
    )


async def serve(
    kind: str, data: Path | None, durable: bool, event_process: bool, processes: int
) -> None:
    if kind == "bare":
        app = web.Application()
        app.router.add_get("/o/{token}.gif", bare_gif)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(runner.addresses[0][1], flush=True)
        await stopped()
        await runner.cleanup()
        return
    # The app as serve runs it: its listener, its event process, its HTTP processes.
    from relay.app import Relay
    from relay.settings import (
        DeliverySettings,
        HttpSettings,
        Listen,
        Settings,
        SigningSettings,
        SmtpSettings,
        StorageSettings,
        TrackingSettings,
    )

    assert data is not None
    settings = Settings(
        storage=StorageSettings(data),
        signing=SigningSettings(KEYS),
        smtp=SmtpSettings(listen=Listen("127.0.0.1", 0), hostname="relay.bench"),
        http=HttpSettings(
            listen=Listen("127.0.0.1", 0),
            public_url=PUBLIC,
            event_process=event_process,
            processes=processes,
        ),
        tracking=TrackingSettings(
            durable_events=durable,
            # Every request comes from one client (see the module's doc).
            fetch_rate_per_minute=1e12,
            fetch_rate_burst=10**9,
            # Opened long after delivery: the verdict runs in full.
            machine_seconds=1e-6,
        ),
        delivery=DeliverySettings(processes=1),
    )
    relay = await Relay.start(settings)
    print(relay.addresses.http[1], flush=True)
    await stopped()
    await relay.stop()  # the app writes the opens it still holds


async def stopped() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


# --- the driver ---------------------------------------------------------------------------


def lua_script(directory: Path, recipients: int = RECIPIENTS, aggregate: bool = False) -> Path:
    urls = TrackingUrls(PUBLIC, Signer(KEYS))
    if aggregate:
        arrived = int(time.time())
        paths = [
            urls.aggregate_pixel_url(AggregateRef(f"bench-{i}", "shop.example"), arrived)
            for i in range(MESSAGES)
        ]
    else:
        paths = [
            urls.pixel_url(RecipientRef(f"bench-{i:06d}", "global", "bench", f"Q{i}"))
            for i in range(recipients)
        ]
    script = directory / "pixels.lua"
    entries = ",\n".join(f'  "{p.removeprefix(PUBLIC)}"' for p in paths)
    # Aggregate: every request from another reader (a distinct address in 10.0.0.0/8).
    fetch = (
        '  local client = string.format("10.%d.%d.%d", math.floor(i / 65536) % 256,'
        " math.floor(i / 256) % 256, i % 256)\n"
        '  return wrk.format("GET", paths[(i % #paths) + 1],'
        f' {{["User-Agent"] = "{AGENT}", ["X-Forwarded-For"] = client}})\n'
        if aggregate
        else '  return wrk.format("GET", paths[(i % #paths) + 1])\n'
    )
    script.write_text(
        f"local paths = {{\n{entries}\n}}\n"
        "local i = 0\n"
        # Each run starts where it is told: the readers of one run are not those of another.
        "init = function(args) i = tonumber(args[1] or 0) end\n"
        f'wrk.headers["User-Agent"] = "{AGENT}"\n'
        "request = function()\n"
        "  i = i + 1\n"
        f"{fetch}"
        "end\n"
    )
    return script


def start(
    kind: str, data: Path, durable: bool, in_process: bool, processes: int = 1
) -> tuple[subprocess.Popen[str], int]:
    command = [sys.executable, __file__, "--serve", kind, "--data", str(data)]
    command += ["--processes", str(processes)]
    if durable:
        command.append("--durable")
    if in_process:
        command.append("--in-process")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    port = int(process.stdout.readline())  # printed once the server listens
    return process, port


def stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


RUNS = itertools.count()
READERS_PER_RUN = 1 << 20  # distinct client addresses a run may use (10.0.0.0/8 has 2^24)


def run_wrk(port: int, script: Path, seconds: int, connections: int) -> tuple[float, int, int]:
    """(requests per second, requests answered, non-2xx answers) for one wrk run."""
    output = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}",
            "--",
            str(next(RUNS) * READERS_PER_RUN),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    answered = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return rate, answered, int(bad.group(1)) if bad else 0


def dropped_events(port: int) -> float:
    """What the app's /metrics says it had to drop (its buffer full: the writer too slow)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    found = re.search(r"^optout_events_dropped_total (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--durable", action="store_true")
    parser.add_argument("--replay", action="store_true", help="one pixel URL, fetched again")
    parser.add_argument(
        "--aggregate", action="store_true", help="aggregate pixels (one URL per message)"
    )
    parser.add_argument(
        "--in-process", action="store_true", help="opens written on the app's event loop"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=auto_http_processes(),
        help='the app\'s HTTP processes (http.processes; default: as "auto" on this machine)',
    )
    parser.add_argument("--serve", choices=["bare", "app"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.data, args.durable, not args.in_process, args.processes))
        return

    with tempfile.TemporaryDirectory(prefix="bench-pixel-") as tmp:
        directory = Path(tmp)
        script = lua_script(directory, 1 if args.replay else RECIPIENTS, args.aggregate)
        data = directory / "data"
        bare, bare_port = start("bare", directory, False, False)
        app, app_port = start("app", data, args.durable, args.in_process, args.processes)
        rates: dict[str, list[float]] = {"bare": [], "app": []}
        answered = 0
        try:
            for kind, port in (("bare", bare_port), ("app", app_port)):  # warm up
                _, count, _ = run_wrk(port, script, 2, args.connections)
                if kind == "app":
                    answered += count
            for round_ in range(args.rounds):
                for kind, port in (("bare", bare_port), ("app", app_port)):
                    rate, count, bad = run_wrk(port, script, args.seconds, args.connections)
                    if bad:
                        raise SystemExit(f"{kind}: {bad} answers were not 2xx")
                    rates[kind].append(rate)
                    if kind == "app":
                        answered += count
                    print(f"round {round_ + 1}: {kind:4} {rate:10.0f} requests/s", flush=True)
            dropped = dropped_events(app_port)
        finally:
            stop(bare)
            stop(app)
        with sqlite3.connect(data / "optout.db") as db:
            rows, fetches = db.execute(
                "SELECT COUNT(*), SUM(count) FROM events WHERE type = 'open'"
            ).fetchone()
            counters, counted = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(n), 0) FROM aggregate_counts"
            ).fetchone()
        fetches = (fetches or 0) + counted
    bare_rate = statistics.median(rates["bare"])
    app_rate = statistics.median(rates["app"])
    mode = "durable (answered after commit)" if args.durable else "batched (committed after)"
    mode += ", on the app's loop" if args.in_process else ", by the event process"
    mode += f"; {args.processes} HTTP process{'es' if args.processes > 1 else ''}"
    print(f"\nbare aiohttp handler: {bare_rate:10.0f} requests/s (median of {args.rounds})")
    print(f"tracking app pixel:   {app_rate:10.0f} requests/s, opens {mode}")
    print(f"ratio app/bare:       {app_rate / bare_rate:10.2f}  (target 1.00)")
    # wrk counts the answers it read before its deadline; the server may answer (and record)
    # a few more that were in flight, never fewer.
    print(f"open rows in SQLite:  {rows:10d}; aggregate counters: {counters}")
    print(f"opens counted:        {fetches:10d}")
    print(f"pixel requests:       {answered:10d} answered, as wrk saw them")
    print(f"events dropped:       {dropped:10.0f} (the event writer fell behind)")
    if fetches < answered:
        raise SystemExit("an answered open is missing from the database")


if __name__ == "__main__":
    main()
