"""Opens and clicks counted without naming anyone: per campaign, sending domain, day and
machine verdict (`aggregate_counts`), and nothing else.

An aggregate pixel or link (tracking.tokens: one URL for every copy of a message, with no
recipient, copy or queue id in it) becomes an `AggregateHit`. So does the open or click of a
recipient who withdrew from that purpose, whatever their copy's URL says: the recorder asks
the consent table when the fetch is written (`Counting.sort`), so a withdrawal reaches mail
already sent. A hit adds one to a counter and writes no other row: no event, no contact, no
message id, no statistics reach, no webhook, no repeat key.

Repeats: a replayed or reloaded aggregate URL cannot be told apart by recipient, so fetches
of one URL by one client (its network and user agent) with one verdict within the repeat
window count once, as individual fetches of one copy do on their event's row. That memory
is a keyed digest (a key made at random per process) held in memory only, for the window,
never written; a restarted process forgets it (at worst a repeat counts twice).
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from suppression import Migration, Purpose, zeroing
from suppression.consent import withdrawn_among
from suppression.database import SqliteConnection
from suppression.engine import Connection

if TYPE_CHECKING:
    from .events import Event

NO_CAMPAIGN = ""  # as the statistics rollup names mail without a campaign
UNKNOWN_DOMAIN = ""
# Digests of recent aggregate fetches held at most (12 octets each and a dict entry): a
# flood of distinct clients past this forgets the oldest, so some repeats count twice.
RECENT_LIMIT = 100_000
# The key of repeat digests: never written anywhere. A relay's HTTP worker processes take
# the main one's (`use_digest_key`), so that a reader's repeat is one whichever takes it.
_DIGEST_KEY = {"key": secrets.token_bytes(32)}

_CREATE = """CREATE TABLE aggregate_counts (
    campaign TEXT NOT NULL,      -- '' for mail without a campaign
    domain TEXT NOT NULL,        -- the sending (From) domain, '' when unknown
    day TEXT NOT NULL,           -- YYYY-MM-DD (UTC) of the fetches
    metric TEXT NOT NULL,        -- open_human, open_machine, click_human, click_machine
    n INTEGER NOT NULL,
    PRIMARY KEY (campaign, domain, day, metric)
)"""


def _create(db: SqliteConnection) -> None:
    db.execute(_CREATE + " WITHOUT ROWID")


AGGREGATE_MIGRATION = Migration("tracking/aggregate-0001-counts", _create, [_CREATE])

_ADD = """INSERT INTO aggregate_counts (campaign, domain, day, metric, n) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (campaign, domain, day, metric) DO UPDATE SET n = aggregate_counts.n + excluded.n"""


@dataclass(frozen=True, slots=True)
class AggregateHit:
    """An open or click to count, naming nobody. `repeat` is a digest made with this
    process's key (what tells a repeat apart, held only in memory); `at` the Unix time."""

    kind: str  # "open" or "click"
    campaign: str | None
    domain: str | None
    machine: bool
    at: float
    repeat: bytes = b""

    @property
    def day(self) -> str:
        return time.strftime("%Y-%m-%d", time.gmtime(self.at))

    @property
    def metric(self) -> str:
        return f"{self.kind}_{'machine' if self.machine else 'human'}"


def repeat_digest(*parts: object) -> bytes:
    """What makes two aggregate fetches one: a digest under a key held in memory only, so
    that it cannot be matched against anything outside the relay's processes."""
    text = "\x1f".join("" if part is None else str(part) for part in parts)
    return hashlib.blake2b(text.encode(), key=_DIGEST_KEY["key"], digest_size=12).digest()


def digest_key() -> bytes:
    """This process's key of repeat digests, for the HTTP workers it spawns."""
    return _DIGEST_KEY["key"]


def use_digest_key(key: bytes) -> None:
    """In an HTTP worker: the main process's key (`digest_key`)."""
    _DIGEST_KEY["key"] = key


class RecentHits:
    """Aggregate fetches seen within the repeat window, by digest (memory only)."""

    def __init__(self, window: timedelta, limit: int = RECENT_LIMIT) -> None:
        self._window = window.total_seconds()
        self._limit = limit
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def repeats(self, digest: bytes, at: float) -> bool:
        """Whether a fetch with `digest` at `at` repeats one remembered in its window."""
        began = self._seen.get(digest) if digest else None
        # Either side: fetches answered by several HTTP processes arrive a little out of
        # order, and the one counted may be a moment later than its repeat.
        return began is not None and abs(at - began) < self._window

    def remember(self, marks: Iterable[tuple[bytes, float]]) -> None:
        """Fetches counted (once their counts are committed), each the first of its window
        until the window has passed."""
        latest = None
        for digest, at in marks:
            if not digest:
                continue
            self._seen[digest] = at
            self._seen.move_to_end(digest)
            latest = at if latest is None else max(latest, at)
        if latest is not None:
            self._forget(latest)

    def first(self, digest: bytes, at: float) -> bool:
        """`repeats` and `remember` at once: whether this fetch is the first of its window."""
        if self.repeats(digest, at):
            return False
        self.remember([(digest, at)])
        return True

    def _forget(self, now: float) -> None:
        seen = self._seen
        while seen:
            digest, began = next(iter(seen.items()))
            if len(seen) <= self._limit and now - began < self._window:
                return
            del seen[digest]

    def __len__(self) -> int:
        return len(self._seen)


@dataclass(slots=True)
class Counting:
    """How the recorder sorts opens and clicks before they are written, in the database's
    writer thread: aggregate ones are counted here, the rest go on to the event log.

    `keep_last_open_only`: a recipient's opens of a campaign are one event holding only the
    day of the last one (tracking.keep_last_open_only)."""

    window: timedelta
    keep_last_open_only: bool = False
    recent: RecentHits = field(init=False)

    def __post_init__(self) -> None:
        self.recent = RecentHits(self.window)

    def sort(
        self, db: Connection, items: Sequence[Event | AggregateHit]
    ) -> tuple[list[Event], list[tuple[bytes, float]]]:
        """Count the aggregate hits among `items` and the opens and clicks of recipients
        who withdrew from that purpose; the events left to record as they are, and the
        hits counted, for `recent.remember` once the transaction is committed (a write
        that fails and is sent again must not find its own fetches remembered)."""
        named = [item for item in items if not isinstance(item, AggregateHit)]
        hits = [item for item in items if isinstance(item, AggregateHit)]
        withdrawn = withdrawn_among(db, (e.address_hash for e in named if e.address_hash))
        if withdrawn:
            kept = []
            for event in named:
                if (event.address_hash, _purpose(event)) in withdrawn:
                    hits.append(_hit_of(db, event))
                else:
                    kept.append(event)
            named = kept
        counted: list[AggregateHit] = []
        in_batch: dict[bytes, float] = {}
        for hit in hits:
            began = in_batch.get(hit.repeat) if hit.repeat else None
            if self.recent.repeats(hit.repeat, hit.at) or (
                began is not None and abs(hit.at - began) < self.window.total_seconds()
            ):
                continue
            if hit.repeat:
                in_batch[hit.repeat] = hit.at
            counted.append(hit)
        if counted:
            add_hits(db, counted)
        return named, [(hit.repeat, hit.at) for hit in counted]

    def unseen(self, items: Sequence[Event | AggregateHit]) -> list[Event | AggregateHit]:
        """`items` less the aggregate hits that repeat one counted (or kept) before, the
        others now remembered: for fetches kept aside while the store is away, which
        then go without their repeat digest (it never leaves memory)."""
        kept: list[Event | AggregateHit] = []
        for item in items:
            if isinstance(item, AggregateHit):
                if not self.recent.first(item.repeat, item.at):
                    continue
                item = dataclasses.replace(item, repeat=b"")
            kept.append(item)
        return kept

    def after_insert(self, db: Connection, events: Iterable[Event]) -> None:
        """Once the events are in: with `keep_last_open_only`, each recipient's opens of a
        campaign come down to the last one's day."""
        if not self.keep_last_open_only:
            return
        pairs = {
            (e.address_hash, e.campaign) for e in events if e.type == "open" and e.address_hash
        }
        for address_hash, campaign in pairs:
            keep_last_open(db, address_hash, campaign)


def _purpose(event: Event) -> Purpose:
    return Purpose.OPENS if event.type == "open" else Purpose.CLICKS


def _hit_of(db: Connection, event: Event) -> AggregateHit:
    """An individual fetch of a recipient who withdrew, as a count: its campaign, its
    message's sending domain and its verdict; nothing of the person or the copy."""
    row = db.execute(
        "SELECT domain FROM stats_messages WHERE queue_id = ?", [event.queue_id]
    ).fetchone()
    return AggregateHit(
        str(event.type),
        event.campaign,
        row[0] if row else None,
        bool(event.machine),
        datetime.fromisoformat(event.at).timestamp(),
        repeat_digest(event.repeat_key) if event.repeat_key else b"",
    )


def add_hits(db: Connection, hits: Iterable[AggregateHit]) -> None:
    """One upsert per counter touched."""
    counts: dict[tuple[str, str, str, str], int] = {}
    for hit in hits:
        key = (
            hit.campaign or NO_CAMPAIGN,
            hit.domain or UNKNOWN_DOMAIN,
            hit.day,
            hit.metric,
        )
        counts[key] = counts.get(key, 0) + 1
    db.executemany(_ADD, [(*key, n) for key, n in counts.items()])


def day_of(at: str) -> str:
    """An event time (`2026-03-12T09:41:07.123Z`) as the start of its day."""
    return f"{at[:10]}T00:00:00.000Z"


def keep_last_open(db: Connection, address_hash: str, campaign: str | None) -> None:
    """One recipient's opens of one campaign: only the last is kept, as its day, with no
    count; the statistics' record of their open takes that day too."""
    newest = db.execute(
        "SELECT id, at FROM events WHERE type = 'open' AND address_hash = ?"
        " AND coalesce(campaign, '') = ? ORDER BY at DESC, id DESC LIMIT 1",
        [address_hash, campaign or NO_CAMPAIGN],
    ).fetchone()
    if newest is None:
        return
    with zeroing(db):
        db.execute(
            "DELETE FROM events WHERE type = 'open' AND address_hash = ?"
            " AND coalesce(campaign, '') = ? AND id != ?",
            [address_hash, campaign or NO_CAMPAIGN, newest[0]],
        )
    day = day_of(newest[1])
    db.execute("UPDATE events SET at = ?, count = 1, last_at = NULL WHERE id = ?", [day, newest[0]])
    db.execute(
        "UPDATE stats_reach SET at = ? WHERE address_hash = ? AND campaign = ?"
        " AND metric IN ('open_human', 'open_machine')",
        [day, address_hash, campaign or NO_CAMPAIGN],
    )


# The opens that are not a recipient's last of their campaign.
_OLDER_OPENS = """SELECT id FROM (
    SELECT id, row_number() OVER (
        PARTITION BY address_hash, campaign ORDER BY at DESC, id DESC) AS newest
    FROM events WHERE type = 'open' AND address_hash IS NOT NULL) AS ranked
WHERE newest > 1"""
# Every recipient's opens of a campaign brought down to the last one's day: for a store
# that kept more before the setting was turned on (purge, the hourly task).
_KEEP_LAST_OPENS = [
    f"DELETE FROM events WHERE id IN ({_OLDER_OPENS})",  # noqa: S608 - a constant
    """UPDATE events SET at = substr(at, 1, 10) || 'T00:00:00.000Z', count = 1, last_at = NULL
        WHERE type = 'open' AND address_hash IS NOT NULL
            AND (substr(at, 11) != 'T00:00:00.000Z' OR count != 1 OR last_at IS NOT NULL)""",
    """UPDATE stats_reach SET at = COALESCE(
            (SELECT MAX(e.at) FROM events e WHERE e.type = 'open'
             AND e.address_hash = stats_reach.address_hash
             AND COALESCE(e.campaign, '') = stats_reach.campaign),
            substr(at, 1, 10) || 'T00:00:00.000Z')
        WHERE metric IN ('open_human', 'open_machine')
            AND substr(at, 11) != 'T00:00:00.000Z'""",
]


def keep_last_opens(db: Connection) -> int:
    """`keep_last_open` for every recipient and campaign at once; the events deleted."""
    with zeroing(db):
        deleted = int(db.execute(_KEEP_LAST_OPENS[0]).rowcount)
    for statement in _KEEP_LAST_OPENS[1:]:
        db.execute(statement)
    return deleted


def count_older_opens(db: Connection) -> int:
    """How many events `keep_last_opens` would delete."""
    return int(db.execute(f"SELECT count(*) FROM ({_OLDER_OPENS}) AS older").fetchone()[0])  # noqa: S608
