"""The feedback tables, in the store database next to the suppressions and events they
change: a report's effects and its being marked processed commit in one transaction, so a
report is processed exactly once in effect, whatever crashes when."""

from __future__ import annotations

import sqlite_utils

from suppression import Migration

_TABLES = [
    # One row per copy sent with feedback on: what its addresses at the feedback domain
    # name (tokens.py). WITHOUT ROWID: a lookup by copy id is one B-tree probe.
    """CREATE TABLE feedback_copies (
        copy_id BLOB PRIMARY KEY,       -- 8 octets, tokens.copy_id
        address_hash TEXT NOT NULL,     -- the recipient's keyed hash
        queue_id TEXT NOT NULL,
        message_id TEXT,                -- the message's RFC 5322 Message-ID, when it has one
        campaign TEXT,
        scope TEXT NOT NULL,            -- what an unsubscribe through this copy covers
        account TEXT,
        recipient_domain TEXT,          -- policy refusals are counted per receiving domain
        created_at TEXT NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX feedback_copies_created_at ON feedback_copies (created_at)",
    "CREATE INDEX feedback_copies_address_hash ON feedback_copies (address_hash)",
    # What the feedback listener accepted: committed before its 250, processed from here.
    """CREATE TABLE feedback_reports (
        id INTEGER PRIMARY KEY,
        received_at TEXT NOT NULL,
        client TEXT,
        mail_from TEXT NOT NULL,        -- '' for the null sender
        recipients TEXT NOT NULL,       -- JSON array of the envelope recipients
        size INTEGER NOT NULL,
        content BLOB,
        state TEXT NOT NULL DEFAULT 'new',  -- new, done (acted on), kept (for the operator)
        processed_at TEXT,
        outcome TEXT                    -- JSON: what was found and done
    )""",
    "CREATE INDEX feedback_reports_new ON feedback_reports (id) WHERE state = 'new'",
    "CREATE INDEX feedback_reports_received_at ON feedback_reports (received_at)",
]


def _create(db: sqlite_utils.Database) -> None:
    for statement in _TABLES:
        db.execute(statement)


MIGRATIONS = (Migration("feedback/0001-copies-and-reports", _create),)
