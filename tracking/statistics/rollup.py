"""Counts kept up to date as events are written, so that statistics never scan the events.

`stats_counts` holds, per campaign, sending domain, hour and metric, how many events there
were; `insert_events` adds each batch with one grouped upsert (`count_events`). Opens and
clicks are also counted once per recipient and campaign (the `*_unique` metrics): the first
one of each is remembered in `stats_reach`, which holds keyed hashes and so goes with an
erasure and with the retention of the events it stands for. The counts themselves name
nobody and outlive both, as aggregate statistics may.
"""

from __future__ import annotations

import functools

from suppression import Connection, Dialect, Migration
from suppression.database import SqliteConnection

NO_CAMPAIGN = ""  # campaign mail without X-Optout-Campaign; NULL cannot be in a key
UNKNOWN_DOMAIN = ""

# What an event counts as. A bounce is hard or soft by its detail's `kind` (feedback
# intake), else by its SMTP reply (5xx hard); `_late` when it came after delivery (from a
# DSN: it has no `attempt` of the relay's own). The statements are built per engine
# (`_statements`): only how a detail field is read differs.
_METRIC = """
    CASE e.type
        WHEN 'open' THEN CASE WHEN e.machine <> 0 THEN 'open_machine' ELSE 'open_human' END
        WHEN 'click' THEN CASE WHEN e.machine <> 0 THEN 'click_machine' ELSE 'click_human' END
        WHEN 'bounced' THEN 'bounced_'
            || CASE COALESCE({kind},
                             CASE WHEN {reply} LIKE '5%'
                                  THEN 'hard' END)
               WHEN 'hard' THEN 'hard' ELSE 'soft' END
            || CASE WHEN {attempt} IS NULL THEN '_late' ELSE '' END
        ELSE e.type
    END"""
# The sending (From) domain: on the relay's own delivery events, and through their message
# for the opens, clicks and unsubscribes that follow.
_DOMAIN = f"""
    COALESCE({{from_domain}},
             (SELECT m.domain FROM stats_messages m WHERE m.queue_id = e.queue_id),
             '{UNKNOWN_DOMAIN}')"""  # noqa: S608 - built from this module's constants
_CAMPAIGN = f"COALESCE(e.campaign, '{NO_CAMPAIGN}')"

_REMEMBER_DOMAINS = """
    INSERT INTO stats_messages (queue_id, domain)
    SELECT e.queue_id, {from_domain} FROM events e
    WHERE e.id > ? AND e.queue_id IS NOT NULL
        AND {from_domain} IS NOT NULL
    ON CONFLICT DO NOTHING
"""

_COUNT = f"""
    INSERT INTO stats_counts (campaign, domain, hour, metric, n)
    SELECT {_CAMPAIGN}, {_DOMAIN}, substr(e.at, 1, 13), {_METRIC}, COUNT(*)
    FROM events e WHERE e.id > ?
    GROUP BY 1, 2, 3, 4
    ON CONFLICT (campaign, domain, hour, metric) DO UPDATE SET n = stats_counts.n + excluded.n
"""  # noqa: S608 - built from this module's constants

# Each recipient's first open (click) of a campaign in this batch, counted unless an
# earlier batch had one; then remembered.
# The domain is the first event's: a bare column beside MIN() in SQLite, said outright in
# PostgreSQL ({first_domain}).
_FIRSTS = f"""
    SELECT e.address_hash, {_CAMPAIGN} AS campaign, {{first_domain}} AS domain,
        substr(MIN(e.at), 1, 13) AS hour, {_METRIC} AS metric, MIN(e.at) AS at
    FROM events e
    -- The unary + keeps SQLite from walking the whole address_hash index for IS NOT NULL:
    -- only the new rows, by rowid (PostgreSQL has no + for text, nor needs it).
    WHERE e.id > ? AND e.type IN ('open', 'click') AND {{unindexed}}e.address_hash IS NOT NULL
    GROUP BY e.address_hash, 2, 5
"""  # noqa: S608 - built from this module's constants
# Worked out once per batch into a temporary table, then counted and remembered.
_BATCH_FIRSTS = [
    """CREATE TEMP TABLE IF NOT EXISTS stats_batch_firsts (
        address_hash TEXT, campaign TEXT, domain TEXT, hour TEXT, metric TEXT, at TEXT
    )""",
    "DELETE FROM stats_batch_firsts",
    f"""INSERT INTO stats_batch_firsts
    SELECT f.* FROM ({_FIRSTS}) f
    WHERE NOT EXISTS (SELECT 1 FROM stats_reach r WHERE r.address_hash = f.address_hash
                      AND r.campaign = f.campaign AND r.metric = f.metric)""",  # noqa: S608
    """INSERT INTO stats_counts (campaign, domain, hour, metric, n)
    SELECT campaign, domain, hour, metric || '_unique', COUNT(*) FROM stats_batch_firsts
    WHERE true GROUP BY 1, 2, 3, 4
    ON CONFLICT (campaign, domain, hour, metric) DO UPDATE SET n = stats_counts.n + excluded.n""",
    """INSERT INTO stats_reach (address_hash, campaign, metric, at)
    SELECT address_hash, campaign, metric, at FROM stats_batch_firsts""",
]


@functools.cache
def _statements(dialect: Dialect) -> list[str]:
    fields = {
        name: dialect.json_text("e.detail", name)
        for name in ("kind", "reply", "attempt", "from_domain")
    }
    fields["unindexed"] = "" if dialect.is_postgresql else "+"
    fields["first_domain"] = (
        f"(array_agg({_DOMAIN} ORDER BY e.at))[1]" if dialect.is_postgresql else _DOMAIN
    )
    return [_fill(statement, fields) for statement in (_REMEMBER_DOMAINS, _COUNT, *_BATCH_FIRSTS)]


def _fill(statement: str, fields: dict[str, str]) -> str:
    for name, value in sorted(fields.items(), key=lambda item: item[0] != "first_domain"):
        statement = statement.replace("{" + name + "}", value)
    return statement


def count_events(db: Connection, after_id: int) -> None:
    """Add the events with ids above `after_id` (just inserted, in the caller's
    transaction) to the counts."""
    params = [after_id]
    for statement in _statements(db.dialect):
        db.execute(statement, params if "?" in statement else [])


_TABLES = [
    """CREATE TABLE stats_counts (
        campaign TEXT NOT NULL,      -- '' for mail without a campaign
        domain TEXT NOT NULL,        -- the sending (From) domain, '' when unknown
        hour TEXT NOT NULL,          -- YYYY-MM-DDTHH (UTC) of the events
        metric TEXT NOT NULL,        -- delivered, open_human, open_human_unique, ...
        n INTEGER NOT NULL,
        PRIMARY KEY (campaign, domain, hour, metric)
    ) WITHOUT ROWID""",
    "CREATE INDEX stats_counts_hour ON stats_counts (hour)",
    # Whose first open or click of a campaign was counted (keyed hashes: personal data).
    """CREATE TABLE stats_reach (
        address_hash TEXT NOT NULL,
        campaign TEXT NOT NULL,
        metric TEXT NOT NULL,        -- open_human, open_machine, click_human, click_machine
        at TEXT NOT NULL,
        PRIMARY KEY (address_hash, campaign, metric)
    ) WITHOUT ROWID""",
    "CREATE INDEX stats_reach_at ON stats_reach (at)",
    # The sending domain of each message (queue id), for the events that do not carry it.
    """CREATE TABLE stats_messages (
        queue_id TEXT PRIMARY KEY,
        domain TEXT NOT NULL
    ) WITHOUT ROWID""",
]


def _create(db: SqliteConnection) -> None:
    for statement in _TABLES:
        db.execute(statement)
    count_events(db, 0)  # the events already there


_PG_TABLES = [
    """CREATE TABLE stats_counts (
        campaign TEXT NOT NULL,
        domain TEXT NOT NULL,
        hour TEXT NOT NULL,
        metric TEXT NOT NULL,
        n BIGINT NOT NULL,
        PRIMARY KEY (campaign, domain, hour, metric)
    )""",
    "CREATE INDEX stats_counts_hour ON stats_counts (hour)",
    """CREATE TABLE stats_reach (
        address_hash TEXT NOT NULL,
        campaign TEXT NOT NULL,
        metric TEXT NOT NULL,
        at TEXT NOT NULL,
        PRIMARY KEY (address_hash, campaign, metric)
    )""",
    "CREATE INDEX stats_reach_at ON stats_reach (at)",
    """CREATE TABLE stats_messages (
        queue_id TEXT PRIMARY KEY,
        domain TEXT NOT NULL
    )""",
]

# On PostgreSQL the events table is new with it: no events to count yet.
ROLLUP_MIGRATION = Migration("tracking/statistics-0001-rollup", _create, _PG_TABLES)


def forget_reach(db: Connection, address_hash: str) -> int:
    """An erased person's firsts go (the counts they made stay, naming nobody)."""
    return int(
        db.execute("DELETE FROM stats_reach WHERE address_hash = ?", [address_hash]).rowcount
    )


def purge_reach(db: Connection, kind: str, older_than: str, limit: int) -> int:
    """Firsts of `kind` (open, click) from before `older_than`, as their events are purged:
    at most `limit` per call."""
    return int(
        db.execute(
            "DELETE FROM stats_reach WHERE (address_hash, campaign, metric) IN"
            " (SELECT address_hash, campaign, metric FROM stats_reach"
            " WHERE at < ? AND metric IN (?, ?) LIMIT ?)",
            [older_than, f"{kind}_human", f"{kind}_machine", limit],
        ).rowcount
    )
