"""The event log: what happened to each message and recipient, for marketers and auditors."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlite_utils

from suppression import (
    Connection,
    DataHolder,
    Dialect,
    Engine,
    EngineSpec,
    Migration,
    Subject,
    format_time,
    row_dicts,
    utc_now,
    zeroing,
)
from suppression.consent import CONSENT_MIGRATION

from .aggregate import (
    AGGREGATE_MIGRATION,
    AggregateHit,
    Counting,
    count_older_opens,
    keep_last_opens,
)
from .statistics.rollup import ROLLUP_MIGRATION, count_events, forget_reach, purge_reach
from .webhooks.schema import OUTBOX_MIGRATION, queue_event_webhooks


class EventType(StrEnum):
    OPEN = "open"
    CLICK = "click"
    UNSUBSCRIBE = "unsubscribe"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    SUPPRESSED = "suppressed"
    WARNING = "warning"  # about a message, e.g. a sender signature the rewrite breaks
    COMPLAINT = "complaint"  # a recipient reported a copy as spam (ARF)
    # A receiver refused the sender for policy (5.7.x, 4.7.x): never a suppression.
    POLICY_REFUSAL = "policy_refusal"
    # The front door refused a recipient at RCPT (550 5.7.1): no copy was ever made.
    REFUSED = "refused"
    # A recipient stopped individual tracking of their opens and clicks (preference page).
    TRACKING_WITHDRAWN = "tracking.withdrawn"
    HELD = "held"  # set aside in the spool (it crashed delivery, or its stored copy is damaged)


_MACHINE_VERDICT = {EventType.OPEN, EventType.CLICK}


@dataclass(frozen=True, slots=True)
class Others:
    """Every event type except these (retention's catch-all for types without a key)."""

    kept_apart: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Event:
    """`queue_id` is the relay's name for the message (the one tokens carry); `message_id`
    its RFC 5322 Message-ID. An event that has the queue id but not the Message-ID (an open,
    a click: tokens stay small and carry no header text) gets it when it is recorded, from
    an earlier event of the same message that had both.

    `repeat_key` (opens and clicks): fetches with the same key are one event, counted, while
    they come within `record_fetches`' window of its first."""

    type: EventType
    address_hash: str | None
    campaign: str | None = None
    queue_id: str | None = None
    machine: bool | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)
    at: str = field(default_factory=utc_now)
    message_id: str | None = None
    # Opens and clicks: what makes two fetches the same one (`record_fetches`).
    repeat_key: str | None = None


def _create_events(db: sqlite_utils.Database) -> None:
    db.table("events").create(
        {
            "id": int,
            "type": str,
            "at": str,
            "address_hash": str,
            "campaign": str,
            "message_id": str,
            "machine": int,
            "detail": str,
        },
        pk="id",
        not_null={"type", "at"},
    )
    db.table("events").create_index(["at"])
    db.table("events").create_index(["address_hash"])
    db.table("events").create_index(["campaign", "type"])


_QUEUE_AND_MESSAGE_IDS = [
    # Until now message_id held the relay's queue id: it moves to its own column, and
    # message_id is the RFC 5322 Message-ID, unknown for events recorded before.
    "ALTER TABLE events ADD COLUMN queue_id TEXT",
    "UPDATE events SET queue_id = message_id, message_id = NULL",
    "CREATE INDEX events_queue_id ON events (queue_id)",
    # queue id -> Message-ID, for events whose token names only the queue id. A row per
    # message (not per recipient), so it outlives the purge of the events that brought it.
    """CREATE TABLE event_messages (
        queue_id TEXT PRIMARY KEY,
        message_id TEXT NOT NULL,
        at TEXT NOT NULL
    ) WITHOUT ROWID""",
]


def _queue_and_message_ids(db: sqlite_utils.Database) -> None:
    for statement in _QUEUE_AND_MESSAGE_IDS:
        db.execute(statement)


# How far events copied from another store's journal (the spool's) have been recorded.
_EVENT_SOURCES = "CREATE TABLE event_sources (source TEXT PRIMARY KEY, through INTEGER NOT NULL)"


def _create_event_sources(db: sqlite_utils.Database) -> None:
    db.execute(_EVENT_SOURCES)


_REPEATED_FETCHES = [
    # A fetch repeated within the window adds to its event's count (and moves last_at)
    # instead of adding a row: a replayed pixel URL costs an UPDATE, not a row per fetch.
    "ALTER TABLE events ADD COLUMN repeat_key TEXT",
    "ALTER TABLE events ADD COLUMN count INTEGER NOT NULL DEFAULT 1",
    "ALTER TABLE events ADD COLUMN last_at TEXT",
    "CREATE INDEX events_repeats ON events (repeat_key, at) WHERE repeat_key IS NOT NULL",
]


def _repeated_fetches(db: sqlite_utils.Database) -> None:
    for statement in _REPEATED_FETCHES:
        db.execute(statement)


# The same steps on PostgreSQL. The index on `at` holds the id too: pages are read in
# (at, id) order, which SQLite's index has by its rowid.
_PG_EVENTS = [
    """CREATE TABLE events (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        type TEXT NOT NULL,
        at TEXT NOT NULL,
        address_hash TEXT,
        campaign TEXT,
        message_id TEXT,
        machine INTEGER,
        detail TEXT
    )""",
    "CREATE INDEX idx_events_at ON events (at, id)",
    "CREATE INDEX idx_events_address_hash ON events (address_hash)",
    "CREATE INDEX idx_events_campaign_type ON events (campaign, type)",
]
_PG_QUEUE_AND_MESSAGE_IDS = [
    "ALTER TABLE events ADD COLUMN queue_id TEXT",
    "CREATE INDEX events_queue_id ON events (queue_id)",
    """CREATE TABLE event_messages (
        queue_id TEXT PRIMARY KEY,
        message_id TEXT NOT NULL,
        at TEXT NOT NULL
    )""",
]
_PG_REPEATED_FETCHES = [
    "ALTER TABLE events ADD COLUMN repeat_key TEXT",
    "ALTER TABLE events ADD COLUMN count INTEGER NOT NULL DEFAULT 1",
    "ALTER TABLE events ADD COLUMN last_at TEXT",
    "CREATE INDEX events_repeats ON events (repeat_key, at) WHERE repeat_key IS NOT NULL",
]

# The counts and the webhook outbox come with the events: whoever writes events has them.
MIGRATIONS = (
    Migration("tracking/0001-events", _create_events, _PG_EVENTS),
    Migration(
        "tracking/0002-queue-and-message-ids", _queue_and_message_ids, _PG_QUEUE_AND_MESSAGE_IDS
    ),
    Migration("tracking/0003-repeated-fetches", _repeated_fetches, _PG_REPEATED_FETCHES),
    ROLLUP_MIGRATION,
    OUTBOX_MIGRATION,
    # Read when an open arrives (a withdrawal reaches mail already sent), and the counts
    # of opens and clicks that name nobody.
    CONSENT_MIGRATION,
    AGGREGATE_MIGRATION,
    Migration(
        "tracking/0004-event-sources",
        _create_event_sources,
        postgresql=[_EVENT_SOURCES.replace("INTEGER", "BIGINT")],
    ),
)

PAGE_SIZE = 1000
PURGE_BATCH = 10_000


# What retention deletes, or counts for a dry run (True). An `Others` purge names the kinds
# it keeps apart as one JSON array parameter ({json_each}: the engine's spelling).
_EVENTS_OF_KIND = {
    False: "DELETE FROM events WHERE id IN (SELECT id FROM events"
    " WHERE at < ? AND type = ? LIMIT ?)",
    True: "SELECT count(*) FROM events WHERE at < ? AND type = ?",
}
_EVENTS_OF_OTHER_KINDS = {
    False: "DELETE FROM events WHERE id IN (SELECT id FROM events"
    " WHERE at < ? AND type NOT IN (SELECT value FROM {json_each}) LIMIT ?)",
    True: "SELECT count(*) FROM events"
    " WHERE at < ? AND type NOT IN (SELECT value FROM {json_each})",
}
_UNUSED_CONTACTS = {
    False: "DELETE FROM contacts WHERE address_hash IN (SELECT c.address_hash"
    " FROM contacts c WHERE c.first_seen_at < ? AND NOT EXISTS (SELECT 1"
    " FROM events e WHERE e.address_hash = c.address_hash AND e.at >= ?) LIMIT ?)",
    True: "SELECT count(*) FROM contacts c WHERE c.first_seen_at < ? AND NOT EXISTS"
    " (SELECT 1 FROM events e WHERE e.address_hash = c.address_hash AND e.at >= ?)",
}


class EventStore:
    def __init__(self, db: Engine) -> None:
        self._db = db

    @property
    def spec(self) -> EngineSpec:
        """How another process opens the same database (SQLite's WAL, or the server)."""
        return self._db.spec

    async def record(self, *events: Event) -> None:
        await self._db.write(lambda db: insert_events(db, events))

    async def record_fetches(
        self,
        events: Sequence[Event | AggregateHit],
        window: timedelta,
        counting: Counting | None = None,
    ) -> None:
        """Record opens and clicks, in one transaction: a fetch whose `repeat_key` has an
        event begun less than `window` before it adds to that event's count; the others are
        new rows. The window is read from the rows themselves, so it holds across batches,
        processes and restarts (a batch resent after a lost acknowledgement adds to counts,
        never rows). Aggregate hits, and the fetches of recipients who withdrew, are only
        counted (`counting`, tracking.aggregate)."""
        sort = counting or Counting(window)
        counted = await self._db.write(lambda db: _record_fetches(db, events, window, sort))
        sort.recent.remember(counted)

    async def record_from(self, source: str, through: int, events: Iterable[Event]) -> None:
        """Record events copied from `source`'s journal, whose entries up to `through` they
        are, exactly once: a copy repeated after a crash (entries not yet dropped from the
        journal) is not recorded again."""
        batch = list(events)

        def insert(db: Connection) -> None:
            if _recorded_through(db, source) >= through:
                return
            insert_events(db, batch)
            db.execute(
                "INSERT INTO event_sources (source, through) VALUES (?, ?)"
                " ON CONFLICT (source) DO UPDATE SET through = excluded.through",
                [source, through],
            )

        await self._db.write(insert)

    async def recorded_through(self, source: str) -> int:
        """The last journal entry of `source` recorded here (0: none)."""
        return await self._db.read(lambda db: _recorded_through(db, source))

    async def export(self, only: EventFilter | None = None) -> AsyncGenerator[dict[str, Any], None]:
        """Every event (or those `only` picks), oldest first, as the documented JSON object
        (recipient resolved), a page per read."""
        after: tuple[str, int] = ("", 0)
        while True:
            rows = await self._db.read(
                functools.partial(_page, after=after, only=only or EventFilter())
            )
            for row in rows:
                yield _as_public(row)
            if len(rows) < PAGE_SIZE:
                return
            after = (rows[-1]["at"], rows[-1]["id"])

    async def for_recipient(self, address_hash: str) -> list[dict[str, Any]]:
        """Every event about one recipient, oldest first, as the public JSON objects."""
        rows = await self._db.read(functools.partial(_recipient_rows, address_hash=address_hash))
        return [_as_public(row) for row in rows]

    async def erase_recipient(
        self, address_hash: str, mentions: Callable[[str], bool] = lambda _text: False
    ) -> int:
        """Anonymise a recipient's events (erasure): campaign counts stay, the person goes.

        The hash is removed, and so is the detail, which may quote the address (a bounce
        reply often does), and a Message-ID that `mentions` the person (some senders put
        the recipient in it). The number of events anonymised.
        """

        def unlink(db: Connection) -> int:
            with zeroing(db):
                forget_reach(db, address_hash)
                quoting = {
                    queue_id
                    for queue_id, message_id in db.execute(
                        "SELECT DISTINCT queue_id, message_id FROM events"
                        " WHERE address_hash = ? AND message_id IS NOT NULL",
                        [address_hash],
                    )
                    if queue_id is not None and mentions(message_id)
                }
                for queue_id in quoting:
                    db.execute("UPDATE events SET message_id = NULL WHERE queue_id = ?", [queue_id])
                    db.execute("DELETE FROM event_messages WHERE queue_id = ?", [queue_id])
                return int(
                    db.execute(
                        "UPDATE events SET address_hash = NULL, detail = NULL,"
                        " repeat_key = NULL WHERE address_hash = ?",
                        [address_hash],
                    ).rowcount
                )

        return await self._db.write(unlink)

    def holder(self) -> DataHolder:
        """This store's part in data-subject exports and erasures: events are anonymised,
        not deleted (they still count in their campaign's figures)."""

        async def export(subject: Subject) -> list[dict[str, Any]]:
            return await self.for_recipient(subject.address_hash)

        async def erase(subject: Subject) -> int:
            return await self.erase_recipient(subject.address_hash, subject.mentioned_in)

        return DataHolder("events", export, erase, effect="anonymised")

    async def purge(
        self, kind: EventType | str | Others, older_than: datetime, *, dry_run: bool = False
    ) -> int:
        """Delete events of `kind` (or of every kind but some: `Others`) from before
        `older_than`, a bounded batch per transaction; the number deleted. `dry_run`: only
        count them."""
        params: list[object] = [format_time(older_than)]
        if isinstance(kind, Others):
            sql = _EVENTS_OF_OTHER_KINDS[dry_run].format(json_each=self._db.dialect.json_each)
            params.append(json.dumps(kind.kept_apart))
        else:
            sql = _EVENTS_OF_KIND[dry_run]
            params.append(str(kind))
        if dry_run:
            return await self._count(sql, params)
        return await self._purge(sql, [*params, PURGE_BATCH])

    async def keep_last_opens(self, *, dry_run: bool = False) -> int:
        """Each recipient's opens of a campaign down to one event with the day of the last
        (tracking.keep_last_open_only); how many events that deletes (`dry_run`: would)."""
        if dry_run:
            return await self._db.read(count_older_opens)
        return await self._db.write(keep_last_opens)

    async def purge_firsts(self, kind: str, older_than: datetime) -> int:
        """The statistics' record of whose first open (click) was counted goes with the
        events it stands for."""
        cutoff = format_time(older_than)
        total = 0
        while True:
            removed = await self._db.write(
                functools.partial(purge_reach, kind=kind, older_than=cutoff, limit=PURGE_BATCH)
            )
            total += removed
            if removed < PURGE_BATCH:
                return total

    async def purge_contacts(self, older_than: datetime, *, dry_run: bool = False) -> int:
        """Forget addresses first seen before `older_than` with no event since then.

        contacts belongs to the suppression package; the rule needs the events, so it lives
        here. A suppression keeps its own copy of the address, so nothing stops matching.
        """
        cutoff = format_time(older_than)
        if dry_run:
            return await self._count(_UNUSED_CONTACTS[True], [cutoff, cutoff])
        return await self._purge(_UNUSED_CONTACTS[False], [cutoff, cutoff, PURGE_BATCH])

    async def purge_message_ids(self, older_than: datetime) -> int:
        """Forget the Message-IDs of messages sent before `older_than`: no token of theirs
        can bring an event back any more."""
        sql = (
            "DELETE FROM event_messages WHERE queue_id IN (SELECT queue_id"
            " FROM event_messages WHERE at < ? LIMIT ?)"
        )
        return await self._purge(sql, [format_time(older_than), PURGE_BATCH])

    async def _count(self, sql: str, params: list[object]) -> int:
        return int(await self._db.read(lambda db: db.execute(sql, params).fetchone()[0]))

    async def _purge(self, sql: str, params: list[object]) -> int:
        """Repeat a bounded DELETE until a batch comes back short: short write transactions
        that `serve` can interleave with its own writes."""

        def delete(db: Connection) -> int:
            with zeroing(db):
                return int(db.execute(sql, params).rowcount)

        total = 0
        while True:
            removed = await self._db.write(delete)
            total += removed
            if removed < PURGE_BATCH:
                return total


# contacts belongs to the suppression package; an erased contact shows as null.
_EVENT_ROWS = (
    "SELECT e.id, e.type, e.at, c.address AS recipient, e.campaign, e.queue_id,"
    " e.message_id, e.machine, e.detail, e.count, e.last_at"
    " FROM events e LEFT JOIN contacts c USING (address_hash)"
)


def _recipient_rows(db: Connection, *, address_hash: str) -> list[dict[str, Any]]:
    cursor = db.execute(f"{_EVENT_ROWS} WHERE e.address_hash = ? ORDER BY e.id", [address_hash])
    return row_dicts(cursor)


def _recorded_through(db: Connection, source: str) -> int:
    row = db.execute("SELECT through FROM event_sources WHERE source = ?", [source]).fetchone()
    return 0 if row is None else int(row[0])


def insert_events(db: Connection, events: Iterable[Event]) -> None:
    """Insert, then what follows from the batch in the same transaction: its counts and
    its webhooks (one statement each for the whole batch)."""
    after = _last_id(db)
    _insert_rows(db, events)
    _follow_up(db, after)


def _last_id(db: Connection) -> int:
    return int(db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])


def _follow_up(db: Connection, after: int) -> None:
    """The counts and the webhooks of the rows inserted after id `after` (one batch)."""
    count_events(db, after)
    queue_event_webhooks(db, after)


def _insert_rows(db: Connection, events: Iterable[Event]) -> None:
    events = list(events)
    known = {e.queue_id: (e.queue_id, e.message_id, e.at) for e in events if e.message_id}
    for queue_id, row in known.items():
        if queue_id is None:
            continue
        learnt = db.execute(
            "INSERT INTO event_messages (queue_id, message_id, at) VALUES (?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            row,
        ).rowcount
        if learnt:
            # An open can be written before its copy's delivered event (that one waits in
            # the spool's journal): it gets the Message-ID now.
            db.execute(
                "UPDATE events SET message_id = ? WHERE queue_id = ? AND message_id IS NULL",
                [row[1], queue_id],
            )
    db.executemany(
        "INSERT INTO events (type, at, address_hash, campaign, queue_id, message_id, machine,"
        " detail, repeat_key) VALUES (?, ?, ?, ?, ?, COALESCE(?, (SELECT message_id FROM"
        " event_messages WHERE queue_id = ?)), ?, ?, ?)",
        [
            (
                str(e.type),
                e.at,
                e.address_hash,
                e.campaign,
                e.queue_id,
                e.message_id,
                None if e.message_id is not None else e.queue_id,
                None if e.machine is None else int(e.machine),
                json.dumps(dict(e.detail), separators=(",", ":")) if e.detail else None,
                e.repeat_key,
            )
            for e in events
        ],
    )


# The event a fetch at time T repeats: the latest of its key begun in (T - window, T];
# else the first begun in (T, T + window), met first: fetches answered by several HTTP
# processes (tracking.hub) reach the writer in an order a little off their own.
_FIND_REPEATED = (
    "SELECT id, at FROM events WHERE repeat_key = ? AND at > ? AND at <= ? ORDER BY at DESC LIMIT 1"
)
_FIND_REPEATED_LATER = (
    "SELECT id, at FROM events WHERE repeat_key = ? AND at > ? AND at < ? ORDER BY at LIMIT 1"
)
_COUNT_REPEATS = (
    "UPDATE events SET count = count + ?, last_at = {greatest}(coalesce(last_at, at), ?)"
    " WHERE id = ?"
)


def _record_fetches(
    db: Connection,
    items: Sequence[Event | AggregateHit],
    window: timedelta,
    counting: Counting,
) -> list[tuple[bytes, float]]:
    events, counted = counting.sort(db, items)
    if events:
        _insert_or_count(db, events, window)
        counting.after_insert(db, events)
    return counted


def _insert_or_count(db: Connection, events: Sequence[Event], window: timedelta) -> None:
    """`EventStore.record_fetches` in the database thread. Each fetch, in order, finds the
    event it repeats (met earlier in this batch, else one indexed lookup) or becomes a new
    row; the counts are added at the end, one UPDATE per event repeated: a replay flood
    arrives in batches of one key, and costs one lookup and one UPDATE per batch."""
    after = _last_id(db)
    plain = [event for event in events if event.repeat_key is None]
    if plain:
        _insert_rows(db, plain)
    met: dict[str, tuple[int, datetime]] = {}  # key -> (row id, when its event began)
    added: dict[int, tuple[int, str]] = {}  # row id -> (fetches to add, the latest)
    for event in events:
        key = event.repeat_key
        if key is None:
            continue
        moment = datetime.fromisoformat(event.at)
        row = met.get(key)
        if row is None or not -window < moment - row[1] < window:
            since = format_time(moment - window)
            found = db.execute(_FIND_REPEATED, [key, since, event.at]).fetchone()
            if found is None:
                until = format_time(moment + window)
                found = db.execute(_FIND_REPEATED_LATER, [key, event.at, until]).fetchone()
            if found is None:
                _insert_rows(db, [event])
                met[key] = (_last_id(db), moment)  # writes are serialised: the row just added
                continue
            row = met[key] = (found[0], datetime.fromisoformat(found[1]))
        count, last = added.get(row[0], (0, event.at))
        added[row[0]] = (count + 1, max(last, event.at))
    if added:
        db.executemany(
            _COUNT_REPEATS.format(greatest=db.dialect.greatest),
            [(count, last, row_id) for row_id, (count, last) in added.items()],
        )
    _follow_up(db, after)  # the new rows only: a repeat is no new event


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events an export gives: `since` (inclusive) and `until` (exclusive) in the
    events' time format (`format_time`), types and campaigns (any of them; empty: all)."""

    since: str | None = None
    until: str | None = None
    types: tuple[str, ...] = ()
    campaigns: tuple[str, ...] = ()

    def where(self, dialect: Dialect) -> tuple[str, list[object]]:
        """SQL conditions (fixed text, `?` placeholders only) and their parameters."""
        conditions: list[str] = []
        params: list[object] = []
        if self.since is not None:
            conditions.append("e.at >= ?")
            params.append(self.since)
        if self.until is not None:
            conditions.append("e.at < ?")
            params.append(self.until)
        if self.types:
            conditions.append(f"e.type IN (SELECT value FROM {dialect.json_each})")  # noqa: S608
            params.append(json.dumps(list(self.types)))
        if self.campaigns:
            conditions.append(f"e.campaign IN (SELECT value FROM {dialect.json_each})")  # noqa: S608
            params.append(json.dumps(list(self.campaigns)))
        return "".join(f" AND {condition}" for condition in conditions), params


def _page(db: Connection, *, after: tuple[str, int], only: EventFilter) -> list[dict[str, Any]]:
    # Ordered by time along the index on `at` (the row id breaks ties, and is in it): a page
    # begins where the last one ended, whatever the filter, without sorting what it skips.
    where, params = only.where(db.dialect)
    cursor = db.execute(
        f"{_EVENT_ROWS} WHERE (e.at, e.id) > (?, ?){where} ORDER BY e.at, e.id LIMIT ?",
        [*after, *params, PAGE_SIZE],
    )
    return row_dicts(cursor)


def _as_public(row: dict[str, Any]) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": row["type"],
        "at": row["at"],
        "recipient": row["recipient"],
        "campaign": row["campaign"],
        "queue_id": row["queue_id"],
        "message_id": row["message_id"],
    }
    if row["type"] in _MACHINE_VERDICT:
        event["machine"] = bool(row["machine"])
        event["count"] = row["count"]  # fetches within the repeat window, this one included
        if row["last_at"] is not None:
            event["last_at"] = row["last_at"]
    if row["detail"]:
        event["detail"] = json.loads(row["detail"])
    return event
