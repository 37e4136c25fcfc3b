"""SQLite under asyncio: one writer thread with group commit, one reader thread.

Every write is a function run on the writer thread. Writes queued while a commit is in
progress are run together in the next transaction and share its fsync (group commit), each
inside its own savepoint so one failing write never undoes the others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from .engine import SQLITE_DIALECT, Connection, Cursor, Dialect, EngineSpec

T = TypeVar("T")

MAX_BATCH = 256
CACHE_KIB = 65536


@dataclass(frozen=True, slots=True)
class Migration:
    """A named, one-time schema change; names are recorded in the `migrations` table.

    `postgresql`: the same change for a PostgreSQL store (`suppression.postgres`), as the
    statements to run; None for a migration of an SQLite-only database (the spool)."""

    name: str
    apply: Callable[[SqliteConnection], None]
    postgresql: Sequence[str] | None = None


class SqliteConnection(sqlite_utils.Database):
    """sqlite-utils' Database with the `Connection` surface the shared stores use
    (`suppression.engine`), so that their functions run on either engine."""

    dialect = SQLITE_DIALECT

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> sqlite3.Cursor:
        return self.conn.executemany(sql, rows)


@dataclass(slots=True)
class _Job:
    fn: Callable[[Any], Any]  # given the engine's connection
    future: asyncio.Future[Any]
    # Maintenance (checkpoint, VACUUM) cannot run inside a transaction: it gets a turn alone.
    in_transaction: bool = True


_Outcome = tuple[_Job, BaseException | None, Any]


def _settle(outcomes: list[_Outcome]) -> None:
    """On the event loop: hand each waiting caller its result. A caller cancelled while its
    job ran hears nothing more; the job's effect stands, as with any write already begun."""
    for job, error, value in outcomes:
        if job.future.done():
            continue
        if error is None:
            job.future.set_result(value)
        else:
            job.future.set_exception(error)


def _report(outcomes: list[_Outcome]) -> None:
    """From a database thread: the outcomes go back in one call per event loop, so a batch
    of any size wakes the loop once."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0].future.get_loop(), []).append(outcome)
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(_settle, settled)


def _claim(jobs: list[_Job]) -> list[_Job]:
    """The jobs whose callers still wait: one cancelled before its turn is skipped."""
    return [job for job in jobs if not job.future.done()]


_STOP = object()


class _Lane:
    """The jobs for one database thread. Those submitted in one turn of the event loop are
    handed over together, so the thread is woken once for them, not once each."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[list[_Job] | object] = queue.SimpleQueue()
        self._pending: list[_Job] = []

    def submit(self, job: _Job) -> None:
        if not self._pending:
            job.future.get_loop().call_soon(self.flush)
        self._pending.append(job)

    def flush(self) -> None:
        if self._pending:
            jobs, self._pending = self._pending, []
            self.queue.put(jobs)

    def stop(self) -> None:
        self.flush()
        self.queue.put(_STOP)

    def take(self) -> tuple[list[_Job], bool]:
        """Wait for jobs, then take whatever else is queued, up to a batch; and whether the
        thread is to stop after them."""
        jobs: list[_Job] = []
        item = self.queue.get()
        while item is not _STOP:
            assert isinstance(item, list)
            jobs += item
            if len(jobs) >= MAX_BATCH:
                return jobs, False
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return jobs, False
        return jobs, True


# A database holds personal data: owner-only, whatever the umask or the directory's mode.
PRIVATE_FILE = 0o600
# SQLite gives its -wal and -shm files the mode of the database file.
_COMPANIONS = ("", "-wal", "-shm")


def _make_private(path: Path) -> None:
    """Create `path` (mode 0600) before SQLite does (0644 less the umask), and take group
    and other access from a database file made before this rule, and its companions."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE))
    except OSError:
        return  # SQLite reports what is wrong with the path, in its own words
    for suffix in _COMPANIONS:
        companion = path.with_name(path.name + suffix)
        with contextlib.suppress(OSError):
            if os.stat(companion).st_mode & 0o077:
                os.chmod(companion, PRIVATE_FILE)


def _connect(path: Path, cache_kib: int = CACHE_KIB) -> SqliteConnection:
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
    # sqlite-utils turns recursive triggers on by default; off, a REPLACE's implicit delete
    # fires no DELETE trigger (SQLite's default), as the webhook triggers rely on: a
    # strengthened entry is one `suppression.added`, never a removal and an addition.
    return SqliteConnection(conn, recursive_triggers=False)


class Database:
    """An SQLite file used from asyncio without blocking the event loop."""

    def __init__(
        self,
        path: Path,
        migrations: Sequence[Migration] = (),
        *,
        cache_kib: int = CACHE_KIB,
        after_commit: Callable[[SqliteConnection], None] | None = None,
    ) -> None:
        """`cache_kib`: the page cache of each of its two connections (a ceiling).
        `after_commit`: run on the writer thread after each durable commit, before any
        caller of that commit hears of it (it must not raise)."""
        self.path = path
        self._cache_kib = cache_kib
        self._after_commit = after_commit
        self._migrations = tuple(migrations)
        self._writes = _Lane()
        self._reads = _Lane()
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._writer = threading.Thread(
            target=self._write_loop, name=f"sqlite-writer:{path.name}", daemon=True
        )
        self._reader = threading.Thread(
            target=self._read_loop, name=f"sqlite-reader:{path.name}", daemon=True
        )
        self._closed = False

    @classmethod
    async def open(
        cls,
        path: Path,
        migrations: Sequence[Migration] = (),
        *,
        cache_kib: int = CACHE_KIB,
        after_commit: Callable[[SqliteConnection], None] | None = None,
    ) -> Database:
        database = cls(path, migrations, cache_kib=cache_kib, after_commit=after_commit)
        database._writer.start()
        try:
            await asyncio.wrap_future(database._ready)
        except BaseException:
            database._writer.join()
            raise
        database._reader.start()
        return database

    dialect: Dialect = SQLITE_DIALECT

    @property
    def location(self) -> str:
        return str(self.path)

    @property
    def spec(self) -> EngineSpec:
        return EngineSpec(path=self.path)

    async def write(self, fn: Callable[[SqliteConnection], T]) -> T:
        """Run `fn` in a write transaction; return once it is durably committed."""
        return await self._submit(self._writes, fn)

    async def maintain(self, fn: Callable[[SqliteConnection], T]) -> T:
        """Run `fn` on the writer connection outside any transaction (checkpoint, VACUUM)."""
        return await self._submit(self._writes, fn, in_transaction=False)

    async def hold(self, name: str) -> bool:
        # One SQLite file serves one node: whoever has it holds every lock.
        return True

    async def checkpoint(self) -> bool:
        """Copy the WAL into the database file and truncate it; False if a reader prevented it.

        After an erasure this removes the old page images (with the erased data) that the
        WAL still holds.
        """
        return await self.maintain(checkpoint_truncate)

    async def probe_write(self) -> None:
        """A real write that changes nothing (a WAL frame, fsynced): raises when the file
        cannot take writes now (a full disk, a read-only or damaged file)."""

        def rewrite_user_version(db: SqliteConnection) -> None:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            db.execute(f"PRAGMA user_version = {version}")

        await self.write(rewrite_user_version)

    async def quick_check(self) -> list[str]:
        """SQLite's `PRAGMA quick_check`: what it found wrong with the file, [] if nothing.
        Raises (sqlite3.DatabaseError) for a file too damaged to check."""

        def check(db: SqliteConnection) -> list[str]:
            found = [str(row[0]) for row in db.execute("PRAGMA quick_check(20)").fetchall()]
            return [] if found == ["ok"] else found

        return await self.read(check)

    async def read(self, fn: Callable[[SqliteConnection], T]) -> T:
        """Run `fn` on the reader connection (sees every committed write)."""
        return await self._submit(self._reads, fn)

    async def _submit(
        self,
        lane: _Lane,
        fn: Callable[[SqliteConnection], T],
        *,
        in_transaction: bool = True,
    ) -> T:
        if self._closed:
            raise RuntimeError(f"database {self.path} is closed")
        # An asyncio future settled by the thread through call_soon_threadsafe: cheaper than
        # a concurrent future wrapped for asyncio, which costs a wake-up per job.
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        lane.submit(_Job(fn, future, in_transaction))
        return await future

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writes.stop()
        self._reads.stop()
        await asyncio.to_thread(self._writer.join)
        await asyncio.to_thread(self._reader.join)

    def _read_loop(self) -> None:
        db: SqliteConnection | None = None
        try:
            while True:
                batch, stop = self._reads.take()
                jobs = _claim(batch)
                if jobs and db is None:
                    try:
                        db = _connect(self.path, self._cache_kib)
                    except Exception as exc:
                        _report([(job, exc, None) for job in jobs])
                        jobs = []
                outcomes: list[_Outcome] = []
                for job in jobs:
                    assert db is not None
                    try:
                        outcomes.append((job, None, job.fn(db)))
                    except Exception as exc:
                        outcomes.append((job, exc, None))
                _report(outcomes)
                if stop:
                    return
        finally:
            if db is not None:
                db.conn.close()

    def _write_loop(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _make_private(self.path)
            db = _connect(self.path, self._cache_kib)
            _apply_migrations(db, self._migrations)
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        try:
            while True:
                batch, stop = self._writes.take()
                self._run_jobs(db, batch)
                if stop:
                    return
        finally:
            db.conn.close()

    def _run_jobs(self, db: SqliteConnection, jobs: list[_Job]) -> None:
        """Transactional jobs in group commits; each maintenance job alone, in queue order.
        All the outcomes go back to the event loop together, after the last commit."""
        outcomes: list[_Outcome] = []
        pending: list[_Job] = []
        for job in _claim(jobs):
            if job.in_transaction:
                pending.append(job)
                continue
            if pending:
                outcomes += self._run_batch(db, pending)
                pending = []
            outcomes.append(self._run_alone(db, job))
        if pending:
            outcomes += self._run_batch(db, pending)
        _report(outcomes)

    @staticmethod
    def _run_alone(db: SqliteConnection, job: _Job) -> _Outcome:
        try:
            return job, None, job.fn(db)
        except Exception as exc:
            return job, exc, None

    def _run_batch(self, db: SqliteConnection, batch: list[_Job]) -> list[_Outcome]:
        conn = db.conn
        outcomes: list[_Outcome] = []
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
            return [(job, exc, None) for job in batch]
        if self._after_commit is not None:
            self._after_commit(db)
        return outcomes


def _apply_migrations(db: SqliteConnection, migrations: Sequence[Migration]) -> None:
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
        applied.add(migration.name)  # a migration two packages list is applied once


@contextlib.contextmanager
def zeroing(db: Connection) -> Iterator[None]:
    """Within a write function: zero every page freed, not only in-page space (FAST).

    For deletions of personal data, so that no copy lingers on the free list of the file.
    Nothing to do on PostgreSQL, whose files are its administrator's (VACUUM).
    """
    if db.dialect.is_postgresql:
        yield
        return
    db.execute("PRAGMA secure_delete=ON")
    try:
        yield
    finally:
        db.execute("PRAGMA secure_delete=FAST")


def checkpoint_truncate(db: sqlite_utils.Database) -> bool:
    busy, _log, _done = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return not busy


def fsync_directory(directory: Path) -> None:
    """Make the creation, renaming or removal of a file in `directory` durable: the name is
    in the directory, so a crash can undo it until the directory itself is fsynced."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def row_dicts(cursor: Cursor) -> list[dict[str, Any]]:
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
