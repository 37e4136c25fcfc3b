"""Bounce storm: DSNs per second through the feedback listener, and exactly-once processing
across a SIGKILL of serve, next to the relay's own end-to-end throughput.

Postfix's smtp-source sends RFC 3464 DSNs (hard, 5.1.1) to the return paths of COPIES copies
at once, as a burst of bounces after a campaign would:

1. throughput: all DSNs in, then all processed; DSNs/s accepted (250s) and processed;
2. storm: the same again, serve SIGKILLed (with its delivery process) once half of the
   DSNs are in, restarted, and the DSNs not yet accepted sent again. Checked, per copy:
   every DSN that got a 250 was committed, each committed report was processed once (one
   `bounced` event per report, no more, no fewer), and nothing waits;
3. the relay's own throughput on the same machine (bench/throughput.py's measure: 20 KB
   campaign mail through optout-relay into smtp-sink), for scale.

Needs Debian's postfix package (smtp-source, smtp-sink). From the repository root:

    python bench/bounce_storm.py                 # 10,000 DSNs to 20 copies
    python bench/bounce_storm.py --count 2000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import smtplib
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import throughput  # noqa: E402  (bench/throughput.py: the relay's own measure)

from relay.config import load_settings  # noqa: E402
from relay.feedback import CopyRecord, CopyTokens, FeedbackStore, TokenKind, copy_id  # noqa: E402
from relay.stores import Stores, signer  # noqa: E402

DOMAIN = "bounces.bench.example"
SESSIONS_PER_COPY = 2


@dataclass
class Copy:
    return_path: str
    dsn_file: Path
    address_hash: str


def write_config(workdir: Path) -> tuple[Path, int]:
    smtp, http, feedback = throughput.free_ports(3)
    config = workdir / "relay.toml"
    config.write_text(
        f'[storage]\ndir = "{workdir / "data"}"\n'
        f'[smtp]\nlisten = "127.0.0.1:{smtp}"\n'
        f'[http]\nlisten = "127.0.0.1:{http}"\n'
        '[signing]\nsecret_keys = ["bench-signing-key-0123456789abcdef"]\n'
        f'[feedback]\nlisten = "127.0.0.1:{feedback}"\ndomain = "{DOMAIN}"\n'
        # A storm from one address is the point here: no per-client limits in the way.
        "rate_per_minute = 100000000.0\nrate_burst = 1000000\n"
        "max_connections_per_client = 500\nmax_connections = 500\n"
    )
    return config, feedback


def dsn(to: str, recipient: str) -> bytes:
    """A DSN with LF line ends: smtp-source -F sends each line with CRLF itself."""
    boundary = "storm.boundary/mx.example.org"
    return "\n".join(
        [
            "From: MAILER-DAEMON@mx.example.org (Mail Delivery System)",
            f"To: {to}",
            "Subject: Undelivered Mail Returned to Sender",
            "Auto-Submitted: auto-replied",
            "MIME-Version: 1.0",
            f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
            "",
            f"--{boundary}",
            "Content-Type: text/plain",
            "",
            "Your message could not be delivered.",
            "",
            f"--{boundary}",
            "Content-Type: message/delivery-status",
            "",
            "Reporting-MTA: dns; mx.example.org",
            "",
            f"Final-Recipient: rfc822; {recipient}",
            "Action: failed",
            "Status: 5.1.1",
            f"Diagnostic-Code: smtp; 550 5.1.1 <{recipient}>: User unknown",
            "",
            f"--{boundary}",
            "Content-Type: text/rfc822-headers",
            "",
            "From: Shop <news@shop.example>",
            "Subject: Spring sale",
            "",
            f"--{boundary}--",
            "",
        ]
    ).encode()


async def prepare_copies(config: Path, workdir: Path, count: int) -> list[Copy]:
    """Copy records as the delivery worker writes them before sending, and a DSN file each."""
    settings = load_settings(config)
    tokens = CopyTokens(signer(settings))
    copies = []
    async with Stores(settings) as stores:
        records = []
        for index in range(count):
            address = f"gone{index}@example.org"
            address_hash = stores.suppressions.hasher.hash(address)
            cid = copy_id(f"BENCH{index:07X}", address_hash)
            records.append(CopyRecord(cid, address_hash, f"BENCH{index:07X}", "global", "storm"))
            return_path = tokens.address(TokenKind.RETURN_PATH, cid, DOMAIN)
            dsn_file = workdir / f"dsn-{index}.eml"
            dsn_file.write_bytes(dsn(return_path, address))
            copies.append(Copy(return_path, dsn_file, address_hash))
        await stores.suppressions.remember(f"gone{i}@example.org" for i in range(count))
        await FeedbackStore(stores.suppressions.database).record_copies(records)
    return copies


def start_serve(config: Path, port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", str(config)],
        cwd=config.parent,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,  # its own process group: the SIGKILL takes its children too
    )
    throughput.wait_listening(port)
    return process


def source(port: int, copy: Copy, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            "smtp-source",
            "-c",  # prints a counter each time DATA completes (a 2xx to the final dot)
            "-s",
            str(SESSIONS_PER_COPY),
            "-m",
            str(count),
            "-d",
            "-f",
            "",
            "-t",
            copy.return_path,
            "-F",
            str(copy.dsn_file),
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def accepted_by(process: subprocess.Popen[str]) -> int:
    """The 250s smtp-source counted (its last counter), once it has exited."""
    output, _ = process.communicate()
    counts = [int(n) for n in output.replace("\n", "\r").split("\r") if n.strip().isdigit()]
    return counts[-1] if counts else 0


def db_counts(data_dir: Path) -> dict[str, int]:
    with sqlite3.connect(data_dir / "optout.db", timeout=30) as db:
        return dict(db.execute("SELECT state, COUNT(*) FROM feedback_reports GROUP BY state"))


def wait_processed(data_dir: Path, total: int, within: float = 600) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        counts = db_counts(data_dir)
        if sum(counts.values()) >= total and not counts.get("new"):
            return
        time.sleep(0.05)
    raise RuntimeError(f"not all processed: {db_counts(data_dir)}")


def send_all(port: int, copies: list[Copy], per_copy: list[int]) -> list[int]:
    processes = [source(port, c, n) for c, n in zip(copies, per_copy, strict=True) if n]
    return [accepted_by(p) for p in processes]


def measure(workdir: Path, count: int, copies_count: int) -> tuple[float, float]:
    config, port = write_config(workdir)
    copies = asyncio.run(prepare_copies(config, workdir, copies_count))
    serve = start_serve(config, port)
    try:
        per_copy = [count // copies_count] * copies_count
        started = time.perf_counter()
        accepted = sum(send_all(port, copies, per_copy))
        intake = time.perf_counter() - started
        wait_processed(workdir / "data", accepted)
        processed = time.perf_counter() - started
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait()
    return accepted / intake, accepted / processed


class MarkedSender(threading.Thread):
    """Sends numbered DSNs one by one with smtplib and notes exactly which got a 250:
    smtp-source's counter counts a message when its final dot is sent, before the reply,
    so it cannot tell which were accepted when the server dies."""

    def __init__(self, port: int, copy: Copy, numbers: list[int]) -> None:
        super().__init__(daemon=True)
        self.port, self.copy, self.numbers = port, copy, numbers
        self.acked: set[int] = set()

    def run(self) -> None:
        template = self.copy.dsn_file.read_bytes().replace(b"\n", b"\r\n")
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
                for number in self.numbers:
                    marked = template.replace(
                        b"Subject:", f"X-Storm-Seq: {number}\r\nSubject:".encode(), 1
                    )
                    client.sendmail("", [self.copy.return_path], marked)
                    self.acked.add(number)
        except (OSError, smtplib.SMTPException):
            return  # the relay died: what got no 250 is sent again after the restart


def committed_for(data_dir: Path, copy: Copy) -> int:
    with sqlite3.connect(data_dir / "optout.db", timeout=30) as db:
        return int(
            db.execute(
                "SELECT COUNT(*) FROM feedback_reports WHERE recipients = json_array(?)",
                [copy.return_path],
            ).fetchone()[0]
        )


def storm(workdir: Path, count: int, copies_count: int) -> str:
    config, port = write_config(workdir)
    data_dir = workdir / "data"
    copies = asyncio.run(prepare_copies(config, workdir, copies_count + 1))
    marked_copy, copies = copies[-1], copies[:-1]
    marked_count = count // 10
    per_copy = [(count - marked_count) // copies_count] * copies_count
    serve = start_serve(config, port)
    marked = MarkedSender(port, marked_copy, list(range(marked_count)))
    marked.start()
    processes = [source(port, c, n) for c, n in zip(copies, per_copy, strict=True)]
    while sum(db_counts(data_dir).values()) < count // 2:
        time.sleep(0.01)
    os.killpg(serve.pid, signal.SIGKILL)
    serve.wait()
    marked.join()
    dots_sent = sum(accepted_by(p) for p in processes)
    before_restart = db_counts(data_dir)
    serve = start_serve(config, port)
    try:
        # What got no 250 is sent again, as the bouncing MTAs would retry it.
        rest = [n - committed_for(data_dir, c) for c, n in zip(copies, per_copy, strict=True)]
        again = MarkedSender(
            port, marked_copy, [n for n in range(marked_count) if n not in marked.acked]
        )
        again.start()
        send_all(port, copies, rest)
        again.join()
        wait_processed(data_dir, sum(db_counts(data_dir).values()))
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait()
    return verify(
        data_dir,
        [*copies, marked_copy],
        marked.acked | again.acked,
        marked_count,
        before_restart,
        dots_sent,
    )


def verify(
    data_dir: Path,
    copies: list[Copy],
    acked: set[int],
    marked_count: int,
    before_restart: dict[str, int],
    dots_sent: int,
) -> str:
    problems = []
    with sqlite3.connect(data_dir / "optout.db") as db:
        for copy in copies:
            committed, waiting = db.execute(
                "SELECT COUNT(*), SUM(state = 'new') FROM feedback_reports"
                " WHERE recipients = json_array(?)",
                [copy.return_path],
            ).fetchone()
            events = db.execute(
                "SELECT COUNT(*) FROM events WHERE type = 'bounced' AND address_hash = ?",
                [copy.address_hash],
            ).fetchone()[0]
            suppressed = db.execute(
                "SELECT reason FROM suppressions WHERE address_hash = ?", [copy.address_hash]
            ).fetchone()
            if events != committed or waiting:
                problems.append(
                    f"{copy.return_path}: {committed} committed, {events} bounced events,"
                    f" {waiting} waiting"
                )
            if suppressed is None or suppressed[0] != "hard_bounce":
                problems.append(f"{copy.return_path}: not suppressed ({suppressed})")
        marked_rows = [
            bytes(row[0])
            for row in db.execute(
                "SELECT content FROM feedback_reports WHERE recipients = json_array(?)",
                [copies[-1].return_path],
            )
        ]
        total = db.execute("SELECT COUNT(*) FROM feedback_reports").fetchone()[0]
    seen: dict[int, int] = {}
    for content in marked_rows:
        number = int(content.split(b"X-Storm-Seq: ", 1)[1].split(b"\r\n", 1)[0])
        seen[number] = seen.get(number, 0) + 1
    missing = sorted(n for n in acked if n not in seen)
    if missing:
        problems.append(f"marked DSNs that got 250 but were not committed: {missing[:10]}")
    if len(acked) != marked_count:
        problems.append(f"only {len(acked)} of {marked_count} marked DSNs got a 250 in the end")
    twice = sum(1 for n in seen.values() if n > 1)
    summary = (
        f"storm: {total} DSNs committed in all, {sum(before_restart.values())} before the"
        f" SIGKILL ({before_restart.get('new', 0)} of them not yet processed);"
        f" smtp-source had sent {dots_sent} final dots by then. Of {marked_count} numbered DSNs"
        f" each 250 was tracked: {len(acked)} got one, all committed and processed; {twice}"
        " were taken twice (committed, killed before the 250, resent: two reports, two"
        " events, as a retrying MTA makes)"
    )
    if problems:
        return summary + "\nFAILED:\n  " + "\n  ".join(problems[:20])
    return summary + "\nOK: every committed DSN processed exactly once (events == reports)"


def relay_throughput(workdir: Path, count: int) -> float:
    sink_port = throughput.free_port()
    user = ["-u", "postfix"] if os.geteuid() == 0 else []
    sink = subprocess.Popen(["smtp-sink", *user, f"127.0.0.1:{sink_port}", "1024"])
    try:
        throughput.wait_listening(sink_port)
        message_file = workdir / "campaign.eml"
        message_file.write_bytes(throughput.campaign(20_000))
        rate, _ = throughput.measure_relay(workdir, sink_port, message_file, count, 16, 2)
        return rate
    finally:
        sink.terminate()
        sink.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="DSNs per run")
    parser.add_argument("--copies", type=int, default=20, help="copies they bounce")
    parser.add_argument("--relay-count", type=int, default=1000, help="messages for the relay")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in ("measure", "storm", "relay"):
            (workdir / name).mkdir()
        accepted_rate, processed_rate = measure(workdir / "measure", args.count, args.copies)
        print(
            f"feedback listener: {accepted_rate:.0f} DSNs/s accepted (each committed before its"
            f" 250), {processed_rate:.0f} DSNs/s accepted and processed",
            flush=True,
        )
        print(storm(workdir / "storm", args.count, args.copies), flush=True)
        rate = relay_throughput(workdir / "relay", args.relay_count)
        print(
            f"relay, same machine: {rate:.0f} msg/s end to end (20 KB campaign, spooled,"
            f" rewritten, signed, delivered: bench/throughput.py's measure);"
            f" DSN intake / relay = {accepted_rate / rate:.2f}"
        )


if __name__ == "__main__":
    main()
