"""PostgreSQL under asyncio, in the SQLite engine's shape: one writer thread with group
commit, reader threads, store functions run on them with a `Connection` (engine.py).

Why psycopg 3 with sync connections on threads: the stores' functions are synchronous
(SQLite's are) and run several statements each; a sync connection on a thread runs them as
they are, and the group commit and savepoints of `database.py` carry over unchanged.
bench/storage_drivers.py measured asyncpg against it (see the README's figures): asyncpg
is faster per round trip on the wire, but would need every store function rewritten as a
coroutine, and the gain disappears in the thread hop a check already pays.

Several nodes: every write transaction first takes one advisory lock (WRITE_LOCK), so
writes are serialised across nodes as they are within one SQLite file, and each sees all
that committed before it. Reads take no lock and see every committed write (autocommit:
each statement has a fresh snapshot), so nothing is cached that could be stale.

When the server cannot be reached, a job fails at once with `StorageUnavailable` (one
connection attempt per RETRY_INTERVAL at most, so a flood of checks does not queue behind
connect timeouts); the log says so once when it starts and once when it ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.adapt import Loader

from .database import _STOP, Migration, _claim, _Job, _Lane, _Outcome, _report, utc_now
from .engine import POSTGRESQL_DIALECT, Connection, Cursor, Dialect, EngineSpec
from .errors import SchemaMissing, StorageUnavailable

T = TypeVar("T")

log = logging.getLogger("optout.storage")

# Advisory lock keys (64-bit, per database): writes, and schema migrations at start.
WRITE_LOCK = 0x6F70_746F_7574_0001  # "optout" + 1
MIGRATION_LOCK = 0x6F70_746F_7574_0002
CONNECT_TIMEOUT = 5  # seconds; libpq's connect_timeout
RETRY_INTERVAL = 1.0  # seconds between connection attempts while the server is away
READERS = 2


class _NumericLoader(Loader):
    """numeric (what SUM of a bigint gives) as int or float, as SQLite gives it: the stores'
    figures go to JSON, which has no Decimal."""

    def load(self, data: Any) -> int | float:
        text = bytes(data).decode()
        return float(text) if any(c in text for c in ".eEN") else int(text)


@lru_cache(maxsize=1024)
def _paramstyle(sql: str) -> str:
    """The stores' `?` placeholders as psycopg's `%s` (and a literal `%` doubled), outside
    quoted strings, quoted names and comments."""
    out: list[str] = []
    quote: str | None = None
    i = 0
    while i < len(sql):
        char = sql[i]
        if quote is not None:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "-" and sql.startswith("--", i):
            end = sql.find("\n", i)
            end = len(sql) if end < 0 else end
            out.append(sql[i:end])
            i = end
            continue
        elif char == "?":
            out.append("%s")
            i += 1
            continue
        out.append("%%" if char == "%" else char)
        i += 1
    return "".join(out)


class PostgresConnection:
    """A psycopg connection with the `Connection` surface (`?` placeholders)."""

    dialect: Dialect = POSTGRESQL_DIALECT

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> Cursor:
        cursor = self.conn.cursor()
        # Parameters always given (even none): psycopg then reads `%%` as `%`.
        cursor.execute(_paramstyle(sql), parameters or ())
        return cursor

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Cursor:
        cursor = self.conn.cursor()
        cursor.executemany(_paramstyle(sql), rows)
        return cursor


def redacted(url: str) -> str:
    """`url` without its password, fit for a log line or an error message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:***@{host}" if parts.username else f":***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def _broken(exc: BaseException, conn: psycopg.Connection[Any] | None) -> bool:
    """Whether `exc` means the server or the link to it is gone (not a bad statement)."""
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return conn is None or conn.broken or conn.closed
    return False


class _Health:
    """Reachable or not, logged once per change; and when the next connection attempt is
    allowed while it is not."""

    def __init__(self, location: str) -> None:
        self._location = location
        self._lock = threading.Lock()
        self.up = True
        self.reason = ""
        self._next_try = 0.0
        # Times the server came back: a connection opened before the last of them was cut
        # when it went away, even if nothing has used it since to find out.
        self.recoveries = 0

    def may_try(self) -> bool:
        with self._lock:
            return self.up or time.monotonic() >= self._next_try

    def failed(self, exc: BaseException) -> StorageUnavailable:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        with self._lock:
            self._next_try = time.monotonic() + RETRY_INTERVAL
            if self.up:
                self.up = False
                self.reason = reason
                log.error("storage: PostgreSQL at %s unreachable: %s", self._location, reason)
        return self.unavailable()

    def unavailable(self) -> StorageUnavailable:
        return StorageUnavailable(f"PostgreSQL at {self._location} unreachable: {self.reason}")

    def succeeded(self) -> None:
        if self.up:
            return
        with self._lock:
            if not self.up:
                self.up = True
                self.recoveries += 1
                log.warning("storage: PostgreSQL at %s reachable again", self._location)


class PostgresDatabase:
    """A PostgreSQL database used from asyncio without blocking the event loop: the same
    interface as `suppression.Database` (`suppression.engine.Engine`)."""

    dialect: Dialect = POSTGRESQL_DIALECT

    def __init__(
        self,
        url: str,
        migrations: Sequence[Migration] = (),
        *,
        password: str | None = None,
        readers: int = READERS,
        create: bool = True,
    ) -> None:
        self.url = url
        self._create = create
        self.location = redacted(url)
        self._password = password
        self._migrations = tuple(migrations)
        self._health = _Health(self.location)
        # id of each reader's and the writer's connection -> the recoveries when it opened.
        self._opened: dict[int, int] = {}
        self._writes = _Lane()
        self._reads = _Lane()
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._writer = threading.Thread(target=self._write_loop, name="pg-writer", daemon=True)
        self._readers = [
            threading.Thread(target=self._read_loop, name=f"pg-reader-{n}", daemon=True)
            for n in range(readers)
        ]
        self._closed = False
        self._held: dict[str, psycopg.Connection[Any]] = {}
        self._held_lock = threading.Lock()

    @property
    def spec(self) -> EngineSpec:
        return EngineSpec(url=self.url, password=self._password)

    @property
    def available(self) -> bool:
        """False since a connection failed, until one succeeds again."""
        return self._health.up

    @property
    def unavailable_reason(self) -> str:
        return "" if self._health.up else self._health.reason

    @classmethod
    async def open(
        cls,
        url: str,
        migrations: Sequence[Migration] = (),
        *,
        password: str | None = None,
        readers: int = READERS,
        create: bool = True,
    ) -> PostgresDatabase:
        """Connect, and create or upgrade the schema (serialised between nodes starting
        together); StorageUnavailable when the server cannot be reached. `create=False`:
        SchemaMissing when the database holds no store yet, and nothing is made."""
        database = cls(url, migrations, password=password, readers=readers, create=create)
        database._writer.start()
        try:
            await asyncio.wrap_future(database._ready)
        except BaseException:
            database._writer.join()
            raise
        for reader in database._readers:
            reader.start()
        return database

    async def write(self, fn: Callable[[Connection], T]) -> T:
        """Run `fn` in a write transaction (after the write lock); return once committed."""
        return await self._submit(self._writes, fn)

    async def maintain(self, fn: Callable[[Connection], T]) -> T:
        """Run `fn` on the writer connection outside any transaction."""
        return await self._submit(self._writes, fn, in_transaction=False)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        return await self._submit(self._reads, fn)

    async def hold(self, name: str) -> bool:
        return await asyncio.to_thread(self._hold, name)

    def _hold(self, name: str) -> bool:
        """A session advisory lock on a connection of its own, kept while it is held: a
        node that dies or loses the server loses the lock with its connection, and the
        next node to ask takes it over."""
        with self._held_lock:
            conn = self._held.get(name)
            if conn is not None:
                try:
                    conn.execute("SELECT 1")
                    return True
                except psycopg.Error:
                    with contextlib.suppress(Exception):
                        conn.close()
                    del self._held[name]
            if self._closed or not self._health.may_try():
                return False
            key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
            try:
                conn = self._connect()
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", [key]).fetchone()
            except psycopg.Error:
                return False
            if row and row[0]:
                self._held[name] = conn
                return True
            conn.close()
            return False

    async def checkpoint(self) -> bool:
        # The server's own WAL and dead row versions are its administrator's (VACUUM).
        return True

    async def _submit(
        self, lane: _Lane, fn: Callable[[Connection], T], *, in_transaction: bool = True
    ) -> T:
        if self._closed:
            raise RuntimeError(f"database {self.location} is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        lane.submit(_Job(fn, future, in_transaction))
        return await future

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._held_lock:
            for conn in self._held.values():
                conn.close()
            self._held.clear()
        self._writes.stop()
        self._reads.stop()
        for _ in self._readers[1:]:
            self._reads.queue.put(_STOP)
        await asyncio.to_thread(self._writer.join)
        for reader in self._readers:
            if reader.is_alive() or reader.ident is not None:
                await asyncio.to_thread(reader.join)

    # --- on the database threads ------------------------------------------------------------

    def _connect(self, *, autocommit: bool = True) -> psycopg.Connection[Any]:
        kwargs: dict[str, Any] = {
            "autocommit": autocommit,
            "connect_timeout": CONNECT_TIMEOUT,
            # A node stuck inside a transaction must not hold the write lock for ever: its
            # session ends (and the lock with it); a write waiting that long fails, and
            # its caller retries, rather than hanging.
            "options": "-c idle_in_transaction_session_timeout=60000 -c lock_timeout=30000",
        }
        if self._password is not None:
            kwargs["password"] = self._password
        conn = psycopg.connect(self.url, **kwargs)
        conn.adapters.register_loader("numeric", _NumericLoader)
        return conn

    def _connection(self, current: psycopg.Connection[Any] | None) -> psycopg.Connection[Any]:
        """`current` if it is still good, else a new connection (StorageUnavailable if the
        server cannot be reached, or was not reachable a moment ago). One opened before the
        server last came back is replaced unused: failing on it would say the server is
        unreachable a second time, a moment after another thread said it is back."""
        fresh = current is not None and self._opened.get(id(current)) == self._health.recoveries
        if current is not None and fresh and not current.closed and not current.broken:
            return current
        if current is not None:
            with contextlib.suppress(Exception):
                current.close()
        if not self._health.may_try():
            raise self._health.unavailable()
        if current is not None:
            self._opened.pop(id(current), None)
        try:
            conn = self._connect()
        except psycopg.Error as exc:
            raise self._health.failed(exc) from None
        self._health.succeeded()
        self._opened[id(conn)] = self._health.recoveries
        return conn

    def _read_loop(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        try:
            while True:
                batch, stop = self._reads.take()
                outcomes: list[_Outcome] = []
                for job in _claim(batch):
                    conn, outcome = self._read_one(conn, job)
                    outcomes.append(outcome)
                _report(outcomes)
                if stop:
                    return
        finally:
            if conn is not None:
                conn.close()

    def _read_one(
        self, conn: psycopg.Connection[Any] | None, job: _Job
    ) -> tuple[psycopg.Connection[Any] | None, _Outcome]:
        """Run a read; a connection the server dropped while it was idle (a restart) is
        replaced and the read tried once more before the server counts as away."""
        for retry in (True, False):
            try:
                conn = self._connection(conn)
                return conn, (job, None, job.fn(PostgresConnection(conn)))
            except StorageUnavailable as exc:
                return conn, (job, exc, None)
            except Exception as exc:
                if not _broken(exc, conn):
                    return conn, (job, exc, None)
                if not retry:
                    return conn, (job, self._health.failed(exc), None)
        raise AssertionError("unreachable")

    def _write_loop(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        try:
            conn = self._connect()
            self._opened[id(conn)] = self._health.recoveries
            if not self._create and not _has_store(conn):
                raise SchemaMissing(f"no store in the database {self.location}")
            _apply_migrations(conn, self._migrations)
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, psycopg.OperationalError) and (conn is None or conn.broken):
                exc = self._health.failed(exc)
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        try:
            while True:
                batch, stop = self._writes.take()
                conn = self._run_jobs(conn, batch)
                if stop:
                    return
        finally:
            if conn is not None:
                conn.close()

    def _run_jobs(
        self, conn: psycopg.Connection[Any] | None, jobs: list[_Job]
    ) -> psycopg.Connection[Any] | None:
        outcomes: list[_Outcome] = []
        pending: list[_Job] = []
        for job in _claim(jobs):
            if job.in_transaction:
                pending.append(job)
                continue
            if pending:
                conn = self._run_batch(conn, pending, outcomes)
                pending = []
            conn = self._run_alone(conn, job, outcomes)
        if pending:
            conn = self._run_batch(conn, pending, outcomes)
        _report(outcomes)
        return conn

    def _run_alone(
        self, conn: psycopg.Connection[Any] | None, job: _Job, outcomes: list[_Outcome]
    ) -> psycopg.Connection[Any] | None:
        try:
            conn = self._connection(conn)
            outcomes.append((job, None, job.fn(PostgresConnection(conn))))
        except StorageUnavailable as exc:
            outcomes.append((job, exc, None))
        except Exception as exc:
            if _broken(exc, conn):
                exc = self._health.failed(exc)
            outcomes.append((job, exc, None))
        return conn

    def _run_batch(
        self, conn: psycopg.Connection[Any] | None, batch: list[_Job], outcomes: list[_Outcome]
    ) -> psycopg.Connection[Any] | None:
        """One transaction for the batch, each job in a savepoint of its own (one alone
        needs none: its failure rolls back the whole, which is only itself)."""
        try:
            conn = self._connection(conn)
        except StorageUnavailable as exc:
            outcomes += [(job, exc, None) for job in batch]
            return conn
        done: list[_Outcome] = []
        single = len(batch) == 1
        try:
            try:
                conn.execute("BEGIN")
            except psycopg.Error as exc:
                if not _broken(exc, conn):
                    raise
                # Dropped while idle (a server restart): nothing was sent, a new
                # connection begins the same transaction.
                conn = self._connection(conn)
                conn.execute("BEGIN")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [WRITE_LOCK])
            wrapped = PostgresConnection(conn)
            for job in batch:
                if not single:
                    conn.execute("SAVEPOINT job")
                try:
                    result = job.fn(wrapped)
                except Exception as exc:
                    if _broken(exc, conn):
                        raise
                    if single:
                        conn.execute("ROLLBACK")
                        outcomes.append((job, exc, None))
                        return conn
                    conn.execute("ROLLBACK TO SAVEPOINT job")
                    conn.execute("RELEASE SAVEPOINT job")
                    done.append((job, exc, None))
                else:
                    if not single:
                        conn.execute("RELEASE SAVEPOINT job")
                    done.append((job, None, result))
            conn.execute("COMMIT")
        except Exception as exc:
            # Nothing of this batch is known durable: every caller hears of the failure (a
            # commit whose answer was lost may have happened: callers retry, at least once).
            failure: BaseException = exc
            if _broken(exc, conn):
                failure = self._health.failed(exc)
            else:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
            outcomes += [(job, failure, None) for job in batch]
            return conn
        outcomes += done
        return conn


def _has_store(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT to_regclass('migrations') IS NOT NULL").fetchone()
    return bool(row and row[0])


def _apply_migrations(conn: psycopg.Connection[Any], migrations: Sequence[Migration]) -> None:
    """Create or upgrade the schema, one migration per transaction, under a session lock:
    nodes starting together take turns, and the later ones find the work done."""
    missing = [m.name for m in migrations if m.postgresql is None]
    if missing:
        raise RuntimeError(f"no PostgreSQL form for the migrations {', '.join(missing)}")
    conn.execute("SELECT pg_advisory_lock(%s)", [MIGRATION_LOCK])
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS migrations"
            " (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        applied = {row[0] for row in conn.execute("SELECT name FROM migrations").fetchall()}
        for migration in migrations:
            if migration.name in applied:
                continue
            assert migration.postgresql is not None
            with conn.transaction():
                for statement in migration.postgresql:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO migrations (name, applied_at) VALUES (%s, %s)",
                    [migration.name, utc_now()],
                )
            applied.add(migration.name)  # a migration two packages list is applied once
            log.info("storage: applied %s", migration.name)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", [MIGRATION_LOCK])


def applied_migrations(conn: Connection) -> list[str]:
    return [row[0] for row in conn.execute("SELECT name FROM migrations ORDER BY name")]
