"""Data holders outside the suppression database: the spool and the outbox folder.

They are described by what they do (a Protocol for the spool, a folder for the outbox), so
this package stays free of imports from `relay`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from .database import fsync_directory
from .headers import without_recipient
from .subject import DataHolder, Subject, caseless

# Given the first bytes of a message: the length of its header section and that section
# rewritten, or None to leave the message as it is.
Redact = Callable[[bytes], tuple[int, bytes] | None]


class SpoolLike(Protocol):
    async def for_recipient(self, matches: Callable[[str], bool]) -> list[dict[str, object]]: ...

    async def erase_recipient(
        self, matches: Callable[[str], bool], redact: Redact
    ) -> tuple[int, int]: ...


CANCELLED = "waiting deliveries cancelled"
REWRITTEN = "waiting messages with the address taken out of To/Cc"


def spool_holder(spool: SpoolLike, path: Path) -> DataHolder:
    """Mail waiting for delivery: deliveries to the subject are cancelled (they are
    suppressed from now on), and messages still waiting for others lose the subject's
    mailbox from their recipient fields (see `suppression.headers`)."""

    async def export(subject: Subject) -> list[dict[str, object]]:
        return await spool.for_recipient(subject.matches)

    async def erase(subject: Subject) -> dict[str, int]:
        cancelled, rewritten = await spool.erase_recipient(
            subject.matches, functools.partial(without_recipient, matches=subject.matches)
        )
        # Bodies of mail delivered earlier sit in pages the spool freed without zeroing them;
        # rebuilding the file leaves no copy behind (the spool holds only pending mail).
        await asyncio.to_thread(compact, path)
        return {CANCELLED: cancelled, REWRITTEN: rewritten}

    return DataHolder("spool", export, erase)


def compact(path: Path) -> bool:
    """VACUUM an SQLite file and truncate its WAL; False if a reader kept the WAL alive."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute("VACUUM")
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        return not busy
    finally:
        conn.close()


def outbox_holder(directory: Path) -> DataHolder:
    """Mail delivered into the outbox folder (no downstream MTA) that mentions the subject."""

    def mentioning(subject: Subject) -> list[Path]:
        if not directory.is_dir():
            return []
        needles = subject.spellings()
        found = []
        for path in sorted(directory.iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            try:
                content = caseless(path.read_bytes().decode("utf-8", "surrogateescape"))
            except OSError:
                continue
            if any(needle in content for needle in needles):
                found.append(path)
        return found

    async def export(subject: Subject) -> list[str]:
        return [path.name for path in await asyncio.to_thread(mentioning, subject)]

    async def erase(subject: Subject) -> int:
        def delete() -> int:
            paths = mentioning(subject)
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            if paths:
                fsync_directory(directory)
            return len(paths)

        return await asyncio.to_thread(delete)

    return DataHolder("outbox", export, erase, effect="files deleted")
