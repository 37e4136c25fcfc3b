"""The suppression list: who must not be mailed, in which scope, since when and why."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

import sqlite_utils

from .addresses import AddressHasher
from .database import Database, Migration, utc_now
from .errors import InvalidScope

GLOBAL = "global"
_SCOPE = re.compile(r"^(global|topic:[\w.\-]{1,64}|sender:[\w.\-]{1,255})$")


class Reason(StrEnum):
    UNSUBSCRIBE = "unsubscribe"
    COMPLAINT = "complaint"
    HARD_BOUNCE = "hard_bounce"
    MANUAL = "manual"
    IMPORT = "import"


def parse_scope(scope: str) -> str:
    """Validate a scope: `global`, `topic:NAME` or `sender:DOMAIN`."""
    if not _SCOPE.match(scope):
        raise InvalidScope(scope)
    return scope.lower()


@dataclass(frozen=True, slots=True)
class Suppression:
    address_hash: str
    address: str | None
    scope: str
    reason: str
    source: str
    created_at: str


def _create_tables(db: sqlite_utils.Database) -> None:
    db.table("suppressions").create(
        {
            "address_hash": str,
            "scope": str,
            "address": str,
            "reason": str,
            "source": str,
            "created_at": str,
        },
        pk=("address_hash", "scope"),
        not_null={"reason", "source", "created_at"},
    )
    db.table("suppressions").create_index(["address"])
    # The one place that maps a hash back to an address; erasure deletes the row.
    db.table("contacts").create(
        {"address_hash": str, "address": str, "first_seen_at": str},
        pk="address_hash",
        not_null={"address", "first_seen_at"},
    )


MIGRATIONS = (Migration("suppression/0001-suppressions-and-contacts", _create_tables),)

_COLUMNS = "address_hash, address, scope, reason, source, created_at"


class SuppressionStore:
    """Async access to suppressions and contacts in one SQLite database."""

    def __init__(self, db: Database, hasher: AddressHasher) -> None:
        self._db = db
        self.hasher = hasher

    async def add(
        self,
        address: str,
        *,
        scope: str = GLOBAL,
        reason: Reason = Reason.MANUAL,
        source: str = "cli",
    ) -> bool:
        """Suppress `address` in `scope`; False when it already was (the first entry is kept)."""
        scope = parse_scope(scope)
        address_hash = self.hasher.hash(address)
        normalized = self.hasher.normalize(address)
        return await self._db.write(
            lambda db: _insert(db, address_hash, normalized, scope, reason, source)
        )

    async def add_hash(
        self,
        address_hash: str,
        *,
        scope: str = GLOBAL,
        reason: Reason = Reason.UNSUBSCRIBE,
        source: str,
    ) -> bool:
        """Suppress by keyed hash, as a signed token names a recipient."""
        scope = parse_scope(scope)

        def insert(db: sqlite_utils.Database) -> bool:
            row = db.execute(
                "SELECT address FROM contacts WHERE address_hash = ?", [address_hash]
            ).fetchone()
            return _insert(db, address_hash, row[0] if row else None, scope, reason, source)

        return await self._db.write(insert)

    async def remove(self, address: str, *, scope: str | None = None) -> int:
        """Lift suppressions of `address` (in `scope`, or all); the number removed."""
        address_hash = self.hasher.hash(address)
        if scope is None:
            sql, params = "DELETE FROM suppressions WHERE address_hash = ?", [address_hash]
        else:
            sql = "DELETE FROM suppressions WHERE address_hash = ? AND scope = ?"
            params = [address_hash, parse_scope(scope)]
        return await self._db.write(lambda db: db.execute(sql, params).rowcount)

    async def check(self, address: str, scopes: Iterable[str] = (GLOBAL,)) -> Suppression | None:
        """The suppression that stops mail to `address` in any of `scopes`, if there is one."""
        return await self.check_hash(self.hasher.hash(address), scopes)

    async def check_hash(
        self, address_hash: str, scopes: Iterable[str] = (GLOBAL,)
    ) -> Suppression | None:
        wanted = list(dict.fromkeys(scopes))
        marks = ", ".join("?" for _ in wanted)
        sql = (
            f"SELECT {_COLUMNS} FROM suppressions"  # noqa: S608 - placeholders only
            f" WHERE address_hash = ? AND scope IN ({marks}) ORDER BY created_at LIMIT 1"
        )

        def lookup(db: sqlite_utils.Database) -> Suppression | None:
            row = db.execute(sql, [address_hash, *wanted]).fetchone()
            return Suppression(*row) if row else None

        return await self._db.read(lookup)

    async def list(self, *, scope: str | None = None) -> list[Suppression]:
        if scope is None:
            sql, params = f"SELECT {_COLUMNS} FROM suppressions ORDER BY created_at", []  # noqa: S608
        else:
            sql = f"SELECT {_COLUMNS} FROM suppressions WHERE scope = ? ORDER BY created_at"  # noqa: S608
            params = [parse_scope(scope)]
        return await self._db.read(
            lambda db: [Suppression(*row) for row in db.execute(sql, params).fetchall()]
        )

    async def remember(self, addresses: Iterable[str]) -> None:
        """Record hash -> address for recipients we mail, so token actions can name them."""
        rows = [(self.hasher.hash(a), self.hasher.normalize(a), utc_now()) for a in addresses]
        await self._db.write(lambda db: remember_contacts(db, rows))


def remember_contacts(db: sqlite_utils.Database, rows: list[tuple[str, str, str]]) -> None:
    db.conn.executemany(
        "INSERT OR IGNORE INTO contacts (address_hash, address, first_seen_at) VALUES (?, ?, ?)",
        rows,
    )


def _insert(
    db: sqlite_utils.Database,
    address_hash: str,
    address: str | None,
    scope: str,
    reason: Reason,
    source: str,
) -> bool:
    # An existing suppression is never replaced: its time and reason are the proof.
    cursor = db.execute(
        "INSERT OR IGNORE INTO suppressions (address_hash, address, scope, reason, source,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?)",
        [address_hash, address, scope, str(reason), source, utc_now()],
    )
    return bool(cursor.rowcount)
