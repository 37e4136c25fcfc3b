"""The suppression tables, as one-time migrations (an applied migration is never edited)."""

from __future__ import annotations

import sqlite_utils

from . import audit
from .addresses import DEFAULT_POLICY
from .consent import CONSENT_MIGRATION
from .database import Migration, SqliteConnection, utc_now
from .reasons import stronger


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


_KEYS_EXPIRY_AUDIT = [
    # Every change, keyed by hash and never by plain address, so it outlives an erasure.
    """CREATE TABLE suppression_audit (
        id INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        action TEXT NOT NULL,        -- add, strengthen, remove, expire, import, erase, ...
        address_hash TEXT,           -- NULL for a whole-import summary
        scope TEXT,
        reason TEXT,
        source TEXT,                 -- what: cli, one-click, page, import:FILE, erasure, ...
        actor TEXT,                  -- who: an operator, when known
        detail TEXT                  -- JSON
    )""",
    "CREATE INDEX suppression_audit_hash ON suppression_audit (address_hash)",
    """CREATE TRIGGER suppression_audit_no_update BEFORE UPDATE ON suppression_audit
        BEGIN SELECT RAISE(ABORT, 'the suppression audit log is append-only'); END""",
    """CREATE TRIGGER suppression_audit_no_delete BEFORE DELETE ON suppression_audit
        BEGIN SELECT RAISE(ABORT, 'the suppression audit log is append-only'); END""",
    # Entries made before the audit log existed get their creation recorded as it was.
    """INSERT INTO suppression_audit (at, action, address_hash, scope, reason, source, detail)
        SELECT created_at, 'add', address_hash, scope, reason, source, '{"migrated":true}'
        FROM suppressions ORDER BY created_at, rowid""",
    # WITHOUT ROWID: the entry lives in the primary-key B-tree itself, so a check is one
    # index probe and an import writes one random-keyed B-tree instead of two.
    """CREATE TABLE suppressions_v2 (
        address_hash TEXT NOT NULL,  -- HMAC key, or md5:/sha256: of an imported hashed list
        scope TEXT NOT NULL,
        address TEXT,                -- plain address while the person's data is kept
        reason TEXT NOT NULL,
        source TEXT NOT NULL,
        created_at TEXT NOT NULL,
        expires_at TEXT,             -- soft reasons only; NULL is for ever
        updated_at TEXT NOT NULL,
        added_by INTEGER NOT NULL,   -- the audit record of its creation; creation order
        PRIMARY KEY (address_hash, scope)
    ) WITHOUT ROWID""",
    """INSERT INTO suppressions_v2
        SELECT s.address_hash, s.scope, s.address, s.reason, s.source, s.created_at, NULL,
            s.created_at, a.id
        FROM suppressions s JOIN suppression_audit a
            ON a.address_hash = s.address_hash AND a.scope = s.scope""",
    "DROP TABLE suppressions",
    "ALTER TABLE suppressions_v2 RENAME TO suppressions",
    """CREATE INDEX suppressions_expires_at ON suppressions (expires_at)
        WHERE expires_at IS NOT NULL""",
    # Keys whose person was erased: new entries for them never store a plain address again.
    """CREATE TABLE suppression_erasures (
        address_hash TEXT PRIMARY KEY,
        erased_at TEXT NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE suppression_settings (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID""",
]


def _keys_expiry_audit(db: sqlite_utils.Database) -> None:
    for statement in _KEYS_EXPIRY_AUDIT:
        db.execute(statement)
    # Keys made before normalisation was configurable were made with the default policy.
    existing = db.execute(
        "SELECT EXISTS (SELECT 1 FROM suppressions) OR EXISTS (SELECT 1 FROM contacts)"
    ).fetchone()[0]
    if existing:
        db.execute(
            "INSERT INTO suppression_settings (name, value) VALUES ('normalization', ?)",
            [DEFAULT_POLICY.describe()],
        )


def _canonical_scopes(db: SqliteConnection) -> None:
    """Entries stored under a scope with a trailing newline (the old check let one through)
    never matched their scope: move each to the canonical scope, merged with an entry
    already there as a new entry would be (stronger reason, earliest start), audited."""
    now = utc_now()
    broken = db.execute(
        "SELECT address_hash, scope, reason, created_at, expires_at FROM suppressions"
        " WHERE scope GLOB '*[' || char(9, 10, 13, 32) || ']*'"
    ).fetchall()
    for key, scope, reason, created_at, expires_at in broken:
        canonical = "".join(scope.split())
        there = db.execute(
            "SELECT reason, created_at, expires_at FROM suppressions"
            " WHERE address_hash = ? AND scope = ?",
            [key, canonical],
        ).fetchone()
        if there is None:
            db.execute(
                "UPDATE suppressions SET scope = ?, updated_at = ?"
                " WHERE address_hash = ? AND scope = ?",
                [canonical, now, key, scope],
            )
        else:
            db.execute(
                "UPDATE suppressions SET reason = ?, created_at = ?, expires_at = ?,"
                " updated_at = ? WHERE address_hash = ? AND scope = ?",
                [
                    stronger(there[0], reason),
                    min(there[1], created_at),
                    None if there[2] is None or expires_at is None else max(there[2], expires_at),
                    now,
                    key,
                    canonical,
                ],
            )
            db.execute(
                "DELETE FROM suppressions WHERE address_hash = ? AND scope = ?", [key, scope]
            )
        audit.record(
            db,
            "repair",
            address_hash=key,
            scope=canonical,
            reason=reason,
            source="migration",
            detail={"stored_scope": scope},
            at=now,
        )


# The same steps on PostgreSQL. Its tables are made by these, never by an older version, so
# the SQLite steps that rebuild a table or repair old rows are plain changes here (or none).
_PG_CREATE_TABLES = [
    """CREATE TABLE suppressions (
        address_hash TEXT NOT NULL,
        scope TEXT NOT NULL,
        address TEXT,
        reason TEXT NOT NULL,
        source TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (address_hash, scope)
    )""",
    "CREATE INDEX idx_suppressions_address ON suppressions (address)",
    """CREATE TABLE contacts (
        address_hash TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        first_seen_at TEXT NOT NULL
    )""",
]
_PG_KEYS_EXPIRY_AUDIT = [
    """CREATE TABLE suppression_audit (
        id BIGINT PRIMARY KEY,       -- given by the writer (audit.next_id), never a sequence
        at TEXT NOT NULL,
        action TEXT NOT NULL,
        address_hash TEXT,
        scope TEXT,
        reason TEXT,
        source TEXT,
        actor TEXT,
        detail TEXT
    )""",
    "CREATE INDEX suppression_audit_hash ON suppression_audit (address_hash)",
    """CREATE FUNCTION suppression_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'the suppression audit log is append-only'; END $$""",
    """CREATE TRIGGER suppression_audit_no_update BEFORE UPDATE OR DELETE ON suppression_audit
        FOR EACH ROW EXECUTE FUNCTION suppression_audit_append_only()""",
    """CREATE TRIGGER suppression_audit_no_truncate BEFORE TRUNCATE ON suppression_audit
        FOR EACH STATEMENT EXECUTE FUNCTION suppression_audit_append_only()""",
    "DROP INDEX idx_suppressions_address",
    """ALTER TABLE suppressions
        ADD COLUMN expires_at TEXT,
        ADD COLUMN updated_at TEXT NOT NULL,
        ADD COLUMN added_by BIGINT NOT NULL""",
    """CREATE INDEX suppressions_expires_at ON suppressions (expires_at)
        WHERE expires_at IS NOT NULL""",
    # Listing pages by creation order (SuppressionStore.entries): no cursor is kept
    # between reads on a server.
    "CREATE INDEX suppressions_added_by ON suppressions (added_by)",
    """CREATE TABLE suppression_erasures (
        address_hash TEXT PRIMARY KEY,
        erased_at TEXT NOT NULL
    )""",
    """CREATE TABLE suppression_settings (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
]

_PG_SHARED_KEYS = [
    """CREATE TABLE shared_keys (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""",
]


def _no_change(db: SqliteConnection) -> None:
    """A step for the other engine only."""


MIGRATIONS = (
    Migration("suppression/0001-suppressions-and-contacts", _create_tables, _PG_CREATE_TABLES),
    Migration("suppression/0002-keys-expiry-audit", _keys_expiry_audit, _PG_KEYS_EXPIRY_AUDIT),
    # Scopes were checked before any PostgreSQL store existed: nothing to repair there.
    Migration("suppression/0003-canonical-scopes", _canonical_scopes, ()),
    # The keys every node must agree on (address hash, signing), made once by whichever
    # node comes first (relay/stores.py). An SQLite store keeps them in files beside it.
    Migration("suppression/0004-shared-keys", _no_change, _PG_SHARED_KEYS),
    CONSENT_MIGRATION,
)
