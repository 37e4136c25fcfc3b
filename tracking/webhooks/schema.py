"""The webhook outbox: its tables, and how webhooks get into it in the change's own
transaction.

Events: every writer (the HTTP app, the event process, the delivery processes, the CLI)
goes through `tracking.events.insert_events`, which queues the batch's webhooks with one
INSERT ... SELECT after inserting it (`queue_event_webhooks`): no per-row cost, and none at
all while no endpoint is configured.

Suppression changes are made by the suppression package, which knows nothing of webhooks:
triggers on its `suppressions` table queue them, guarded so that they cost one probe of an
empty table while nobody subscribes. The body's `data` is frozen when queued (a removed
entry leaves no row to read later); an erasure scrubs the address out of what is kept.
"""

from __future__ import annotations

import sqlite_utils

from suppression import Connection, Migration

# Unix time in SQLite, as the dispatcher's clock counts it (julianday is precise to the ms).
NOW = "((julianday('now') - 2440587.5) * 86400.0)"

_TABLES = [
    # What each configured endpoint wants, written by `serve` from the config file, read by
    # every process that records events or changes suppressions. type '*': every type.
    """CREATE TABLE webhook_subscriptions (
        type TEXT NOT NULL,
        url TEXT NOT NULL,
        give_up_after REAL NOT NULL,      -- seconds of retrying before a webhook fails
        PRIMARY KEY (type, url)
    ) WITHOUT ROWID""",
    # AUTOINCREMENT: an id is never handed out twice, even after old rows are swept.
    """CREATE TABLE webhook_outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        webhook_id TEXT NOT NULL UNIQUE,  -- the webhook-id header, the same on every try
        url TEXT NOT NULL,
        type TEXT NOT NULL,
        at TEXT NOT NULL,                 -- when it happened: the body's timestamp
        address_hash TEXT,                -- whom it is about, so an erasure can find it
        payload TEXT NOT NULL,            -- the body's data object (JSON)
        state TEXT NOT NULL DEFAULT 'pending',  -- pending | delivered | failed
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,         -- unix times from here on
        next_attempt_at REAL NOT NULL,
        expires_at REAL NOT NULL,         -- no retry after this: failed
        last_attempt_at REAL,
        last_status TEXT,                 -- 'HTTP 500', 'timeout', 'cannot connect: ...'
        delivered_at REAL
    )""",
    "CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at) WHERE state = 'pending'",
    """CREATE INDEX webhook_outbox_address ON webhook_outbox (address_hash)
        WHERE address_hash IS NOT NULL""",
    # Each endpoint's health, kept across restarts: failing since when, and why.
    """CREATE TABLE webhook_endpoints (
        url TEXT PRIMARY KEY,
        failing_since REAL,
        last_success_at REAL,
        last_failure_at REAL,
        last_status TEXT
    ) WITHOUT ROWID""",
]


def _create_tables(db: sqlite_utils.Database) -> None:
    for statement in _TABLES:
        db.execute(statement)


# With the event tables (tracking.events.MIGRATIONS): whoever writes events has them.
OUTBOX_MIGRATION = Migration("tracking/webhooks-0001-outbox", _create_tables)


# The event as `optout-relay events --format jsonl` prints it, less its type (the body's
# own): `machine` and `count` for opens and clicks only (the count as the webhook is
# queued: its first fetch), `detail` only when there is one. A test compares the two, so
# the shapes cannot drift apart.
_QUEUE_EVENTS = f"""
    INSERT INTO webhook_outbox
        (webhook_id, url, type, at, address_hash, payload, created_at, next_attempt_at,
         expires_at)
    SELECT 'msg_' || lower(hex(randomblob(16))), s.url, e.type, e.at, e.address_hash,
        (SELECT CASE WHEN e.detail IS NOT NULL THEN json_set(b, '$.detail', json(e.detail))
                     ELSE b END
         FROM (SELECT CASE WHEN e.type IN ('open', 'click')
                           THEN json_set(o, '$.machine',
                                         json(CASE WHEN e.machine THEN 'true' ELSE 'false' END),
                                         '$.count', e.count)
                           ELSE o END AS b
               FROM (SELECT json_object(
                         'at', e.at,
                         'recipient', (SELECT address FROM contacts c
                                       WHERE c.address_hash = e.address_hash),
                         'campaign', e.campaign,
                         'queue_id', e.queue_id,
                         'message_id', e.message_id) AS o))),
        {NOW}, {NOW}, {NOW} + s.give_up_after
    FROM events e JOIN webhook_subscriptions s ON s.type IN (e.type, '*')
    WHERE e.id > ?
    ORDER BY e.id
"""  # noqa: S608 - built from this module's constants


def queue_event_webhooks(db: Connection, after_id: int) -> None:
    """Queue the webhooks of the events with ids above `after_id` (just inserted, in the
    caller's transaction)."""
    if db.execute("SELECT EXISTS (SELECT 1 FROM webhook_subscriptions)").fetchone()[0]:
        db.execute(_QUEUE_EVENTS, [after_id])


_GUARD = "WHEN EXISTS (SELECT 1 FROM webhook_subscriptions)"


def _suppression_trigger(name: str, when: str, row: str, kind: str) -> str:
    return f"""
    CREATE TRIGGER {name} AFTER {when} ON suppressions {_GUARD}
    BEGIN
        INSERT INTO webhook_outbox
            (webhook_id, url, type, at, address_hash, payload, created_at, next_attempt_at,
             expires_at)
        SELECT 'msg_' || lower(hex(randomblob(16))), s.url, '{kind}',
            strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), {row}.address_hash,
            json_object('address', {row}.address, 'scope', {row}.scope,
                        'reason', {row}.reason, 'source', {row}.source,
                        'created_at', {row}.created_at, 'expires_at', {row}.expires_at),
            {NOW}, {NOW}, {NOW} + s.give_up_after
        FROM webhook_subscriptions s WHERE s.type IN ('{kind}', '*');
    END"""  # noqa: S608 - built from this module's constants


_TRIGGERS = [
    # REPLACE (a strengthened or renewed entry) is an insert here: recursive triggers are
    # off, so its implicit delete fires nothing. Expiry and removal are deletes.
    _suppression_trigger("webhook_suppression_added", "INSERT", "NEW", "suppression.added"),
    _suppression_trigger("webhook_suppression_removed", "DELETE", "OLD", "suppression.removed"),
    # An erased person's address leaves the webhooks still kept, sent or not.
    """CREATE TRIGGER webhook_erasure AFTER INSERT ON suppression_erasures
    BEGIN
        UPDATE webhook_outbox
        SET payload = json_replace(payload, '$.recipient', NULL, '$.address', NULL,
                                   '$.detail', NULL)
        WHERE address_hash = NEW.address_hash;
    END""",
]


def _create_triggers(db: sqlite_utils.Database) -> None:
    for statement in _TRIGGERS:
        db.execute(statement)


# On the suppression tables: applied where both packages' tables are (relay.stores).
MIGRATIONS = (Migration("tracking/webhooks-0002-suppression-triggers", _create_triggers),)
