"""SQLite under asyncio: one writer thread with group commit, one reader thread.

Every write is a function run on the writer thread. Writes queued while a commit is in
progress are run together in the next transaction and share its fsync (group commit), each
inside its own savepoint so one failing write never undoes the others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

T = TypeVar("T")

MAX_BATCH = 256
CACHE_KIB = 65536


@dataclass(frozen=True, slots=True)
class Migration:
    """A named, one-time schema change; names are recorded in the `migrations` table."""

    name: str
    apply: Callable[[sqlite_utils.Database], None]


@dataclass(slots=True)
class _Job:
    fn: Callable[[sqlite_utils.Database], Any]
    future: concurrent.futures.Future[Any]
    # Maintenance (checkpoint, VACUUM) cannot run inside a transaction: it gets a turn alone.
    in_transaction: bool = True


_STOP = object()


def _connect(path: Path, cache_kib: int = CACHE_KIB) -> sqlite_utils.Database:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk (fsync of the WAL) before the caller hears of it.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA foreign_keys=ON")
    # Random-keyed B-trees (hash keys) need their pages in memory for fast batch imports;
    # this is a ceiling, memory is only used as pages are touched.
    conn.execute(f"PRAGMA cache_size=-{cache_kib}")
    # Deleted rows are zeroed within their pages, so erased personal data does not linger in
    # free space; FAST costs no extra I/O (freed pages are handled by VACUUM when it matters).
    conn.execute("PRAGMA secure_delete=FAST")
    return sqlite_utils.Database(conn)


class Database:
    """An SQLite file used from asyncio without blocking the event loop."""

    def __init__(
        self, path: Path, migrations: Sequence[Migration] = (), *, cache_kib: int = CACHE_KIB
    ) -> None:
        """`cache_kib`: the page cache of each of its two connections (a ceiling)."""
        self.path = path
        self._cache_kib = cache_kib
        self._migrations = tuple(migrations)
        self._jobs: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._writer = threading.Thread(
            target=self._write_loop, name=f"sqlite-writer:{path.name}", daemon=True
        )
        self._reader = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"sqlite-reader:{path.name}"
        )
        self._reader_local = threading.local()
        self._closed = False

    @classmethod
    async def open(
        cls, path: Path, migrations: Sequence[Migration] = (), *, cache_kib: int = CACHE_KIB
    ) -> Database:
        database = cls(path, migrations, cache_kib=cache_kib)
        database._writer.start()
        try:
            await asyncio.wrap_future(database._ready)
        except BaseException:
            database._writer.join()
            database._reader.shutdown(wait=False)
            raise
        return database

    async def write(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        """Run `fn` in a write transaction; return once it is durably committed."""
        if self._closed:
            raise RuntimeError(f"database {self.path} is closed")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put(_Job(fn, future))
        return await asyncio.wrap_future(future)

    async def maintain(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        """Run `fn` on the writer connection outside any transaction (checkpoint, VACUUM)."""
        if self._closed:
            raise RuntimeError(f"database {self.path} is closed")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put(_Job(fn, future, in_transaction=False))
        return await asyncio.wrap_future(future)

    async def checkpoint(self) -> bool:
        """Copy the WAL into the database file and truncate it; False if a reader prevented it.

        After an erasure this removes the old page images (with the erased data) that the
        WAL still holds.
        """
        return await self.maintain(checkpoint_truncate)

    async def read(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        """Run `fn` on the reader connection (sees every committed write)."""
        if self._closed:
            raise RuntimeError(f"database {self.path} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader, self._read, fn)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._jobs.put(_STOP)
        await asyncio.to_thread(self._writer.join)
        await asyncio.get_running_loop().run_in_executor(self._reader, self._close_reader)
        self._reader.shutdown(wait=False)

    def _read(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        db: sqlite_utils.Database | None = getattr(self._reader_local, "db", None)
        if db is None:
            db = _connect(self.path, self._cache_kib)
            self._reader_local.db = db
        return fn(db)

    def _close_reader(self) -> None:
        db: sqlite_utils.Database | None = getattr(self._reader_local, "db", None)
        if db is not None:
            db.conn.close()

    def _write_loop(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = _connect(self.path, self._cache_kib)
            _apply_migrations(db, self._migrations)
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        try:
            while True:
                first = self._jobs.get()
                if first is _STOP:
                    return
                batch = [first]
                stop = False
                while len(batch) < MAX_BATCH:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is _STOP:
                        stop = True
                        break
                    batch.append(job)
                self._run_jobs(db, [job for job in batch if isinstance(job, _Job)])
                if stop:
                    return
        finally:
            db.conn.close()

    @classmethod
    def _run_jobs(cls, db: sqlite_utils.Database, jobs: list[_Job]) -> None:
        """Transactional jobs in group commits; each maintenance job alone, in queue order."""
        pending: list[_Job] = []
        for job in jobs:
            if job.in_transaction:
                pending.append(job)
                continue
            if pending:
                cls._run_batch(db, pending)
                pending = []
            cls._run_alone(db, job)
        if pending:
            cls._run_batch(db, pending)

    @staticmethod
    def _run_alone(db: sqlite_utils.Database, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            result = job.fn(db)
        except Exception as exc:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)

    @staticmethod
    def _run_batch(db: sqlite_utils.Database, batch: list[_Job]) -> None:
        # A caller that gave up (cancelled) before its turn is skipped; once running, a
        # future cannot be cancelled, so every result below can be set.
        batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not batch:
            return
        conn = db.conn
        outcomes: list[tuple[_Job, BaseException | None, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                conn.execute("SAVEPOINT job")
                try:
                    result = job.fn(db)
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((job, exc, None))
                else:
                    conn.execute("RELEASE job")
                    outcomes.append((job, None, result))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # Nothing of this batch is durable: every caller hears of the failure.
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            for job in batch:
                job.future.set_exception(exc)
            return
        for job, error, value in outcomes:
            if error is None:
                job.future.set_result(value)
            else:
                job.future.set_exception(error)


def _apply_migrations(db: sqlite_utils.Database, migrations: Sequence[Migration]) -> None:
    db.execute(
        "CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    applied = {row[0] for row in db.execute("SELECT name FROM migrations").fetchall()}
    for migration in migrations:
        if migration.name in applied:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            migration.apply(db)
            db.execute(
                "INSERT INTO migrations (name, applied_at) VALUES (?, ?)",
                [migration.name, utc_now()],
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


@contextlib.contextmanager
def zeroing(db: sqlite_utils.Database) -> Iterator[None]:
    """Within a write function: zero every page freed, not only in-page space (FAST).

    For deletions of personal data, so that no copy lingers on the free list of the file.
    """
    db.execute("PRAGMA secure_delete=ON")
    try:
        yield
    finally:
        db.execute("PRAGMA secure_delete=FAST")


def checkpoint_truncate(db: sqlite_utils.Database) -> bool:
    busy, _log, _done = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return not busy


def row_dicts(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    """The rest of a query's rows, each as {column name: value}."""
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def utc_now() -> str:
    """The current time as ISO 8601 UTC with a `Z`, the format of every stored timestamp."""
    return format_time(datetime.now(UTC))


def format_time(moment: datetime) -> str:
    """`moment` in the stored timestamp format; stored times compare correctly as text."""
    if moment.tzinfo is None:
        raise ValueError("a stored time must be timezone-aware")
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
