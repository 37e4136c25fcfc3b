"""`storage migrate` and `storage copy`: bring a store's schema up to date in place, and move
an SQLite store (optout.db and its key files) into a PostgreSQL database.

The copy is idempotent and resumable: every table is read in primary-key order in batches
and each batch inserted with ON CONFLICT DO NOTHING, so running it again after a stop (or
after it finished) adds only what is missing. The keys go first: a target that already has
other keys, and entries keyed by them, is refused, since the copied entries would not match.
The webhook subscriptions are not copied: `serve` writes them from its config at start.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from suppression import Connection, Database, Engine, EngineSpec

from .errors import ConfigError, MissingStore, RelayError
from .settings import Settings
from .stores import (
    HASH_KEY,
    HASH_KEY_FILE,
    SIGNING_KEY,
    SIGNING_KEY_FILE,
    STORE_FILE,
    STORE_MIGRATIONS,
    engine_spec,
    load_or_create_secret,
)

BATCH = 2000
# Written by `serve` from its config; copying them would queue webhooks for the copied rows.
_NOT_COPIED = {"migrations", "shared_keys", "webhook_subscriptions"}


class CopyRefused(RelayError):
    pass


def _names(db: Connection) -> list[str]:
    return [str(row[0]) for row in db.execute("SELECT name FROM migrations ORDER BY name")]


async def migrate(settings: Settings) -> tuple[str, list[str]]:
    """Upgrade the configured store in place; where it is and the migrations applied now."""
    spec = engine_spec(settings)
    before = await _applied(spec)
    engine = await spec.open(STORE_MIGRATIONS)
    try:
        after = await engine.read(_names)
        return engine.location, [name for name in after if name not in before]
    finally:
        await engine.close()


async def _applied(spec: EngineSpec) -> set[str]:
    if spec.path is not None and not spec.path.exists():
        return set()
    engine = await spec.open(())
    try:
        return set(await engine.read(_names))
    finally:
        await engine.close()


@dataclass
class CopyReport:
    target: str
    tables: dict[str, tuple[int, int]] = field(default_factory=dict)  # name: (read, added)


Progress = Callable[[int], None]


async def copy_to(
    settings: Settings, url: str, *, on_total: Callable[[int], None], advance: Progress
) -> CopyReport:
    """Copy the SQLite store of `settings.storage.dir` (upgraded first) into `url`."""
    data_dir = settings.storage.dir
    if not (data_dir / STORE_FILE).is_file():
        raise MissingStore(data_dir)
    if not (data_dir / HASH_KEY_FILE).is_file():
        raise ConfigError("storage.dir", f"{data_dir / HASH_KEY_FILE} is missing")
    source = await Database.open(data_dir / STORE_FILE, STORE_MIGRATIONS)
    try:
        target = await engine_spec(
            Settings(storage=type(settings.storage)(data_dir, database=url))
        ).open(STORE_MIGRATIONS)
        try:
            return await _copy(settings, source, target, on_total, advance)
        finally:
            await target.close()
    finally:
        await source.close()


async def _copy(
    settings: Settings,
    source: Database,
    target: Engine,
    on_total: Callable[[int], None],
    advance: Progress,
) -> CopyReport:
    keys = {HASH_KEY: load_or_create_secret(settings.storage.dir / HASH_KEY_FILE)}
    if not settings.signing.secret_keys and (settings.storage.dir / SIGNING_KEY_FILE).exists():
        keys[SIGNING_KEY] = load_or_create_secret(settings.storage.dir / SIGNING_KEY_FILE)
    await target.write(lambda db: _put_keys(db, keys))
    tables = await source.read(_tables)
    known = set(await target.read(_target_tables))
    missing = [name for name, _, _ in tables if name not in known]
    if missing:
        raise CopyRefused(f"the target has no table {', '.join(missing)}: upgrade this relay")
    on_total(sum(count for _, _, count in tables))
    report = CopyReport(target.location)
    for name, (columns, key), count in ((n, c, k) for n, c, k in tables):
        added = 0
        after: tuple[Any, ...] | None = None
        while True:
            rows = await source.read(
                functools.partial(_page, name=name, columns=columns, key=key, after=after)
            )
            if not rows:
                break
            added += await target.write(
                functools.partial(_insert, name=name, columns=columns, rows=rows)
            )
            advance(len(rows))
            after = tuple(
                rows[-1][len(columns) if column == "rowid" else columns.index(column)]
                for column in key
            )
        report.tables[name] = (count, added)
    with_ids = [name for name, (columns, _), _ in tables if "id" in columns]
    await target.write(lambda db: _advance_identities(db, with_ids))
    return report


def _put_keys(db: Connection, keys: dict[str, str]) -> None:
    from suppression import utc_now

    for name, value in keys.items():
        row = db.execute("SELECT value FROM shared_keys WHERE name = ?", [name]).fetchone()
        if row is None:
            db.execute(
                "INSERT INTO shared_keys (name, value, created_at) VALUES (?, ?, ?)",
                [name, value, utc_now()],
            )
        elif row[0] != value:
            raise CopyRefused(
                f"the target database already has another {name} key: it is another"
                " relay's store (copy into an empty database)"
            )


def _tables(db: Connection) -> list[tuple[str, tuple[list[str], list[str]], int]]:
    """Every table to copy: its columns, its key columns (in order), its row count."""
    found = []
    for (name,) in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        " ORDER BY rowid"
    ).fetchall():
        if name in _NOT_COPIED:
            continue
        info = db.execute(f'PRAGMA table_info("{name}")').fetchall()
        columns = [str(row[1]) for row in info]
        key = [str(row[1]) for row in sorted(info, key=lambda row: row[5]) if row[5]]
        count = int(db.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0])  # noqa: S608
        found.append((str(name), (columns, key or ["rowid"]), count))
    return found


def _target_tables(db: Connection) -> list[str]:
    return [
        str(row[0])
        for row in db.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
    ]


def _page(
    db: Connection,
    *,
    name: str,
    columns: list[str],
    key: list[str],
    after: tuple[Any, ...] | None,
) -> list[tuple[Any, ...]]:
    listed = ", ".join(f'"{c}"' for c in columns)
    order = ", ".join(f'"{c}"' if c != "rowid" else c for c in key)
    where, params = "", []
    if after is not None:
        where = f"WHERE ({order}) > ({', '.join('?' for _ in key)})"
        params = list(after)
    if key == ["rowid"]:
        listed += ", rowid"
    sql = f'SELECT {listed} FROM "{name}" {where} ORDER BY {order} LIMIT ?'  # noqa: S608
    return [tuple(row) for row in db.execute(sql, [*params, BATCH])]


def _insert(db: Connection, *, name: str, columns: list[str], rows: list[tuple[Any, ...]]) -> int:
    listed = ", ".join(f'"{c}"' for c in columns)
    marks = ", ".join("?" for _ in columns)
    sql = f'INSERT INTO "{name}" ({listed}) VALUES ({marks}) ON CONFLICT DO NOTHING'  # noqa: S608
    return int(db.executemany(sql, [row[: len(columns)] for row in rows]).rowcount)


def _advance_identities(db: Connection, tables: list[str]) -> None:
    """Ids given by the copy: each identity sequence goes past the largest one."""
    for name in tables:
        row = db.execute("SELECT pg_get_serial_sequence(?, 'id')", [name]).fetchone()
        if row is not None and row[0] is not None:
            db.execute(
                f'SELECT setval(?, (SELECT COALESCE(MAX(id), 0) + 1 FROM "{name}"), false)',  # noqa: S608
                [row[0]],
            )
