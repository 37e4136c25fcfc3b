"""What the stores need of a storage engine, whichever it is (SQLite or PostgreSQL).

A store hands an engine functions to run on one of its threads: `write(fn)` runs `fn` in a
write transaction and returns once it is durably committed; `read(fn)` runs it on a reader
connection that sees every committed write. `fn` gets a `Connection`: `execute` and
`executemany` with `?` placeholders, and the engine's `dialect` for the few fragments the
two engines spell differently. That is the whole surface the shared stores use; the spool
stays on SQLite and may use anything sqlite-utils offers.

Write transactions are serialised, as they are in one SQLite file (BEGIN IMMEDIATE); on
PostgreSQL across every node, by an advisory lock taken first in each transaction. So the
stores' read-then-write steps (next audit id, merge of an entry, repeat of a fetch) stay
correct with several nodes writing, and every write sees everything committed before it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from .database import Migration

T = TypeVar("T")

SQLITE = "sqlite"
POSTGRESQL = "postgresql"


@dataclass(frozen=True, slots=True)
class Dialect:
    """SQL the two engines spell differently, as fragments to put in a statement."""

    name: str
    # A JSON array parameter as a one-column table (`value`), of text: `x IN (SELECT value
    # FROM {json_each})`. One parameter for any number of values, in both engines.
    json_each: str
    # The larger (smaller) of two values: scalar max()/min() in SQLite, GREATEST/LEAST here.
    greatest: str
    least: str
    # Unix time now, as a float (seconds), for the webhook outbox's clock.
    unix_now: str

    @property
    def is_postgresql(self) -> bool:
        return self.name == POSTGRESQL

    def json_text(self, expression: str, key: str) -> str:
        """The value at top-level `key` of the JSON text `expression`, as text (NULL if
        absent). `key` is a literal of ours."""
        if self.is_postgresql:
            return f"(({expression})::jsonb ->> '{key}')"
        return f"json_extract({expression}, '$.{key}')"


SQLITE_DIALECT = Dialect(
    SQLITE,
    json_each="json_each(?)",
    greatest="max",
    least="min",
    unix_now="((julianday('now') - 2440587.5) * 86400.0)",
)
POSTGRESQL_DIALECT = Dialect(
    POSTGRESQL,
    json_each="json_array_elements_text(?::json)",
    greatest="GREATEST",
    least="LEAST",
    unix_now="EXTRACT(EPOCH FROM clock_timestamp())::double precision",
)


class Cursor(Protocol):
    """The part of a DB-API cursor the stores use (sqlite3's and psycopg's both fit)."""

    @property
    def rowcount(self) -> int: ...

    @property
    def description(self) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def fetchmany(self, size: int = ...) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...

    def close(self) -> None: ...


class Connection(Protocol):
    """What a store's function gets to run its SQL on."""

    @property
    def dialect(self) -> Dialect: ...

    def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Cursor: ...


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """How to open a store database again, in this process or another (it pickles): an
    SQLite file, or a PostgreSQL URL and the password found for it."""

    path: Path | None = None
    url: str | None = None
    password: str | None = field(default=None, repr=False)

    async def open(self, migrations: Sequence[Migration], *, create: bool = True) -> Engine:
        """`create=False`: a PostgreSQL database without a store is SchemaMissing."""
        if self.url is not None:
            from .postgres import PostgresDatabase

            return await PostgresDatabase.open(
                self.url, migrations, password=self.password, create=create
            )
        from .database import Database

        assert self.path is not None
        return await Database.open(self.path, migrations)


class Engine(Protocol):
    """A store's database, SQLite or PostgreSQL, used from asyncio without blocking."""

    @property
    def dialect(self) -> Dialect: ...

    @property
    def spec(self) -> EngineSpec:
        """How to open it again (the event process opens the same database)."""
        ...

    @property
    def location(self) -> str:
        """Where the data is, for messages: a file, or a URL without its password."""
        ...

    async def write(self, fn: Callable[[Connection], T]) -> T: ...

    async def read(self, fn: Callable[[Connection], T]) -> T: ...

    async def hold(self, name: str) -> bool:
        """Whether this process holds the lock `name` among every node sharing the store
        (taken now if it is free), until the process ends or its connection breaks: one
        node at a time does a job such as draining the webhook outbox."""
        ...

    async def checkpoint(self) -> bool:
        """After an erasure: no old copy of the erased data left in the engine's own files
        that it can remove (SQLite's WAL); True when done."""
        ...

    async def close(self) -> None: ...
