"""A realistic downstream: optout-relay's throughput against an MTA that answers a set share
of recipients with 4xx (try later) and 5xx (no such user), against the same MTA answering
everyone with 250 (the clean case). A plain sink gives no back-pressure; real receivers
greylist and refuse (KumoMTA benchmarks its MTA this way).

The downstream is an aiosmtpd server (run in a process of its own by this script). Each
recipient's fate is fixed by a hash of its address: `--hard` of them (1%) get
`550 5.1.1` at RCPT on every attempt, `--soft` of them (10%) get `451 4.7.1` (greylisting)
at their first attempt and are taken at the next. It logs every decision with the time.

smtp-source submits the 20 KB campaign of bench/throughput.py, 8 sessions, one distinct
recipient per message (`-N`). Throughput is the submitted messages over the time until
every recipient has had its first attempt, and every DSN for a refused one has arrived
(the relay sends the sender an RFC 3464 report for each 5xx, through the same
downstream). The relay retries after 20 s (delivery.retry_initial_delay; in real life
minutes), after the first attempts are over. The clean case and the fussy one take turns;
medians. Then, for the fussy runs: every deferred recipient must have arrived later (its
delay is reported), every 5xx must have its DSN at the downstream and its `bounced` event
in `optout-relay events`.

Needs Debian's postfix package (smtp-source). Run from the repository root:

    python bench/fussy_downstream.py                       # 2,000 messages, 3 rounds each
    python bench/fussy_downstream.py --count 1000 --rounds 5 --soft 0.1 --hard 0.01
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from throughput import (  # type: ignore[import-not-found]  # bench/ is no package
    ROOT,
    SESSIONS,
    campaign,
    cpu_seconds,
    free_port,
    start_relay,
    tree,
    wait_listening,
)

SENDER = "news@shop.example"
# delivery.retry_initial_delay of the relay under test, seconds: past the end of a run's
# first attempts, as in real life (minutes), so that they are measured on their own.
RETRY = 20.0


# --- the downstream (a child process) ------------------------------------------------------


def fate(address: str, soft: float, hard: float) -> str:
    """ "hard", "soft" or "ok", fixed for an address by its hash. Only the benchmark's readers
    (smtp-source's numbered recipients) have a fate; anyone else is taken."""
    if not address.partition("@")[0].endswith("reader"):
        return "ok"
    draw = int.from_bytes(hashlib.sha256(address.lower().encode()).digest()[:8], "big") / 2**64
    if draw < hard:
        return "hard"
    return "soft" if draw < hard + soft else "ok"


class FussyHandler:
    def __init__(self, soft: float, hard: float, log_path: Path) -> None:
        self.soft = soft
        self.hard = hard
        self.tried: set[str] = set()
        self.log = log_path.open("a", buffering=1 << 16)

    def note(self, kind: str, address: str) -> None:
        self.log.write(f"{time.time():.3f} {kind} {address}\n")

    async def handle_RCPT(
        self, server: object, session: object, envelope: object, address: str, options: list[str]
    ) -> str:
        kind = fate(address, self.soft, self.hard)
        if envelope.mail_from in ("", "<>"):  # type: ignore[attr-defined]
            kind = "ok"  # the relay's DSNs to the sender
        first = address not in self.tried
        self.tried.add(address)
        if kind == "hard":
            self.note("5xx", address)
            return "550 5.1.1 No such user here"
        if kind == "soft" and first:
            self.note("4xx", address)
            return "451 4.7.1 Greylisted, try again later"
        envelope.rcpt_tos.append(address)  # type: ignore[attr-defined]
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        sender = envelope.mail_from  # type: ignore[attr-defined]
        for address in envelope.rcpt_tos:  # type: ignore[attr-defined]
            self.note("dsn" if sender in ("", "<>") else "250", address)
        return "250 2.0.0 Queued"


async def serve_downstream(port: int, soft: float, hard: float, log_path: Path) -> None:
    from aiosmtpd.smtp import SMTP

    handler = FussyHandler(soft, hard, log_path)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="fussy.test", enable_SMTPUTF8=True), "127.0.0.1", port
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def flush() -> None:
        while True:
            await asyncio.sleep(0.05)
            handler.log.flush()

    flusher = asyncio.create_task(flush())
    await stop.wait()
    flusher.cancel()
    server.close()
    handler.log.close()


# --- the driver ----------------------------------------------------------------------------


@dataclass
class Tally:
    """What the downstream's log says so far."""

    first: dict[str, float] = field(default_factory=dict)  # recipient -> first attempt
    soft: dict[str, float] = field(default_factory=dict)  # deferred -> when
    accepted: dict[str, float] = field(default_factory=dict)
    hard: set[str] = field(default_factory=set)
    dsns: list[float] = field(default_factory=list)  # when each arrived

    @classmethod
    def read(cls, path: Path) -> Tally:
        tally = cls()
        if not path.exists():
            return tally
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) != 3:
                continue  # a line being written
            at, kind, address = float(parts[0]), parts[1], parts[2]
            if kind == "dsn":
                tally.dsns.append(at)
                continue
            tally.first.setdefault(address, at)
            if kind == "4xx":
                tally.soft.setdefault(address, at)
            elif kind == "5xx":
                tally.hard.add(address)
            else:
                tally.accepted.setdefault(address, at)
        return tally


def start_downstream(
    log_path: Path, soft: float, hard: float
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve-downstream",
            str(port),
            "--soft",
            str(soft),
            "--hard",
            str(hard),
            "--log",
            str(log_path),
        ]
    )
    wait_listening(port)
    return process, port


def run_source(port: int, message_file: Path, count: int) -> None:
    subprocess.run(
        [
            "smtp-source",
            "-s",
            str(SESSIONS),
            "-m",
            str(count),
            "-d",
            "-N",  # a sequence number in front of each recipient: all distinct
            "-F",
            str(message_file),
            "-f",
            SENDER,
            "-t",
            "reader@example.org",
            f"127.0.0.1:{port}",
        ],
        check=True,
    )


def bounced_events(workdir: Path) -> int:
    output = subprocess.run(
        [
            sys.executable,
            "-m",
            "relay",
            "--config",
            str(workdir / "relay.toml"),
            "events",
            "--format",
            "jsonl",
            "--type",
            "bounced",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout
    return sum(1 for line in output.splitlines() if json.loads(line).get("type") == "bounced")


@dataclass
class Run:
    rate: float
    cpu: float  # seconds per message, all relay processes
    tally: Tally
    bounced: int = 0
    expected_soft: int = 0
    expected_hard: int = 0


def measure(
    workdir: Path, message_file: Path, count: int, soft: float, hard: float, check: bool
) -> Run:
    log_path = workdir / "downstream.log"
    downstream, port = start_downstream(log_path, soft, hard)
    relay, smtp_port = start_relay(
        workdir, port, extra=f"retry_initial_delay = {RETRY}\nretry_max_delay = {RETRY}\n"
    )
    try:
        recipients = [f"{n}reader@example.org" for n in range(1, count + 1)]
        hard_ones = {r for r in recipients if fate(r, soft, hard) == "hard"}
        soft_ones = {r for r in recipients if fate(r, soft, hard) == "soft"}
        pids = tree(relay.pid)
        cpu = cpu_seconds(pids)
        started = time.time()
        run_source(smtp_port, message_file, count)
        deadline = time.monotonic() + 600
        while True:  # every first attempt made, and every DSN in
            tally = Tally.read(log_path)
            tried = len(tally.first.keys() & set(recipients))
            if tried >= count and len(tally.dsns) >= len(hard_ones):
                break
            if time.monotonic() > deadline:
                raise SystemExit("the relay did not try every recipient within 10 minutes")
            time.sleep(0.02)
        elapsed = max([*tally.first.values(), *tally.dsns]) - started
        run = Run(count / elapsed, (cpu_seconds(pids) - cpu) / count, tally)
        if check:
            run.expected_soft, run.expected_hard = len(soft_ones), len(hard_ones)
            while not soft_ones <= tally.accepted.keys():  # the deferred ones, later
                if time.monotonic() > deadline:
                    missing = len(soft_ones - tally.accepted.keys())
                    raise SystemExit(f"{missing} deferred recipients never arrived")
                time.sleep(0.1)
                tally = Tally.read(log_path)
            run.tally = tally
            while (bounced := bounced_events(workdir)) < len(hard_ones):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            run.bounced = bounced
        return run
    finally:
        relay.terminate()
        relay.wait()
        downstream.terminate()
        downstream.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="messages per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--soft", type=float, default=0.10, help="share answered 4xx once")
    parser.add_argument("--hard", type=float, default=0.01, help="share answered 5xx")
    parser.add_argument("--serve-downstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--log", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_downstream:
        asyncio.run(serve_downstream(args.serve_downstream, args.soft, args.hard, args.log))
        return
    with tempfile.TemporaryDirectory(prefix="bench-fussy-") as tmp:
        workdir = Path(tmp)
        message_file = workdir / "campaign.eml"
        message_file.write_bytes(campaign(20_000))
        clean: list[Run] = []
        fussy: list[Run] = []
        for round_ in range(args.rounds):
            for kind, runs, soft, hard in (
                ("clean", clean, 0.0, 0.0),
                ("fussy", fussy, args.soft, args.hard),
            ):
                run_dir = workdir / f"{kind}-{round_}"
                run_dir.mkdir()
                run = measure(run_dir, message_file, args.count, soft, hard, kind == "fussy")
                runs.append(run)
                print(
                    f"round {round_ + 1}: {kind} {run.rate:5.0f} msg/s"
                    f" ({run.cpu * 1000:.2f} ms CPU/msg)",
                    flush=True,
                )
        clean_rate = statistics.median(r.rate for r in clean)
        fussy_rate = statistics.median(r.rate for r in fussy)
        print(
            f"\nclean downstream: {clean_rate:.0f} msg/s; {args.soft:.0%} 4xx and {args.hard:.0%}"
            f" 5xx: {fussy_rate:.0f} msg/s; ratio {fussy_rate / clean_rate:.2f} (target 0.90)"
        )
        failed = False
        for number, run in enumerate(fussy, 1):
            tally = run.tally
            later = [tally.accepted[r] - tally.soft[r] for r in tally.soft if r in tally.accepted]
            print(
                f"fussy round {number}: {len(tally.soft)} deferred (expected"
                f" {run.expected_soft}), {len(later)} of them arrived later, after"
                f" {min(later, default=0):.1f}-{max(later, default=0):.1f} s;"
                f" {len(tally.hard)} refused with 5xx (expected {run.expected_hard}),"
                f" {len(tally.dsns)} DSNs to the sender, {run.bounced} bounced events"
            )
            failed |= len(later) != run.expected_soft or len(tally.soft) != run.expected_soft
            failed |= not len(tally.hard) == len(tally.dsns) == run.bounced == run.expected_hard
        if failed:
            raise SystemExit("a deferred copy, a DSN or a bounced event is missing")


if __name__ == "__main__":
    main()
