"""Data holders outside the suppression database: the spool and the outbox folder.

They are described by what they do (a Protocol for the spool, a folder for the outbox), so
this package stays free of imports from `relay`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Protocol

from .addresses import digest_texts
from .database import fsync_directory
from .subject import DataHolder, Subject


class SpoolLike(Protocol):
    async def for_recipient(self, address: str) -> list[dict[str, object]]: ...

    async def erase_recipient(self, address: str) -> int: ...


def spellings(subject: Subject) -> list[str]:
    """How the subject may have been written as an envelope recipient (compared caselessly)."""
    texts = [
        subject.address.strip().strip("<>"),
        subject.normalized,
        *digest_texts(subject.address),
    ]
    return list(dict.fromkeys(text.lower() for text in texts))


def spool_holder(spool: SpoolLike, path: Path) -> DataHolder:
    async def export(subject: Subject) -> list[dict[str, object]]:
        found: list[dict[str, object]] = []
        for spelling in spellings(subject):
            found.extend(await spool.for_recipient(spelling))
        return found

    async def erase(subject: Subject) -> int:
        removed = 0
        for spelling in spellings(subject):
            removed += await spool.erase_recipient(spelling)
        # Bodies of mail delivered earlier sit in pages the spool freed without zeroing them;
        # rebuilding the file leaves no copy behind (the spool holds only pending mail).
        await asyncio.to_thread(compact, path)
        return removed

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
        needles = [spelling.encode("utf-8") for spelling in spellings(subject)]
        found = []
        for path in sorted(directory.iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            try:
                content = path.read_bytes().lower()
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

    return DataHolder("outbox", export, erase)
