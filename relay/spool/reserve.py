"""Room kept so the spool can always drain: a file of reserved space next to spool.db.

Taking a delivered message out of the spool is a write too (SQLite appends the change to
its WAL), so on a full disk delivered mail would stay and be sent again. While the reserve
exists, new mail fills the disk up to it and no further; when a write that drains the spool
finds the disk full, the reserve is given up and the write tried again. New mail is then
refused (451) until there is room to put the reserve back. Processes share it through the
file: any of them may give it up or put it back.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import threading
import time
from pathlib import Path

from suppression import fsync_directory

log = logging.getLogger("optout.spool")

RESERVE_FILE = "spool.reserve"
# A missing reserve is tried again at most this often (each try asks the filesystem).
RESTORE_EVERY = 1.0
_CHUNK = 1024 * 1024


class DiskReserve:
    """`size` bytes held in `path`. Every method does file I/O: call them in a thread."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self._lock = threading.Lock()
        self._next_try = 0.0
        self._said_missing = False

    def ensure(self) -> bool:
        """Whether the reserve is in place, putting it back first if it is missing and the
        filesystem has room for it twice over (so it does not fill the disk at once)."""
        if self.size <= 0 or self.path.exists():
            return True
        with self._lock:
            now = time.monotonic()
            if now < self._next_try:
                return False
            self._next_try = now + RESTORE_EVERY
            if self.path.exists():
                return True
            if not self._room_for(2 * self.size) or not self._create():
                if not self._said_missing:
                    self._said_missing = True
                    log.error(
                        "disk full under %s: the %d-byte reserve is gone; new mail is"
                        " refused (451) until there is room for it again",
                        self.path.parent,
                        self.size,
                    )
                return False
            if self._said_missing:
                log.warning("room again under %s: reserve restored, taking mail", self.path.parent)
            self._said_missing = False
            return True

    def release(self) -> bool:
        """Give the space back to the filesystem; whether there was any to give."""
        with self._lock:
            try:
                self.path.unlink()
            except FileNotFoundError:
                return False
            except OSError as exc:
                log.error("cannot release the spool's disk reserve %s: %s", self.path, exc)
                return False
            self._said_missing = True
            self._next_try = time.monotonic() + RESTORE_EVERY
        log.error(
            "disk full under %s: released the %d-byte reserve so that delivered mail can"
            " leave the spool; new mail is refused (451) until there is room again",
            self.path.parent,
            self.size,
        )
        return True

    def _room_for(self, size: int) -> bool:
        try:
            stat = os.statvfs(self.path.parent)
        except OSError:
            return False
        return stat.f_bavail * stat.f_frsize >= size

    def _create(self) -> bool:
        temporary = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError:
            return False
        try:
            try:
                os.posix_fallocate(fd, 0, self.size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                # No fallocate here: real zeros take real blocks all the same.
                block = bytes(_CHUNK)
                for offset in range(0, self.size, _CHUNK):
                    os.pwrite(fd, block[: min(_CHUNK, self.size - offset)], offset)
            os.fsync(fd)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                temporary.unlink()
            return False
        os.close(fd)
        os.replace(temporary, self.path)
        with contextlib.suppress(OSError):
            fsync_directory(self.path.parent)
        return True
