"""The suppression list: who must not be mailed, in which scope, since when and why."""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import audit
from .addresses import MD5_PREFIX, SHA256_PREFIX, AddressHasher, digest_keys
from .audit import AuditRecord
from .consent import Consent, consent_of
from .database import format_time, utc_now, zeroing
from .engine import Connection, Cursor, Engine
from .entries import COLUMNS, Entry, Outcome, apply_entries
from .errors import NormalizationChanged, ProtectedSuppression
from .reasons import Reason, check_expiry
from .schema import MIGRATIONS
from .scopes import GLOBAL, parse_scope

__all__ = [
    "GLOBAL",
    "MIGRATIONS",
    "Reason",
    "SubjectRecord",
    "Suppression",
    "SuppressionStore",
    "parse_scope",
    "remember_contacts",
]

PAGE_SIZE = 5000
EXPIRE_BATCH = 10_000  # entries deleted per write, so a purge never holds the writer long


@dataclass(frozen=True, slots=True)
class Suppression:
    address_hash: str
    address: str | None
    scope: str
    reason: str
    source: str
    created_at: str
    expires_at: str | None = None
    updated_at: str | None = None
    added_by: int | None = None  # id of the audit record of its creation

    @property
    def key_kind(self) -> str:
        """`hmac` for our keyed hash, `md5` or `sha256` for an entry of an imported hashed list."""
        if self.address_hash.startswith(MD5_PREFIX):
            return "md5"
        if self.address_hash.startswith(SHA256_PREFIX):
            return "sha256"
        return "hmac"

    def as_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "address_hash": self.address_hash,
            "scope": self.scope,
            "reason": self.reason,
            "source": self.source,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True, slots=True)
class SubjectRecord:
    """Everything the suppression store holds about one address."""

    address: str
    address_hash: str
    keys: tuple[str, ...]
    suppressions: list[Suppression]
    history: list[AuditRecord]
    contact_first_seen_at: str | None = None
    erased_at: str | None = None


_FIND = (
    f"SELECT {COLUMNS} FROM suppressions WHERE address_hash IN ({{keys}})"  # noqa: S608
    " AND scope IN ({scopes}) AND (expires_at IS NULL OR expires_at > ?)"
)
# Complaints and hard bounces first: the transactional-mail rule looks at the one returned.
_PRECEDENCE = {Reason.COMPLAINT: 0, Reason.HARD_BOUNCE: 1}


def find(
    db: Connection, keys: Sequence[str], scopes: Sequence[str], now: str
) -> Suppression | None:
    """The entry in force under any of `keys` in any of `scopes`: one primary-key probe set.

    Rarely more than one row matches, so the choice is made here rather than with an ORDER
    BY, which would cost a temporary B-tree on every check.
    """
    sql = _FIND.format(keys=", ".join("?" * len(keys)), scopes=", ".join("?" * len(scopes)))
    rows = db.execute(sql, [*keys, *scopes, now]).fetchall()
    if not rows:
        return None
    best = min(rows, key=lambda row: (_PRECEDENCE.get(row[3], 2), row[5]))
    return Suppression(*best)


def _scopes(scopes: Iterable[str]) -> list[str]:
    # Exactly the scopes named (callers include GLOBAL when it applies; an undo looks at its
    # own scope only). Stored scopes are lower case (parse_scope): no miss on case.
    return list(dict.fromkeys(scope.lower() for scope in scopes))


def _expiry(reason: Reason, expires_at: datetime | None) -> str | None:
    text = None if expires_at is None else format_time(expires_at)
    check_expiry(reason, text)
    return text


class SuppressionStore:
    """Async access to suppressions, contacts and the audit log in one SQLite database."""

    def __init__(self, db: Engine, hasher: AddressHasher) -> None:
        self._db = db
        self.hasher = hasher

    @property
    def database(self) -> Engine:
        return self._db

    async def verify_normalization(self) -> None:
        """Pin the normalisation policy on first use; refuse a later change.

        Keys are HMACs of the normalised address: under another policy the same address
        gets another key and every stored suppression would silently stop matching.
        """
        configured = self.hasher.policy.describe()

        def pin(db: Connection) -> None:
            row = db.execute(
                "SELECT value FROM suppression_settings WHERE name = 'normalization'"
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO suppression_settings (name, value) VALUES ('normalization', ?)",
                    [configured],
                )
            elif row[0] != configured:
                raise NormalizationChanged(row[0], configured)

        await self._db.write(pin)

    async def suppress(
        self,
        address: str,
        *,
        scope: str = GLOBAL,
        reason: Reason = Reason.MANUAL,
        source: str = "cli",
        actor: str | None = None,
        expires_at: datetime | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> Outcome:
        """Suppress `address` in `scope`: added, strengthened, or unchanged (already as strong)."""
        entry = Entry(
            self.hasher.hash(address),
            parse_scope(scope),
            Reason(reason),
            source,
            self.hasher.normalize(address),
            _expiry(Reason(reason), expires_at),
            audit.dumps(detail),
        )
        [outcome] = await self.apply([entry], actor=actor)
        return outcome

    async def add(
        self,
        address: str,
        *,
        scope: str = GLOBAL,
        reason: Reason = Reason.MANUAL,
        source: str = "cli",
        actor: str | None = None,
        expires_at: datetime | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> bool:
        """Suppress `address`; False when it already was at least as strongly."""
        outcome = await self.suppress(
            address,
            scope=scope,
            reason=reason,
            source=source,
            actor=actor,
            expires_at=expires_at,
            detail=detail,
        )
        return outcome is not Outcome.UNCHANGED

    async def add_hash(
        self,
        address_hash: str,
        *,
        scope: str = GLOBAL,
        reason: Reason = Reason.UNSUBSCRIBE,
        source: str,
        actor: str | None = None,
        expires_at: datetime | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> bool:
        """Suppress by keyed hash, as a signed token names a recipient (audited like `add`)."""
        scope = parse_scope(scope)
        expiry = _expiry(Reason(reason), expires_at)

        def insert(db: Connection) -> bool:
            row = db.execute(
                "SELECT address FROM contacts WHERE address_hash = ?", [address_hash]
            ).fetchone()
            entry = Entry(
                address_hash,
                scope,
                Reason(reason),
                source,
                row[0] if row else None,
                expiry,
                audit.dumps(detail),
            )
            [outcome] = apply_entries(db, [entry], actor=actor, now=utc_now())
            return outcome is not Outcome.UNCHANGED

        return await self._db.write(insert)

    async def apply(self, entries: Sequence[Entry], *, actor: str | None) -> list[Outcome]:
        """Apply prepared entries in one transaction (imports call this once per batch)."""
        return await self._db.write(
            lambda db: apply_entries(db, entries, actor=actor, now=utc_now())
        )

    async def remove(
        self,
        address: str,
        *,
        scope: str | None = None,
        source: str = "cli",
        actor: str | None = None,
        force: bool = False,
        note: str | None = None,
    ) -> int:
        """Lift suppressions of `address` (in `scope`, or all), hashed-list entries included.

        What the recipient made stays made: an unsubscribe, a complaint or the suppression of
        an erased person is lifted only with `force` (ProtectedSuppression otherwise, and
        nothing is removed); a forced removal says so in the audit log. The recipient's own
        undo goes through `remove_hash`.
        """
        keys = self.hasher.lookup_keys(address)
        wanted = None if scope is None else parse_scope(scope)
        detail: dict[str, Any] = {"note": note} if note else {}

        def delete(db: Connection) -> int:
            if not force:
                why = _protected(db, keys, wanted)
                if why is not None:
                    raise ProtectedSuppression(address, why)
            elif _protected(db, keys, wanted) is not None:
                detail["forced"] = True
            return _delete_entries(db, keys, wanted, source=source, actor=actor, detail=detail)

        return await self._db.write(delete)

    async def remove_hash(
        self, address_hash: str, *, scope: str, source: str, actor: str | None = None
    ) -> int:
        """Lift the one entry under this keyed hash in `scope` (a recipient's undo); 0 or 1.

        Hashed-list entries and other scopes are left alone: an undo takes back only what
        the recipient's own click made.
        """
        wanted = parse_scope(scope)

        def delete(db: Connection) -> int:
            return _delete_entries(db, [address_hash], wanted, source=source, actor=actor)

        return await self._db.write(delete)

    async def check(self, address: str, scopes: Iterable[str] = (GLOBAL,)) -> Suppression | None:
        """The suppression that stops mail to `address` in any of `scopes`, if there is one.

        Matches our keyed hash and the md5/sha256 keys of imported hashed lists, in one
        indexed lookup.
        """
        keys = self.hasher.lookup_keys(address)
        wanted = _scopes(scopes)
        return await self._db.read(lambda db: find(db, keys, wanted, utc_now()))

    async def check_hash(
        self, address_hash: str, scopes: Iterable[str] = (GLOBAL,)
    ) -> Suppression | None:
        """As `check`, by keyed hash; hashed-list entries match through the known contact."""
        wanted = _scopes(scopes)

        def lookup(db: Connection) -> Suppression | None:
            row = db.execute(
                "SELECT address FROM contacts WHERE address_hash = ?", [address_hash]
            ).fetchone()
            keys = (address_hash, *digest_keys(row[0])) if row else (address_hash,)
            return find(db, keys, wanted, utc_now())

        return await self._db.read(lookup)

    async def check_hash_and_consent(
        self, address_hash: str, scopes: Iterable[str] = (GLOBAL,)
    ) -> tuple[Suppression | None, Consent]:
        """`check_hash` and the recipient's word on tracking (suppression.consent), in one
        read: what the delivery worker needs of a recipient, in one round trip."""
        wanted = _scopes(scopes)

        def lookup(db: Connection) -> tuple[Suppression | None, Consent]:
            row = db.execute(
                "SELECT address FROM contacts WHERE address_hash = ?", [address_hash]
            ).fetchone()
            keys = (address_hash, *digest_keys(row[0])) if row else (address_hash,)
            return find(db, keys, wanted, utc_now()), consent_of(db, address_hash)

        return await self._db.read(lookup)

    async def entries(
        self, *, scope: str | None = None, page_size: int = PAGE_SIZE
    ) -> AsyncGenerator[Suppression, None]:
        """Every entry in creation order, a page per read so a large list never sits in memory.

        One query streamed page by page from the reader thread (its only thread); it sorts
        once, where an index on the order would slow every import by a third.
        """
        wanted = None if scope is None else parse_scope(scope)
        if self._db.dialect.is_postgresql:
            # A server keeps no cursor between reads that may run on other connections:
            # pages by creation order, along the index PostgreSQL has for it.
            after = 0
            while True:
                page = await self._db.read(
                    functools.partial(_listing_page, scope=wanted, after=after, size=page_size)
                )
                for row in page:
                    yield Suppression(*row)
                if len(page) < page_size:
                    return
                after = page[-1][-1]
        cursor = await self._db.read(functools.partial(_open_listing, scope=wanted))
        try:
            while True:
                page = await self._db.read(lambda _db: cursor.fetchmany(page_size))
                for row in page:
                    yield Suppression(*row)
                if len(page) < page_size:
                    return
        finally:
            await self._db.read(lambda _db: cursor.close())

    async def list(self, *, scope: str | None = None) -> list[Suppression]:
        return [entry async for entry in self.entries(scope=scope)]

    async def count(self, *, scope: str | None = None) -> int:
        wanted = None if scope is None else parse_scope(scope)

        def query(db: Connection) -> int:
            if wanted is None:
                return int(db.execute("SELECT COUNT(*) FROM suppressions").fetchone()[0])
            return int(
                db.execute(
                    "SELECT COUNT(*) FROM suppressions WHERE scope = ?", [wanted]
                ).fetchone()[0]
            )

        return await self._db.read(query)

    async def remember(self, addresses: Iterable[str]) -> None:
        """Record hash -> address for recipients we mail, so token actions can name them."""
        rows = [(self.hasher.hash(a), self.hasher.normalize(a), utc_now()) for a in addresses]
        await self._db.write(lambda db: remember_contacts(db, rows))

    async def show(self, address: str) -> SubjectRecord:
        """The entries in force or lapsed under any key of `address`, and their full history."""
        normalized = self.hasher.normalize(address)
        keys = self.hasher.lookup_keys(address)
        return await self._db.read(lambda db: subject_record(db, normalized, keys))

    async def count_expired(self, now: datetime | None = None) -> int:
        """How many entries `purge_expired` would delete now (a retention dry run)."""
        cutoff = utc_now() if now is None else format_time(now)
        sql = "SELECT count(*) FROM suppressions WHERE expires_at IS NOT NULL AND expires_at <= ?"
        return await self._db.read(lambda db: int(db.execute(sql, [cutoff]).fetchone()[0]))

    async def purge_expired(self, now: datetime | None = None) -> int:
        """Delete entries whose expiry has passed (audited as `expire`); the number deleted."""
        cutoff = utc_now() if now is None else format_time(now)
        total = 0
        while True:
            removed = await self._db.write(
                functools.partial(_expire_batch, cutoff=cutoff, batch=EXPIRE_BATCH)
            )
            total += removed
            if removed < EXPIRE_BATCH:
                return total


def subject_record(db: Connection, normalized: str, keys: Sequence[str]) -> SubjectRecord:
    marks = ", ".join("?" for _ in keys)
    entries = [
        Suppression(*row)
        for row in db.execute(
            f"SELECT {COLUMNS} FROM suppressions WHERE address_hash IN ({marks})"  # noqa: S608
            " ORDER BY added_by",
            list(keys),
        )
    ]
    contact = db.execute(
        "SELECT first_seen_at FROM contacts WHERE address_hash = ?", [keys[0]]
    ).fetchone()
    erased = db.execute(
        "SELECT erased_at FROM suppression_erasures WHERE address_hash = ?", [keys[0]]
    ).fetchone()
    return SubjectRecord(
        address=normalized,
        address_hash=keys[0],
        keys=tuple(keys),
        suppressions=entries,
        history=audit.history(db, keys),
        contact_first_seen_at=contact[0] if contact else None,
        erased_at=erased[0] if erased else None,
    )


def _open_listing(db: Connection, *, scope: str | None) -> Cursor:
    where, params = ("WHERE scope = ?", [scope]) if scope is not None else ("", [])
    return db.execute(
        f"SELECT {COLUMNS} FROM suppressions {where}"  # noqa: S608
        " ORDER BY added_by",
        params,
    )


def _listing_page(db: Connection, *, scope: str | None, after: int, size: int) -> list[Any]:
    where, params = ("AND scope = ?", [scope]) if scope is not None else ("", [])
    return db.execute(
        f"SELECT {COLUMNS} FROM suppressions WHERE added_by > ? {where}"  # noqa: S608
        " ORDER BY added_by LIMIT ?",
        [after, *params, size],
    ).fetchall()


# Reasons only the recipient's own word sets: lifted by an operator only with --force.
RECIPIENT_REASONS = frozenset({Reason.UNSUBSCRIBE, Reason.COMPLAINT})


def _protected(db: Connection, keys: Sequence[str], scope: str | None) -> str | None:
    """Why removing the entries under `keys` (in `scope`) needs force, or None."""
    marks = ", ".join("?" * len(keys))
    erased = db.execute(
        f"SELECT erased_at FROM suppression_erasures WHERE address_hash IN ({marks})",  # noqa: S608
        list(keys),
    ).fetchone()
    for row in db.execute(
        f"SELECT {COLUMNS} FROM suppressions WHERE address_hash IN ({marks})",  # noqa: S608
        list(keys),
    ):
        entry = Suppression(*row)
        if scope is not None and entry.scope != scope:
            continue
        if erased is not None:
            return f"was erased on {erased[0]} (a data-subject request) and is kept suppressed"
        if entry.reason in RECIPIENT_REASONS:
            who = "opted out themselves" if entry.reason == Reason.UNSUBSCRIBE else "complained"
            return (
                f"{who} ({entry.scope}, {entry.reason} via {entry.source} since {entry.created_at})"
            )
    return None


def _delete_entries(
    db: Connection,
    keys: Sequence[str],
    scope: str | None,
    *,
    source: str,
    actor: str | None,
    detail: Mapping[str, Any] | None = None,
) -> int:
    """Delete the entries under `keys` (in `scope`, or all), each audited with what it was."""
    marks = ", ".join("?" * len(keys))
    rows = [
        Suppression(*row)
        for row in db.execute(
            f"SELECT {COLUMNS} FROM suppressions WHERE address_hash IN ({marks})",  # noqa: S608
            list(keys),
        )
        if scope is None or row[2] == scope
    ]
    now = utc_now()
    with zeroing(db):
        for entry in rows:
            db.execute(
                "DELETE FROM suppressions WHERE address_hash = ? AND scope = ?",
                [entry.address_hash, entry.scope],
            )
            audit.record(
                db,
                "remove",
                address_hash=entry.address_hash,
                scope=entry.scope,
                reason=entry.reason,
                source=source,
                actor=actor,
                detail={**(detail or {}), "previous": _previous(entry)},
                at=now,
            )
    return len(rows)


def _previous(entry: Suppression) -> dict[str, Any]:
    return {
        "reason": entry.reason,
        "source": entry.source,
        "created_at": entry.created_at,
        "expires_at": entry.expires_at,
    }


def _expire_batch(db: Connection, *, cutoff: str, batch: int) -> int:
    rows = [
        Suppression(*row)
        for row in db.execute(
            f"SELECT {COLUMNS} FROM suppressions"  # noqa: S608
            " WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?",
            [cutoff, batch],
        )
    ]
    now = utc_now()
    with zeroing(db):
        db.executemany(
            "DELETE FROM suppressions WHERE address_hash = ? AND scope = ?",
            [(entry.address_hash, entry.scope) for entry in rows],
        )
    audit.record_rows(
        db,
        [
            (
                now,
                "expire",
                entry.address_hash,
                entry.scope,
                entry.reason,
                "retention",
                None,
                audit.dumps({"previous": _previous(entry)}),
            )
            for entry in rows
        ],
    )
    return len(rows)


def remember_contacts(db: Connection, rows: list[tuple[str, str, str]]) -> None:
    db.executemany(
        "INSERT INTO contacts (address_hash, address, first_seen_at) VALUES (?, ?, ?)"
        " ON CONFLICT DO NOTHING",
        rows,
    )
