"""`optout-relay serve` as a process: start, take mail, write the outbox, stop cleanly."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.cores import usable_cores
from relay.dkim import generate_key
from tests.helpers import ROOT, free_ports, newsletter, submit, wait_until_listening


def poll(condition: object, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def start_serve(
    cwd: Path, *, http: str = "", extra: str = "", log_format: str = "text"
) -> tuple[subprocess.Popen[bytes], int, int]:
    """`serve` in a process group of its own (as a service manager runs it), logging to
    cwd/serve.log, once it takes mail; and its SMTP and HTTP ports. `http`: more lines of
    its [http] table; `extra`: more tables."""
    smtp_port, http_port = free_ports(2)
    config = cwd / "relay.toml"
    config.write_text(
        f'[smtp]\nlisten = "127.0.0.1:{smtp_port}"\n'
        f'[http]\nlisten = "127.0.0.1:{http_port}"\n{http}{extra}'
    )
    command = [sys.executable, "-m", "relay", "serve", "--config", str(config)]
    with open(cwd / "serve.log", "wb") as log:
        process = subprocess.Popen(
            [*command, "--log-format", log_format],
            cwd=cwd,
            stderr=log,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            start_new_session=True,
        )
    try:
        wait_until_listening(smtp_port, process)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process, smtp_port, http_port


@pytest.fixture
def served(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[subprocess.Popen[bytes], int, int, Path]]:
    process, smtp_port, http_port = start_serve(
        tmp_path, log_format=getattr(request, "param", "text")
    )
    try:
        yield process, smtp_port, http_port, tmp_path
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_serve_delivers_to_the_outbox_and_stops_on_sigterm(
    served: tuple[subprocess.Popen[bytes], int, int, Path],
) -> None:
    process, smtp_port, http_port, cwd = served
    result = submit(
        smtp_port, newsletter(["judy@example.org"]), "news@shop.example", ["judy@example.org"]
    )
    assert result.refused == {}
    outbox = cwd / "optout-data" / "outbox"
    poll(lambda: len(list(outbox.glob("*.eml"))) == 1)
    content = next(outbox.glob("*.eml")).read_bytes()
    assert f"List-Unsubscribe: <http://127.0.0.1:{http_port}/u/".encode() in content

    for key in ("signing.key", "address-hash.key"):
        mode = stat.S_IMODE((cwd / "optout-data" / key).stat().st_mode)
        assert mode == 0o600, key

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    log = (cwd / "serve.log").read_text()
    assert "(queued)" in log
    assert "status=delivered" in log
    assert log.rstrip().endswith("info: stopped")
    assert "Traceback" not in log
    assert "optout-relay/serve[" in log and "]: info: retention: purged nothing\n" in log


def test_a_stop_sent_to_every_process_at_once_is_a_clean_stop(
    served: tuple[subprocess.Popen[bytes], int, int, Path],
) -> None:
    """systemd stops a service by signalling all its processes: the children's exits are
    then part of the stop, not failures to restart."""
    process, _, _, cwd = served
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    log = (cwd / "serve.log").read_text()
    assert "restarting" not in log
    assert log.rstrip().endswith("info: stopped")


@pytest.mark.parametrize("served", ["json"], indirect=True)
def test_json_logs_carry_the_queue_id(
    served: tuple[subprocess.Popen[bytes], int, int, Path],
) -> None:
    process, smtp_port, _, cwd = served
    submit(smtp_port, newsletter(["kim@example.org"]), "news@shop.example", ["kim@example.org"])
    poll(lambda: len(list((cwd / "optout-data" / "outbox").glob("*.eml"))) == 1)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    lines = [json.loads(line) for line in (cwd / "serve.log").read_text().splitlines()]
    queued = next(line for line in lines if line["message"].endswith("(queued)"))
    delivered = next(line for line in lines if line.get("status") == "delivered")
    assert queued["queue_id"] == delivered["queue_id"]
    assert delivered["to"] == "kim@example.org"
    assert queued["component"] == "smtp"
    # The hourly purge, at start: a readable message, its counts as fields.
    purged = next(line for line in lines if line["message"].startswith("retention: "))
    assert purged["message"] == "retention: purged nothing"
    assert purged["events_purged"]["open"] == 0 and purged["contacts_purged"] == 0


@pytest.mark.parametrize("served", ["json"], indirect=True)
def test_a_rewrite_failure_is_a_json_log_line_with_its_queue_id(
    served: tuple[subprocess.Popen[bytes], int, int, Path],
) -> None:
    process, smtp_port, _, cwd = served
    broken = (
        b"From: news@shop.example\r\nTo: lee@example.org\r\nSubject: broken\r\n"
        b"Content-Type: multipart/mixed; boundary=nothere\r\n\r\nno delimiter at all\r\n"
    )
    submit(smtp_port, broken, "news@shop.example", ["lee@example.org"])
    poll(lambda: len(list((cwd / "optout-data" / "outbox").glob("*.eml"))) == 1)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    lines = [json.loads(line) for line in (cwd / "serve.log").read_text().splitlines()]
    [failure] = [line for line in lines if line["message"].startswith("rewrite failed")]
    assert failure["component"] == "rewrite" and failure["level"] == "warning"
    assert "no delimiter" in failure["message"]
    queued = next(line for line in lines if line["message"].endswith("(queued)"))
    assert failure["queue_id"] == queued["queue_id"]


def test_mail_is_taken_once_every_http_process_is_up(tmp_path: Path) -> None:
    """A first burst of mail must not find the HTTP workers still loading: the SMTP port
    opens only after they answer."""
    process, _, _ = start_serve(tmp_path, http="processes = 2\n")
    try:
        log = (tmp_path / "serve.log").read_text()
        assert "http: 2 processes answer on the listen address" in log
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        children = [int(c) for task in tasks for c in (task / "children").read_text().split()]
    except OSError:
        return found  # gone meanwhile
    for child in children:
        found |= {child, *_descendants(child)}
    return found


def _helpers(pid: int) -> set[int]:
    """The DKIM signing helpers among the relay's processes."""
    found = set()
    for process in _descendants(pid):
        try:
            if b"relay.dkim.helper" in Path(f"/proc/{process}/cmdline").read_bytes():
                found.add(process)
        except OSError:
            continue  # gone meanwhile
    return found


def _alive(pids: set[int]) -> set[int]:
    """Those still running: a zombie has ended (its reaper may be slow: a container's init)."""
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


@pytest.mark.skipif(usable_cores() < 2, reason="the DKIM signing helper needs two cores")
def test_the_dkim_helper_goes_with_the_relay_on_a_stop_sent_to_every_process(
    tmp_path: Path,
) -> None:
    key_file, _ = generate_key("shop.example", "s1", tmp_path / "dkim")
    process, _, _ = start_serve(
        tmp_path,
        extra=f'[[dkim.keys]]\ndomain = "shop.example"\nselector = "s1"\nkey_file = "{key_file}"\n',
    )
    try:
        poll(lambda: _helpers(process.pid))
        helpers = _helpers(process.pid)
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        poll(lambda: not _alive(helpers))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = (tmp_path / "serve.log").read_text()
    assert "helper lost" not in text
    assert text.rstrip().endswith("info: stopped")
