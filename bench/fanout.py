"""Fan-out: one message to many recipients, parsed once and personalised per recipient.

One SMTP transaction carries the campaign to 1,000 recipients; optout-relay delivers 1,000
personalised copies (each its own unsubscribe link and pixel), each DKIM-signed with the
RSA-2048 key configured for the sender's domain, to Postfix's smtp-sink. Copies per second
(submission to an empty spool) are compared with the plain aiosmtpd pass-through relay's
messages per second for single-recipient mail of the same size through smtp-source (as in
bench/throughput.py), the two taking turns for several rounds; medians. CPU time per copy
and per pass-through message comes from /proc.

Then memory: 10,000 recipients of a 100 KB message, in transactions of smtp.max_recipients
(1,000), while the PSS of all the relay's processes together is sampled (peak reported).
Only then: reading every process's page tables 50 times a second takes about 30% of a core,
which on a small machine would be taken from the relay's rate. The timed rounds report the
kernel's own peak RSS of each process instead, free to read.

optout-relay runs on its defaults (delivery.processes, workers). Needs Debian's postfix
package (smtp-source, smtp-sink). Run from the repository root:

    python bench/fanout.py                         # 1,000 recipients of 20 KB, 3 rounds
    python bench/fanout.py --recipients 2000 --rounds 5 --skip-memory
"""

from __future__ import annotations

import argparse
import os
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from throughput import (  # type: ignore[import-not-found]  # bench/ is no package
    SESSIONS,
    PssSampler,
    campaign,
    cpu_seconds,
    describe_rss,
    free_port,
    measure_passthrough,
    spool_empty,
    start_relay,
    tree,
    tree_peak_rss_mb,
    wait_listening,
)

from relay.dkim import generate_key

DOMAIN = "shop.example"
SELECTOR = "bench"
MAX_RECIPIENTS = 1000  # smtp.max_recipients, the relay's default


def dkim_config(key_dir: Path) -> str:
    path = key_dir / f"{DOMAIN}.{SELECTOR}.pem"
    if not path.exists():
        generate_key(DOMAIN, SELECTOR, key_dir)
    return f'[[dkim.keys]]\ndomain = "{DOMAIN}"\nselector = "{SELECTOR}"\nkey_file = "{path}"\n'


def submit(port: int, message: bytes, recipients: list[str]) -> None:
    """In transactions of at most MAX_RECIPIENTS recipients, over one connection."""
    with smtplib.SMTP("127.0.0.1", port, timeout=300) as client:
        for start in range(0, len(recipients), MAX_RECIPIENTS):
            refused = client.sendmail(
                "news@shop.example", recipients[start : start + MAX_RECIPIENTS], message
            )
            if refused:
                raise SystemExit(f"recipients refused: {len(refused)}")


def recipients(count: int) -> list[str]:
    return [f"reader{i:06d}@example.org" for i in range(count)]


def measure_fanout(
    workdir: Path, sink_port: int, key_dir: Path, message: bytes, count: int, sample_pss: bool
) -> tuple[float, float, float, list[float]]:
    """(copies per second, CPU seconds per copy, peak PSS in MB of all relay processes
    together if `sample_pss`, else 0, and the peak RSS of each)."""
    process, port = start_relay(workdir, sink_port, extra=dkim_config(key_dir))
    sampler = PssSampler(process.pid)
    if sample_pss:
        sampler.start()
    try:
        pids = tree(process.pid)
        cpu = cpu_seconds(pids)
        started = time.perf_counter()
        submit(port, message, recipients(count))
        while not spool_empty(workdir / "data"):
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        used = cpu_seconds(pids) - cpu
        return count / elapsed, used / count, sampler.peak, tree_peak_rss_mb(process.pid)
    finally:
        sampler.done.set()
        if sample_pss:
            sampler.join()
        process.terminate()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=1000, help="of the one message")
    parser.add_argument("--size", type=int, default=20_000, help="bytes of the campaign")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--passthrough-count", type=int, default=1000, help="single-recipient messages"
    )
    parser.add_argument("--memory-recipients", type=int, default=10_000)
    parser.add_argument("--memory-size", type=int, default=100_000)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    if not (shutil.which("smtp-source") and shutil.which("smtp-sink")):
        sys.exit("needs smtp-source and smtp-sink (Debian package postfix)")
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        workdir = Path(tmp)
        key_dir = workdir / "keys"
        sink_port = free_port()
        user = ["-u", "postfix"] if os.geteuid() == 0 else []
        sink = subprocess.Popen(["smtp-sink", *user, f"127.0.0.1:{sink_port}", "1024"])
        try:
            wait_listening(sink_port)
            message = campaign(args.size)
            message_file = workdir / "campaign.eml"
            message_file.write_bytes(message)
            baselines, ours, base_cpu, our_cpu, rss = [], [], [], [], []
            for round_ in range(args.rounds):
                rate, cpu = measure_passthrough(
                    sink_port, message_file, args.passthrough_count, SESSIONS
                )
                baselines.append(rate)
                base_cpu.append(cpu)
                run_dir = workdir / f"relay-{round_}"
                run_dir.mkdir()
                copies, used, _, peaks = measure_fanout(
                    run_dir, sink_port, key_dir, message, args.recipients, sample_pss=False
                )
                ours.append(copies)
                our_cpu.append(used)
                rss.append(peaks)
                print(
                    f"round {round_ + 1}: pass-through {rate:5.0f} msg/s"
                    f" ({cpu * 1000:.2f} ms CPU/msg), optout-relay {copies:5.0f} copies/s"
                    f" ({used * 1000:.2f} ms CPU/copy)",
                    flush=True,
                )
            baseline, rate = statistics.median(baselines), statistics.median(ours)
            print(
                f"{args.size // 1000} KB to {args.recipients} recipients in one transaction,"
                f" DKIM-signed: optout-relay {rate:.0f} copies/s against the pass-through's"
                f" {baseline:.0f} single-recipient msg/s: ratio {rate / baseline:.2f}"
                f" (target 3.00); CPU {statistics.median(our_cpu) * 1000:.2f} ms per copy,"
                f" {statistics.median(base_cpu) * 1000:.2f} ms per pass-through message;"
                f" peak RSS {describe_rss(max(rss, key=sum))}",
                flush=True,
            )
            if not args.skip_memory:
                memory_dir = workdir / "memory"
                memory_dir.mkdir()
                big = campaign(args.memory_size)
                copies, used, peak, _ = measure_fanout(
                    memory_dir, sink_port, key_dir, big, args.memory_recipients, sample_pss=True
                )
                print(
                    f"{args.memory_size // 1000} KB to {args.memory_recipients} recipients"
                    f" ({-(-args.memory_recipients // MAX_RECIPIENTS)} transactions):"
                    f" {copies:.0f} copies/s, {used * 1000:.2f} ms CPU/copy,"
                    f" peak PSS of all processes together {peak:.0f} MB"
                )
        finally:
            sink.terminate()
            sink.wait()


if __name__ == "__main__":
    main()
