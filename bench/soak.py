"""Soak: the issue 13 bombs against a real relay while ordinary mail flows.

A real relay (`python -m relay serve`, delivery in its own process, click tracking on: the
attribute bomb's cost was in reading a link's attributes) takes 100 ordinary campaign
messages paced at `--rate` per second. In the bomb run the two bombs of issue 13 are
submitted as the ordinary mail starts: a multipart/mixed of six million `--z` boundary lines
(23 MB) and an HTML tag of nine million attributes (18 MB). Each run is made twice, with and
without the bombs, in each of two modes:

- rlimit: the delivery process under a 512 MB RLIMIT_AS (`delivery.memory_limit`);
- oom-killer: no address-space limit; a supervisor here SIGKILLs any relay process whose RSS
  passes 1 GiB, as a container's OOM killer does.

Printed per mode, side by side: the time from the first ordinary message submitted to the
last one delivered (at least 49.5 s at the default pace: the submissions are spread so that
the bombs are worked on while ordinary mail arrives), ordinary mail's latency (acknowledged
to arrival at the downstream: the sharper figure) and their ratios bombs/baseline;
ordinary mail acknowledged but not delivered (must be none); what became of each bomb
(refused at DATA with which reply; held, with the reason; delivered, with or without the
unsubscribe link at its end; bounced with a DSN), how long that took; the peak RSS of the
delivery processes and of the front door (VmHWM, sampled every 50 ms: a process that dies
between two samples may have grown a little further); delivery processes restarted;
supervisor kills.

Run from the repository root (each mode takes a few minutes on 2 busy cores):

    python bench/soak.py                        # both modes, the relay's rewrite limits on
    python bench/soak.py --no-rewrite-limits    # the delivery process's own net alone
    python bench/soak.py --mode rlimit --bomb-scale 0.1
    python bench/soak.py --mode rlimit --slow-clients 300 --replays 10000   # + the HTTP side

`--no-rewrite-limits` raises the rewrite's structural limits (relay.mime.MimeLimits) out of
the way, so the bombs reach the delivery process whole and only its net (address space, CPU
budget per message, holds after two deaths) stands. The relay runs on its defaults except:
`smtp.max_message_size` 40 MiB (the bombs are 30 MB on the wire; the issue's relay accepted
them), `delivery.retry_initial_delay` 10 s (a bomb's second try comes sooner; ordinary mail
is never retried here), click tracking on.

With `--slow-clients N --replays M` the bomb run also has N HTTP clients sending one header
byte every 5 s and M fetches of one genuine pixel URL (bench/hostile_http.py), with /healthz
and the SMTP greeting probed every second meanwhile: the whole soak the issue asks for.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from hostile_http import HttpFigures, count_opens, describe, hostile_http, pixel_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the relay's own Spool, to put the bombs in before a start
SOAK_ID = re.compile(rb"^X-Soak-Id: (\d+)\r?$", re.MULTILINE)
SENDER = "news@shop.example"
BOMB_NAMES = ("boundaries", "attributes")
MODES = ("rlimit", "oom-killer")

# ---------------------------------------------------------------- the mail


def ordinary(number: int) -> EmailMessage:
    """A campaign newsletter, text and HTML, long enough to get an open pixel."""
    message = EmailMessage()
    message["From"] = f"Shop <{SENDER}>"
    message["To"] = f"user{number}@example.org"
    message["Subject"] = f"Spring sale {number}"
    message["X-Soak-Id"] = str(number)
    message["X-Optout-Campaign"] = "soak"
    message.set_content("Our spring sale starts today.\nEverything 20% off.\n")
    paragraphs = "".join(
        f"<p>Item {i}: new arrivals in every size, free shipping over 50 EUR.</p>"
        for i in range(60)
    )
    message.add_alternative(
        '<html><body><h1>Spring sale</h1><p>Everything 20% off. <a href="https://shop.example/'
        f'sale?n={number}">Shop now</a></p>{paragraphs}</body></html>',
        subtype="html",
    )
    return message


def bomb_head(name: str) -> bytes:
    return (
        f"From: Shop <{SENDER}>\nTo: {name}@example.org\nSubject: bomb\n"
        f"Message-ID: <{name}@shop.example>\nMIME-Version: 1.0\n"
    ).encode()


def boundary_bomb(scale: float) -> bytes:
    """23 MB at scale 1: a multipart/mixed whose body is six million delimiter lines."""
    lines = int(6_000_000 * scale)
    return (
        bomb_head("boundaries")
        + b"Content-Type: multipart/mixed; boundary=z\n\n"
        + b"--z\n" * lines
    )


def attribute_bomb(scale: float) -> bytes:
    """18 MB at scale 1: one <a> start tag with nine million attributes (400 a line)."""
    rows = int(9_000_000 * scale) // 400
    return (
        bomb_head("attributes")
        + b"Content-Type: text/html; charset=us-ascii\n\n"
        + b'<html><body><a href="https://shop.example/"'
        + (b" a" * 400 + b"\n") * rows
        + b">x</a></body></html>\n"
    )


# ---------------------------------------------------------------- the downstream MTA


@dataclass
class Arrival:
    rcpts: list[str]
    head: bytes
    tail: bytes


@dataclass
class Downstream:
    """Takes every copy: when each ordinary message arrived; the head and tail of others
    (a bomb's copy, a DSN to the bombs' sender). It runs on a thread of its own (aiosmtpd's
    Controller), so the bombs' bytes arriving never delay the bench's clock or its clients."""

    arrived: dict[int, float] = field(default_factory=dict)
    copies: dict[int, int] = field(default_factory=dict)
    others: list[Arrival] = field(default_factory=list)
    sample: bytes = b""  # the first ordinary copy: its open pixel is replayed
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        now = time.monotonic()
        content = envelope.original_content
        assert isinstance(content, bytes)
        found = SOAK_ID.search(content, 0, 64_000)
        with self.lock:
            if found is None:
                head, tail = content[:64_000], content[-16_000:]
                self.others.append(Arrival(list(envelope.rcpt_tos), head, tail))
            else:
                number = int(found.group(1))
                self.sample = self.sample or content
                self.arrived.setdefault(number, now)
                self.copies[number] = self.copies.get(number, 0) + 1
        return "250 2.0.0 Ok"

    def snapshot(self) -> tuple[dict[int, float], dict[int, int], list[Arrival]]:
        with self.lock:
            return dict(self.arrived), dict(self.copies), list(self.others)


# ---------------------------------------------------------------- the relay's processes


def process_tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += map(int, (task / "children").read_text().split())
    return found


def status_kib(pid: int, name: str) -> int:
    """A figure of /proc/PID/status in KiB (VmRSS: now, VmHWM: its peak); 0 if gone."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1])
    return 0


def holds_file(pid: int, path: Path) -> bool:
    """A delivery process keeps DATA/delivery.lock open for its whole life."""
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == str(path):
                    return True
    return False


class Supervisor(threading.Thread):
    """Samples the relay's processes every 50 ms: the peak RSS of the front door and of
    any delivery process; with `kill_above_kib`, SIGKILLs any relay process over it."""

    def __init__(self, pid: int, delivery_lock: Path, kill_above_kib: int | None) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.delivery_lock = delivery_lock
        self.kill_above_kib = kill_above_kib
        self.front_door_peak_kib = 0
        self.delivery_peak_kib = 0
        self.other_peak_kib = 0
        self.kills: list[str] = []
        self.delivery_pids: set[int] = set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            for pid in process_tree(self.pid):
                self.sample(pid)

    def sample(self, pid: int) -> None:
        peak = status_kib(pid, "VmHWM:")
        if pid == self.pid:
            self.front_door_peak_kib = max(self.front_door_peak_kib, peak)
        elif pid in self.delivery_pids or holds_file(pid, self.delivery_lock):
            self.delivery_pids.add(pid)
            self.delivery_peak_kib = max(self.delivery_peak_kib, peak)
        else:
            self.other_peak_kib = max(self.other_peak_kib, peak)
        rss = status_kib(pid, "VmRSS:")
        if self.kill_above_kib and rss > self.kill_above_kib:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                role = (
                    "front door"
                    if pid == self.pid
                    else "delivery"
                    if pid in self.delivery_pids
                    else "other"
                )
                self.kills.append(f"{role} pid {pid} at {rss / 1024:.0f} MB")


# ---------------------------------------------------------------- one run


@dataclass
class Options:
    mode: str
    bombs: bool
    rate: float
    bomb_scale: float
    memory_limit_mb: int
    kill_above_mb: int
    rewrite_limits: bool
    settle_seconds: float
    slow_clients: int = 0  # with the bombs, for the HTTP side (issue 13 items 2, 3)
    replays: int = 0


@dataclass
class BombFate:
    reply: str
    acked_at: float | None = None
    fate: str = "not settled"
    settled_after: float | None = None  # seconds after its 250


@dataclass
class RunResult:
    options: Options
    submitted: dict[int, float] = field(default_factory=dict)
    acked: dict[int, float] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)
    downstream: Downstream = field(default_factory=Downstream)
    bombs: dict[str, BombFate] = field(default_factory=dict)
    restarts: int = 0
    front_door_peak_kib: int = 0
    delivery_peak_kib: int = 0
    kills: list[str] = field(default_factory=list)
    relay_alive: bool = True
    http: HttpFigures | None = None

    @property
    def arrived(self) -> dict[int, float]:
        return self.downstream.snapshot()[0]

    @property
    def lost(self) -> list[int]:
        return sorted(set(self.acked) - set(self.arrived))

    @property
    def latencies(self) -> list[float]:
        arrived = self.arrived
        return [arrived[n] - self.acked[n] for n in self.acked if n in arrived]

    @property
    def total(self) -> float:
        """First ordinary message submitted to the last one delivered."""
        arrived = self.arrived
        if not self.submitted or self.lost or not arrived:
            return float("nan")
        return max(arrived.values()) - min(self.submitted.values())


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def relay_config(
    options: Options, data: Path, sink_port: int, smtp_port: int, http_port: int
) -> str:
    memory_limit = options.memory_limit_mb * 1024 * 1024 if options.mode == "rlimit" else 0
    unlimited = (
        "[rewrite]\nmax_mime_parts = 1000000000\nmax_mime_depth = 1000000\n"
        "max_html_tokens = 1000000000\nmax_tag_attributes = 1000000000\n"
    )
    text = (
        f'[storage]\ndir = "{data}"\n'
        f'[smtp]\nlisten = "127.0.0.1:{smtp_port}"\nmax_message_size = 41943040\n'
        f'[http]\nlisten = "127.0.0.1:{http_port}"\n'
        f'public_url = "http://127.0.0.1:{http_port}"\n'
        "[tracking]\nclicks = true\n"
        + ("" if options.rewrite_limits else unlimited)
        + f'[delivery]\ndownstream = "smtp://127.0.0.1:{sink_port}"\n'
        f"retry_initial_delay = 10.0\nmemory_limit = {memory_limit}\n"
    )
    return text


def launch(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(config)],
            cwd=config.parent,
            stderr=log,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )


@contextlib.asynccontextmanager
async def running_relay(
    config: Path, smtp_port: int, log_path: Path
) -> AsyncIterator[subprocess.Popen[bytes]]:
    relay = await asyncio.to_thread(launch, config, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", smtp_port), timeout=1).close()
                break
            if time.monotonic() > deadline or relay.poll() is not None:
                raise SystemExit(f"the relay did not start; see {log_path}")
            await asyncio.sleep(0.1)
        yield relay
    finally:
        if relay.poll() is None:
            relay.send_signal(signal.SIGTERM)
        await asyncio.to_thread(relay.wait, 120)


async def send_ordinary(port: int, number: int, result: RunResult) -> None:
    result.submitted[number] = time.monotonic()
    try:
        await aiosmtplib.send(ordinary(number), hostname="127.0.0.1", port=port, timeout=120)
    except aiosmtplib.SMTPException as exc:
        result.refused[number] = str(exc)[:120]
        return
    result.acked[number] = time.monotonic()


async def send_bomb(port: int, name: str, content: bytes, result: RunResult) -> None:
    rcpt = f"{name}@example.org"
    try:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=600) as client:
            _, reply = await client.sendmail(SENDER, [rcpt], content)
    except aiosmtplib.SMTPResponseException as exc:
        result.bombs[name] = BombFate(f"{exc.code} {exc.message[:100]}", fate="refused at DATA")
        return
    except aiosmtplib.SMTPException as exc:
        result.bombs[name] = BombFate(str(exc)[:100], fate="not submitted")
        return
    result.bombs[name] = BombFate(f"250 {reply[:60]}", acked_at=time.monotonic())


async def spool_bombs(data: Path, scale: float, result: RunResult) -> None:
    """The bombs put in the spool as accepted earlier, before serve starts (as
    tests/test_hostile.py does): with the limits raised, the front door's own structural
    check at DATA would work on them whole too, and it is the delivery side's net that is
    measured here."""
    from relay.spool import Spool
    from relay.stores import SPOOL_FILE

    await asyncio.to_thread(data.mkdir, mode=0o700)
    spool = await Spool.open(data / SPOOL_FILE)
    try:
        for name, make in zip(BOMB_NAMES, (boundary_bomb, attribute_bomb), strict=True):
            content = make(scale).replace(b"\n", b"\r\n")
            queue_id = await spool.accept(SENDER, [f"{name}@example.org"], content, "soak")
            fate = BombFate(f"none: spooled as {queue_id} before start", time.monotonic())
            result.bombs[name] = fate
    finally:
        await spool.close()


def spool_rows(data: Path) -> dict[str, tuple[int, str | None]]:
    """recipient -> (crashes, held_reason) of what is still in the spool."""
    uri = f"file:{data / 'spool.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
        rows = db.execute(
            "SELECT d.recipient, m.crashes, m.held_at, m.held_reason FROM messages m"
            " JOIN deliveries d USING (queue_id)"
        ).fetchall()
    return {rcpt: (crashes, reason if held else None) for rcpt, crashes, held, reason in rows}


def bomb_outcome(
    rcpt: str, downstream: Downstream, spool: dict[str, tuple[int, str | None]]
) -> str:
    """What became of a bomb: held (why), delivered (with the footer part or not), bounced;
    "" while it is still waiting."""
    if rcpt in spool:
        held_reason = spool[rcpt][1]
        return f"held: {held_reason}" if held_reason else ""
    for arrival in downstream.snapshot()[2]:
        if rcpt in arrival.rcpts:
            footer = b"/u/" in arrival.tail
            one_click = b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in arrival.head
            return (
                f"delivered, {'with' if footer else 'WITHOUT'} an unsubscribe link at its end,"
                f" {'with' if one_click else 'WITHOUT'} one-click List-Unsubscribe"
            )
        if f"Final-Recipient: rfc822; {rcpt}".encode() in arrival.head + arrival.tail:
            return "bounced: its sender got a DSN"
    return "gone from the spool with no copy or DSN seen yet"


async def settle_bombs(result: RunResult, data: Path, relay: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + result.options.settle_seconds
    while relay.poll() is None:
        spool = await asyncio.to_thread(spool_rows, data)
        waiting = False
        for name, bomb in result.bombs.items():
            if bomb.acked_at is None or bomb.settled_after is not None:
                continue
            outcome = bomb_outcome(f"{name}@example.org", result.downstream, spool)
            if outcome and not outcome.startswith("gone"):
                bomb.fate, bomb.settled_after = outcome, time.monotonic() - bomb.acked_at
            else:
                waiting = True
                crashes = spool.get(f"{name}@example.org", (0, None))[0]
                bomb.fate = outcome or f"still waiting, {crashes} crashes charged"
        if not waiting or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.5)


async def run_once(options: Options, count: int, workdir: Path) -> RunResult:
    result = RunResult(options)
    sink_port, smtp_port, http_port = free_ports(3)
    sink = Controller(
        result.downstream,
        hostname="127.0.0.1",
        port=sink_port,
        server_hostname="sink.test",
        data_size_limit=None,
    )
    sink.start()
    data = workdir / "data"
    text = relay_config(options, data, sink_port, smtp_port, http_port)
    (workdir / "relay.toml").write_text(text)
    log_path = workdir / "relay.log"
    kill_above = options.kill_above_mb * 1024 if options.mode == "oom-killer" else None
    if options.bombs and not options.rewrite_limits:
        await spool_bombs(data, options.bomb_scale, result)
    try:
        async with running_relay(workdir / "relay.toml", smtp_port, log_path) as relay:
            supervisor = Supervisor(relay.pid, data / "delivery.lock", kill_above)
            supervisor.start()
            try:
                await exchange_mail(options, count, (smtp_port, http_port), result, relay)
                await settle_bombs(result, data, relay)
                if result.http is not None:
                    await asyncio.to_thread(count_opens, data, result.http)
            finally:
                supervisor.done.set()
                supervisor.join()
            result.relay_alive = relay.poll() is None
    finally:
        sink.stop()
    result.front_door_peak_kib = supervisor.front_door_peak_kib
    result.delivery_peak_kib = supervisor.delivery_peak_kib
    result.kills = supervisor.kills
    result.restarts = log_path.read_text(errors="replace").count("exited with")
    return result


async def exchange_mail(
    options: Options,
    count: int,
    ports: tuple[int, int],
    result: RunResult,
    relay: subprocess.Popen[bytes],
) -> None:
    """The bombs (in the bomb run, and the HTTP side if asked) and the ordinary mail, paced,
    all at once; then wait until every acknowledged ordinary message has arrived (5 minutes
    at most)."""
    smtp_port = ports[0]
    side = []
    if options.bombs and options.rewrite_limits:
        for name, make in zip(BOMB_NAMES, (boundary_bomb, attribute_bomb), strict=True):
            bomb = make(options.bomb_scale)
            side.append(asyncio.create_task(send_bomb(smtp_port, name, bomb, result)))
    if options.bombs and (options.slow_clients or options.replays):
        window = count / options.rate
        side.append(asyncio.create_task(http_side(options, ports, window, result)))
    sends = []
    start = time.monotonic()
    for number in range(count):
        sends.append(asyncio.create_task(send_ordinary(smtp_port, number, result)))
        await asyncio.sleep(max(0.0, start + (number + 1) / options.rate - time.monotonic()))
    await asyncio.gather(*sends, *side)
    give_up = time.monotonic() + 300
    while time.monotonic() < give_up:
        if not result.lost or relay.poll() is not None:
            return
        await asyncio.sleep(0.2)


async def http_side(
    options: Options, ports: tuple[int, int], window: float, result: RunResult
) -> None:
    """Once the first ordinary copy is in (its pixel is the one replayed), slow clients and
    the replay flood for the rest of the ordinary mail's window (at least 40 s: past the
    relay's 30 s for a request's headers)."""
    started = time.monotonic()
    while time.monotonic() < started + 30:
        if result.downstream.sample:
            break
        await asyncio.sleep(0.2)
    url = pixel_url(result.downstream.sample)
    seconds = max(40.0, window - (time.monotonic() - started))
    smtp_port, http_port = ports
    result.http = await hostile_http(
        http_port, smtp_port, url, options.slow_clients, options.replays, seconds
    )


# ---------------------------------------------------------------- the report


def latency_line(values: list[float]) -> str:
    if not values:
        return "none delivered"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return f"median {statistics.median(ordered):.2f} s, p95 {p95:.2f} s, max {ordered[-1]:.2f} s"


def ratio(bombs: float, baseline: float) -> str:
    return f"{bombs / baseline:.2f}x" if baseline > 0 else "n/a"


def report(baseline: RunResult, bombs: RunResult) -> None:
    options = bombs.options
    mode = (
        f"delivery process under a {options.memory_limit_mb} MB RLIMIT_AS"
        if options.mode == "rlimit"
        else f"no RLIMIT_AS; a supervisor SIGKILLs any relay process over {options.kill_above_mb}"
        " MB RSS"
    )
    limits = "on" if options.rewrite_limits else "raised out of the way"
    print(f"\n== {options.mode}: {mode}; rewrite limits {limits}")
    for label, run in (("without bombs", baseline), ("with bombs   ", bombs)):
        print(
            f"  {label}: {len(run.submitted)} ordinary submitted, {len(run.acked)} acknowledged,"
            f" {len(run.arrived)} delivered, lost {run.lost or 'none'},"
            f" duplicates {sum(c - 1 for c in run.downstream.snapshot()[1].values())};"
            f" all in {run.total:.1f} s; latency {latency_line(run.latencies)}"
        )
    base, hit = baseline.latencies or [0.0], bombs.latencies or [0.0]
    print(
        f"  ratio with/without bombs: total {ratio(bombs.total, baseline.total)},"
        f" median latency {ratio(statistics.median(hit), statistics.median(base))},"
        f" max latency {ratio(max(hit), max(base))}"
    )
    for name, bomb in bombs.bombs.items():
        after = ""
        if bomb.settled_after is not None:
            after = f" ({bomb.settled_after:.0f} s after it was accepted)"
        print(f"  bomb {name}: SMTP {bomb.reply}; {bomb.fate}{after}")
    for label, run in (("without bombs", baseline), ("with bombs   ", bombs)):
        print(
            f"  {label}: peak RSS delivery process {run.delivery_peak_kib / 1024:.0f} MB,"
            f" front door {run.front_door_peak_kib / 1024:.0f} MB;"
            f" delivery restarts {run.restarts}; supervisor kills {len(run.kills)}"
            f" {run.kills or ''}{'' if run.relay_alive else '; THE RELAY DIED'}"
        )
    for line in describe(bombs.http) if bombs.http is not None else []:
        print(f"  {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, action="append", help="default: both")
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--rate", type=float, default=2.0, help="ordinary messages per second")
    parser.add_argument("--bomb-scale", type=float, default=1.0)
    parser.add_argument("--memory-limit-mb", type=int, default=512)
    parser.add_argument("--kill-above-mb", type=int, default=1024)
    parser.add_argument("--settle-seconds", type=float, default=300.0)
    parser.add_argument("--no-rewrite-limits", action="store_true")
    parser.add_argument("--slow-clients", type=int, default=0, help="in the bomb run")
    parser.add_argument("--replays", type=int, default=0, help="pixel fetches, in the bomb run")
    args = parser.parse_args()
    print(
        f"soak: {args.messages} ordinary messages at {args.rate:g}/s; bombs at scale"
        f" {args.bomb_scale:g}; {os.cpu_count()} cores"
    )
    for mode in args.mode or MODES:
        runs = []
        for with_bombs in (False, True):
            options = Options(
                mode=mode,
                bombs=with_bombs,
                rate=args.rate,
                bomb_scale=args.bomb_scale,
                memory_limit_mb=args.memory_limit_mb,
                kill_above_mb=args.kill_above_mb,
                rewrite_limits=not args.no_rewrite_limits,
                settle_seconds=args.settle_seconds,
                slow_clients=args.slow_clients,
                replays=args.replays,
            )
            with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
                runs.append(asyncio.run(run_once(options, args.messages, Path(tmp))))
        report(*runs)


if __name__ == "__main__":
    main()
