"""What one process of the relay tells the others (and the CLI) through small files in the
data dir: that delivery is paused because the next hop does not answer, that the spool
file is damaged. Every function does file I/O: call them in a thread from async code."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

PAUSED_GLOB = "delivery-*.paused"
DAMAGED_FILE = "spool.damaged"


def paused_file(data_dir: Path, index: int) -> Path:
    return data_dir / f"delivery-{index}.paused"


def marker_file(data_dir: Path, index: int) -> Path:
    """Where delivery process `index` names the messages it is working on."""
    return data_dir / f"delivery-{index}.working"


def _write(path: Path, text: str) -> None:
    """Replace `path` (mode 0600) by a file holding `text`; never half-written."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(temporary, path)


@dataclass(frozen=True, slots=True)
class Pause:
    until: float
    reason: str


def write_pause(path: Path, pause: Pause | None) -> None:
    """Say that delivery waits until `pause.until` (None: it does not wait)."""
    with contextlib.suppress(OSError):
        if pause is None:
            path.unlink(missing_ok=True)
        else:
            _write(path, json.dumps({"until": pause.until, "reason": pause.reason}))


def current_pause(data_dir: Path, now: float | None = None) -> Pause | None:
    """The longest pause any delivery process is in now, or None."""
    moment = time.time() if now is None else now
    pauses = []
    for path in data_dir.glob(PAUSED_GLOB):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            pause = Pause(float(data["until"]), str(data["reason"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if pause.until > moment:
            pauses.append(pause)
    return max(pauses, key=lambda p: p.until, default=None)


def report_damage(data_dir: Path, problem: str) -> None:
    with contextlib.suppress(OSError):
        _write(data_dir / DAMAGED_FILE, problem + "\n")


def clear_damage(data_dir: Path) -> None:
    with contextlib.suppress(OSError):
        (data_dir / DAMAGED_FILE).unlink(missing_ok=True)


def reported_damage(data_dir: Path) -> str | None:
    try:
        return (data_dir / DAMAGED_FILE).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


SERVE_LOCK = "serve.lock"
DELIVERY_LOCK = "delivery.lock"


class DataDirInUse(ConfigError):
    """Another `serve` runs on this data dir (the CLI says so in one line, exit 2)."""

    def __init__(self, data_dir: Path, pid: str) -> None:
        super().__init__(
            "storage.dir",
            f"{data_dir} is in use by another optout-relay serve (pid {pid or 'unknown'});"
            " stop it first",
        )
        self.pid = pid


class DirLock:
    """An flock on a file of the data dir, held as long as the descriptor is open (never
    inherited: close-on-exec, and delivery processes are spawned, not forked)."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def serve(cls, data_dir: Path) -> DirLock:
        """The one `serve` of a data dir, its pid written in the file for the next one to
        name. DataDirInUse at once if another holds it."""
        fd = _open_lock(data_dir / SERVE_LOCK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise DataDirInUse(data_dir, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd)

    @classmethod
    def delivery(cls, data_dir: Path, *, exclusive: bool, within: float = 0.0) -> DirLock | None:
        """Shared by the delivery processes of a serve; taken exclusively by a starting
        serve to wait (up to `within` seconds) until those of a previous one have ended,
        so two never send the same message. None when the wait ran out."""
        fd = _open_lock(data_dir / DELIVERY_LOCK)
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + within
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return cls(fd)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return None
                time.sleep(0.05)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _open_lock(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError("storage.dir", f"cannot open {path}: {exc.strerror}") from None
