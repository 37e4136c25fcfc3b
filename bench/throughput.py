"""End-to-end throughput: optout-relay vs a plain aiosmtpd pass-through relay, side by side.

Postfix's smtp-source submits the same HTML campaign message to each relay, both forward to
Postfix's smtp-sink. The pass-through relay is done when smtp-source is; optout-relay is done
when its spool is empty (every copy durably spooled, rewritten and delivered). The two take
turns for several rounds, so that other load on the machine hits both alike, and the medians
are compared. Also reports the CPU time each spent per message (all of its processes, from
/proc: steadier than wall time on a busy machine), optout-relay's peak RSS, per process, and
the peak under 100 clients each submitting a 1 MB message at once. optout-relay runs on its
defaults (delivery.processes and workers) unless --processes or --workers say otherwise.

Needs Debian's postfix package (smtp-source, smtp-sink). Run from the repository root:

    python bench/throughput.py                     # 2,000 / 1,000 messages, 3 rounds
    python bench/throughput.py --count 1000 --rounds 5
    python bench/throughput.py --processes 2 --workers 16
    python bench/throughput.py --memory-only
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import smtplib
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib

ROOT = Path(__file__).resolve().parent.parent
SESSIONS = 8


def free_ports(count: int) -> list[int]:
    """Distinct free ports: held all at once while asking."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def campaign(size: int) -> bytes:
    """A multipart/alternative campaign of about `size` bytes, as a marketing tool sends it."""
    paragraph = (
        '<tr><td style="padding:12px;font-family:Arial,sans-serif;font-size:15px;color:#333">'
        '<h2 style="margin:0 0 8px">Spring collection</h2><p>New arrivals in every size, '
        'free shipping over 50 EUR. <a href="https://shop.example/spring?utm_source=mail">'
        "Shop now</a></p></td></tr>\n"
    )
    rows = paragraph * max(1, (size * 3 // 4) // len(paragraph))
    html = (
        '<!doctype html><html><head><meta charset="utf-8"><title>Spring</title></head>'
        f'<body><table width="600" align="center">{rows}</table></body></html>'
    )
    message = EmailMessage()
    message["From"] = "Shop <news@shop.example>"
    message["To"] = "customer@example.org"
    message["Subject"] = "Spring collection"
    message["X-Optout-Campaign"] = "spring-bench"
    message.set_content("Spring collection: new arrivals. https://shop.example/spring\n" * 20)
    message.add_alternative(html, subtype="html")
    return message.as_bytes()


def run_source(port: int, message_file: Path, count: int) -> float:
    started = time.perf_counter()
    subprocess.run(
        [
            "smtp-source",
            "-s",
            str(SESSIONS),
            "-m",
            str(count),
            "-d",
            "-F",
            str(message_file),
            "-f",
            "news@shop.example",
            "-t",
            "customer@example.org",
            f"127.0.0.1:{port}",
        ],
        check=True,
    )
    return time.perf_counter() - started


def spool_empty(data_dir: Path) -> bool:
    try:
        with sqlite3.connect(data_dir / "spool.db", timeout=10) as db:
            return bool(db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0] == 0)
    except sqlite3.OperationalError:
        return False


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (a child started from a thread is listed under that
    thread's task, as the delivery process's DKIM signing helper is)."""
    found = [pid]
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                found += tree(int(child))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time of these processes so far (those gone count nothing)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def tree_peak_rss_mb(pid: int) -> list[float]:
    """Peak RSS of the relay, then of each of its descendants (delivery, HTTP workers,
    helpers, Python's resource tracker); their sum is an upper bound of the whole relay's."""
    return [peak_rss_mb(process) for process in tree(pid)]


def describe_rss(peaks: list[float]) -> str:
    children = " + ".join(f"{peak:.0f}" for peak in peaks[1:])
    return f"{sum(peaks):.0f} MB in all ({peaks[0]:.0f} front door + {children} children)"


def tree_pss_mb(pid: int) -> float:
    """The proportional set size of the relay and its descendants added up: each shared
    page (the interpreter, libraries) counted once across them, unlike a sum of RSS."""
    total = 0.0
    for process in tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{process}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024
    return total


class PssSampler(threading.Thread):
    """The highest `tree_pss_mb` seen, sampled every 20 ms (the kernel keeps no PSS peak)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, tree_pss_mb(self.pid))


def start_relay(
    workdir: Path,
    sink_port: int,
    workers: int | None = None,
    processes: int | None = None,
    extra: str = "",
) -> tuple[subprocess.Popen[bytes], int]:
    """optout-relay delivering to `sink_port`; None: the relay's default. `extra`: more
    config lines for its [delivery] section, then sections of their own."""
    smtp_port, http_port = free_ports(2)
    config = workdir / "relay.toml"
    config.write_text(
        f'[storage]\ndir = "{workdir / "data"}"\n'
        f'[smtp]\nlisten = "127.0.0.1:{smtp_port}"\nmax_message_size = 5000000\n'
        "max_connections_per_client = 200\n"
        f'[http]\nlisten = "127.0.0.1:{http_port}"\npublic_url = "https://mail.shop.example"\n'
        f'[delivery]\ndownstream = "smtp://127.0.0.1:{sink_port}"\n'
        + ("" if workers is None else f"workers = {workers}\n")
        + ("" if processes is None else f"processes = {processes}\n")
        + extra
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", str(config)],
        cwd=workdir,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    wait_listening(smtp_port)
    warm_up(smtp_port, workdir / "data")
    return process, smtp_port


def warm_up(port: int, data_dir: Path) -> None:
    """One message through, so that the delivery processes are up before the clock starts."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.sendmail(
            "news@shop.example",
            ["warm-up@example.org"],
            b"From: news@shop.example\r\nSubject: warm-up\r\n\r\nwarm-up\r\n",
        )
    deadline = time.monotonic() + 60
    while not spool_empty(data_dir):
        if time.monotonic() > deadline:
            raise RuntimeError("the warm-up message was not delivered within 60 s")
        time.sleep(0.01)


def measure_relay(
    workdir: Path,
    sink_port: int,
    message_file: Path,
    count: int,
    workers: int | None,
    processes: int | None,
) -> tuple[float, float, list[float]]:
    """(messages per second, CPU seconds per message, peak RSS per process)."""
    process, port = start_relay(workdir, sink_port, workers, processes)
    try:
        pids = tree(process.pid)
        cpu = cpu_seconds(pids)
        started = time.perf_counter()
        run_source(port, message_file, count)
        while not spool_empty(workdir / "data"):
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        used = cpu_seconds(pids) - cpu
        return count / elapsed, used / count, tree_peak_rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait()


def measure_passthrough(
    sink_port: int, message_file: Path, count: int, pool: int
) -> tuple[float, float]:
    """(messages per second, CPU seconds per message) of the pass-through relay."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench" / "passthrough.py"),
            str(port),
            str(sink_port),
            str(pool),
        ]
    )
    try:
        wait_listening(port)
        cpu = cpu_seconds([process.pid])
        rate = count / run_source(port, message_file, count)
        return rate, (cpu_seconds([process.pid]) - cpu) / count
    finally:
        process.terminate()
        process.wait()


async def concurrent_big_submissions(port: int, clients: int, size: int) -> None:
    body = ("x" * 76 + "\r\n") * (size // 78)
    message = (
        "From: news@shop.example\r\nTo: big@example.org\r\nSubject: big\r\n"
        "Content-Type: text/plain\r\n\r\n" + body
    ).encode()

    async def one() -> None:
        await aiosmtplib.send(
            message,
            sender="news@shop.example",
            recipients=["big@example.org"],
            hostname="127.0.0.1",
            port=port,
            timeout=120,
        )

    await asyncio.gather(*(one() for _ in range(clients)))


def measure_memory(
    workdir: Path, sink_port: int, workers: int | None, processes: int | None
) -> tuple[list[float], float]:
    """Peak RSS per process, and the peak of the PSS summed over the processes."""
    process, port = start_relay(workdir, sink_port, workers, processes)
    sampler = PssSampler(process.pid)
    sampler.start()
    try:
        asyncio.run(concurrent_big_submissions(port, 100, 1_000_000))
        while not spool_empty(workdir / "data"):
            time.sleep(0.05)
        return tree_peak_rss_mb(process.pid), sampler.peak
    finally:
        sampler.done.set()
        sampler.join()
        process.terminate()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="messages per run")
    parser.add_argument(
        "--workers", type=int, help="optout-relay copies sent at once (default: its own)"
    )
    parser.add_argument(
        "--processes", type=int, help="optout-relay delivery processes (default: its own)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of each relay per size, taken in turns"
    )
    parser.add_argument(
        "--memory-only", action="store_true", help="only the 100 x 1 MB memory measurement"
    )
    args = parser.parse_args()
    if not (shutil.which("smtp-source") and shutil.which("smtp-sink")):
        sys.exit("needs smtp-source and smtp-sink (Debian package postfix)")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        sink_port = free_port()
        user = ["-u", "postfix"] if os.geteuid() == 0 else []
        sink = subprocess.Popen(["smtp-sink", *user, f"127.0.0.1:{sink_port}", "1024"])
        try:
            wait_listening(sink_port)
            for size in () if args.memory_only else (20_000, 100_000):
                message_file = workdir / f"campaign-{size}.eml"
                message_file.write_bytes(campaign(size))
                count = args.count if size <= 20_000 else args.count // 2
                baselines, ours, peaks = [], [], []
                cpu: dict[str, list[float]] = {"pass-through": [], "optout-relay": []}
                # In turns, so that whatever else the machine does hits both alike.
                for round_ in range(args.rounds):
                    base_rate, base_cpu = measure_passthrough(
                        sink_port, message_file, count, SESSIONS
                    )
                    baselines.append(base_rate)
                    cpu["pass-through"].append(base_cpu)
                    run_dir = workdir / f"relay-{size}-{round_}"
                    run_dir.mkdir()
                    rate, used, rss = measure_relay(
                        run_dir, sink_port, message_file, count, args.workers, args.processes
                    )
                    ours.append(rate)
                    cpu["optout-relay"].append(used)
                    peaks.append(rss)
                    print(
                        f"{size // 1000:>4} KB round {round_ + 1}: pass-through"
                        f" {base_rate:4.0f} msg/s ({base_cpu * 1000:.2f} ms CPU/msg),"
                        f" optout-relay {rate:4.0f} msg/s ({used * 1000:.2f} ms CPU/msg)",
                        flush=True,
                    )
                baseline, rate = statistics.median(baselines), statistics.median(ours)
                print(
                    f"{size // 1000:>4} KB median: pass-through {baseline:.0f} msg/s,"
                    f" optout-relay {rate:.0f} msg/s, ratio {rate / baseline:.2f} (target 1.00);"
                    f" CPU per message {statistics.median(cpu['pass-through']) * 1000:.2f} ms"
                    f" against {statistics.median(cpu['optout-relay']) * 1000:.2f} ms;"
                    f" peak RSS {describe_rss(max(peaks, key=sum))}",
                    flush=True,
                )
            memory_dir = workdir / "memory"
            memory_dir.mkdir()
            peak, pss = measure_memory(memory_dir, sink_port, args.workers, args.processes)
            print(
                f"100 clients x 1 MB at once: peak RSS {describe_rss(peak)};"
                f" peak PSS of all processes together {pss:.0f} MB (target 300)"
            )
        finally:
            sink.terminate()
            sink.wait()


if __name__ == "__main__":
    main()
