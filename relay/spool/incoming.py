"""Messages too big to hold in memory, on their way into the spool: files in `incoming/`."""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

log = logging.getLogger("optout.spool")
T = TypeVar("T")

# Messages too big to hold in memory arrive into files here (next to the spool's database)
# and are copied into the spool; a file left here was never acknowledged.
INCOMING = "incoming"
# The piece of a spilled file copied into its blob at a time, in the writer thread.
COPY_CHUNK = 64 * 1024


class SpillFile:
    """A message on its way into the spool in a file of `incoming/` (mode 0600), because it
    is too big to hold in memory. Every method does file I/O: call them in a thread.

    The file stays open until `discard` and is read through that descriptor, so even a
    sweep of `incoming/` (a receiving `Spool.open`) could remove the name only, never data
    still on its way. The lock orders writes, the copy into the spool and
    `discard` from different threads: a descriptor is never used once closed (and reused).
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / f"{secrets.token_hex(8)}.msg"
        self.size = 0
        self._fd: int | None = None
        self._discarded = False
        self._lock = threading.Lock()

    def write(self, chunks: Sequence[bytes | bytearray]) -> None:
        """Append `chunks`; the first call creates the file. Raises OSError."""
        with self._lock:
            if self._discarded:
                raise OSError(f"{self.path} was discarded")
            if self._fd is None:
                self.path.parent.mkdir(mode=0o700, exist_ok=True)
                flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                self._fd = os.open(self.path, flags, 0o600)
            total = sum(len(chunk) for chunk in chunks)
            written = os.writev(self._fd, chunks) if chunks else 0
            if written < total:  # a short write (signal, nearly full disk): finish plainly
                rest = memoryview(b"".join(chunks))[written:]
                while rest:
                    rest = rest[os.write(self._fd, rest) :]
            self.size += total

    def read_start(self, limit: int) -> bytes:
        """Up to `limit` octets from the start of the message."""
        with self._lock:
            return self._read(0, min(limit, self.size))

    def copy_to(self, write: Callable[[bytes], object]) -> None:
        """Pass the whole message to `write` in pieces of COPY_CHUNK octets."""
        with self._lock:
            offset = 0
            while offset < self.size:
                piece = self._read(offset, min(COPY_CHUNK, self.size - offset))
                write(piece)
                offset += len(piece)

    def _read(self, offset: int, count: int) -> bytes:
        if count and (self._fd is None or self._discarded):
            raise OSError(f"{self.path} is gone")
        pieces = []
        while count:
            assert self._fd is not None
            piece = os.pread(self._fd, count, offset)
            if not piece:
                raise OSError(f"{self.path} is shorter than what was written to it")
            pieces.append(piece)
            offset += len(piece)
            count -= len(piece)
        return b"".join(pieces)

    def inspect(self, check: Callable[[bytes | mmap.mmap], T]) -> T:
        """`check` run on the whole message, mapped read-only from the file: a look at its
        structure costs page cache, not a copy in memory."""
        with self._lock:
            if self._fd is None or self._discarded:
                if self.size:
                    raise OSError(f"{self.path} is gone")
                return check(b"")
            with mmap.mmap(self._fd, self.size, prot=mmap.PROT_READ) as mapped:
                return check(mapped)

    def discard(self) -> None:
        """Close and remove the file (again: nothing); never raises."""
        with self._lock:
            if self._discarded:
                return
            self._discarded = True
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None
                with contextlib.suppress(OSError):
                    self.path.unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class Spilled:
    """A received message that lives in a file: its first octets (for header checks),
    the file holding all of it, and its size."""

    head: bytes
    file: SpillFile
    size: int


def sweep_incoming(directory: Path) -> int:
    """Remove the files left in `incoming/` by a process that stopped while receiving;
    how many. Never acknowledged with 250, they are the sender's to send again."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("cannot clean %s: %s", directory, exc)
        return 0
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
        except OSError as exc:
            log.warning("cannot remove %s: %s", entry.path, exc)
    return removed
