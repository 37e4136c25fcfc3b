"""The spool's tables and their migrations."""

from __future__ import annotations

import sqlite_utils

from suppression import Migration


def _create_spool(db: sqlite_utils.Database) -> None:
    db.table("messages").create(
        {
            "queue_id": str,
            "mail_from": str,
            "received_at": str,
            "client": str,
            "size": int,
            "content": bytes,
        },
        pk="queue_id",
        not_null={"mail_from", "received_at", "content"},
    )
    db.table("deliveries").create(
        {
            "id": int,
            "queue_id": str,
            "recipient": str,
            "attempts": int,
            "next_attempt_at": float,
            "last_reply": str,
        },
        pk="id",
        foreign_keys=[("queue_id", "messages", "queue_id")],
        not_null={"queue_id", "recipient", "attempts", "next_attempt_at"},
        defaults={"attempts": 0},
    )
    db.table("deliveries").create_index(["next_attempt_at"])
    db.table("deliveries").create_index(["queue_id"])


def _add_kind_and_arrival(db: sqlite_utils.Database) -> None:
    # kind: "mail" is decorated per recipient; "dsn" (our own reports) goes out as it is.
    db.execute("ALTER TABLE messages ADD COLUMN kind TEXT NOT NULL DEFAULT 'mail'")
    db.execute("ALTER TABLE messages ADD COLUMN received_ts REAL")
    db.execute("UPDATE messages SET received_ts = (julianday(received_at) - 2440587.5) * 86400.0")


def _add_account(db: sqlite_utils.Database) -> None:
    # The authenticated sender account, whose defaults (topic, tracking) apply at delivery.
    db.execute("ALTER TABLE messages ADD COLUMN account TEXT")


def _add_safety(db: sqlite_utils.Database) -> None:
    # digest: SHA-256 of content as accepted (NULL for mail accepted before this column),
    # checked before delivery. crashes: delivery processes that died while working on the
    # message. held_at/held_reason: set aside, by the relay or by the operator.
    db.execute("ALTER TABLE messages ADD COLUMN digest TEXT")
    db.execute("ALTER TABLE messages ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE messages ADD COLUMN held_at TEXT")
    db.execute("ALTER TABLE messages ADD COLUMN held_reason TEXT")
    # Outcomes (events) written in the same transaction as the spool change they describe,
    # and copied to the event log from here: a full or failing optout.db never keeps a
    # delivered copy in the spool.
    db.execute(
        "CREATE TABLE journal (id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " queue_id TEXT NOT NULL, record TEXT NOT NULL)"
    )
    # accepted: how many messages the spool ever took; its high-water mark is also kept
    # outside the database, to notice acknowledged messages lost from the WAL. identity:
    # this spool's name where several nodes' spools record into one shared event log.
    db.execute("CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    db.execute("INSERT INTO counters (name, value) VALUES ('accepted', 0)")
    db.execute("INSERT INTO counters (name, value) VALUES ('identity', abs(random()))")


MIGRATIONS = (
    Migration("spool/0001-messages-and-deliveries", _create_spool),
    Migration("spool/0002-kind-and-arrival-time", _add_kind_and_arrival),
    Migration("spool/0003-account", _add_account),
    Migration("spool/0004-digest-holds-journal-counters", _add_safety),
)
