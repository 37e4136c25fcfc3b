"""How many messages the spool ever acknowledged, kept outside SQLite's WAL.

SQLite trusts its WAL up to the first frame whose checksum fails and silently drops the
rest: one damaged byte after a crash, and acknowledged mail is gone without a word. The
spool counts accepted messages in a table and, after each commit that accepted any, writes
the count to this small file (fsynced, before the 250 is sent). At start, a file ahead of
the table means committed transactions were lost; the relay says how many.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger("optout.spool")

MARK_FILE = "spool.accepted"
_WIDTH = 20  # digits: the file is rewritten in place, never grows or shrinks


class AcceptedMark:
    """The file; its methods do file I/O (call them in a thread, or at start)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._written = -1
        self._failed = False

    def read(self) -> int | None:
        """The count in the file; None when there is no file yet. ValueError if the file
        holds no count."""
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return None
        value = text.strip()
        if not value.isdigit():
            raise ValueError(f"{self.path} does not hold a count: {text[:40]!r}")
        return int(value)

    def advance(self, value: int) -> None:
        """Make the file say at least `value`, durably. Two processes may accept (the SMTP
        one, and a delivery one that writes reports): the lock keeps the file's count from
        going back. Never raises: a mark that cannot be written only weakens the check."""
        if value <= self._written:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self._report(exc)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            current = os.pread(fd, _WIDTH + 1, 0).strip()
            if not current.isdigit() or int(current) < value:
                os.pwrite(fd, f"{value:0{_WIDTH}d}\n".encode(), 0)
                os.fdatasync(fd)
            self._written = value
            self._failed = False
        except OSError as exc:
            self._report(exc)
        finally:
            os.close(fd)  # closing releases the lock

    def reset(self, value: int) -> None:
        """Write `value` even if the file says more (after a loss was reported)."""
        with contextlib.suppress(OSError):
            self.path.unlink()
        self._written = -1
        self.advance(value)

    def _report(self, exc: OSError) -> None:
        if not self._failed:
            self._failed = True
            log.error("cannot write %s (lost mail would go unnoticed): %s", self.path, exc)
