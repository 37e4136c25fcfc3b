"""The compliance CLI as an operator runs it: imports, exports, proof, subject requests, purge."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from relay.settings import Settings, StorageSettings
from relay.stores import Stores
from tests.helpers import cli
from tracking.events import Event, EventType


def test_import_skips_bad_rows_by_line_and_exits_1(config: Path) -> None:
    listing = config.parent / "crm.csv"
    listing.write_text(
        "Name,Email\nAnn,Ann@Example.org\nBob,bob-at-example.org\nCy,\nDee,dee@example.org\n"
    )
    result = cli(config, "suppress", "import", str(listing), "--actor", "alice")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "optout-relay: crm.csv:3: invalid address 'bob-at-example.org': expected local-part@domain",
        "optout-relay: crm.csv:4: no address",
    ]
    assert result.stdout.strip() == (
        "imported crm.csv (csv): 4 rows, 2 added, 0 strengthened, 0 already suppressed, 2 bad"
    )
    checked = cli(config, "suppress", "check", "ann@example.org")
    assert checked.returncode == 0
    assert "(global, import via import:crm.csv, since " in checked.stdout


def test_hashed_list_import_is_enforced(config: Path) -> None:
    hashed = config.parent / "partner-md5.txt"
    hashed.write_text(hashlib.md5(b"carol@example.org").hexdigest() + "\n")
    assert cli(config, "suppress", "import", "--reason", "complaint", str(hashed)).returncode == 0
    result = cli(config, "suppress", "check", "Carol@EXAMPLE.org")
    assert result.returncode == 0
    assert "complaint via import:partner-md5.txt" in result.stdout
    assert "md5 hashed-list entry" in result.stdout


def test_export_is_private_and_imports_back_unchanged(config: Path) -> None:
    cli(config, "suppress", "add", "--scope", "topic:news", "--reason", "unsubscribe", "a@x.org")
    cli(config, "suppress", "add", "--reason", "hard_bounce", "--expires", "90d", "b@x.org")
    out = config.parent / "export.csv"
    exported = cli(config, "suppress", "export", "--output", str(out))
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.strip() == f"exported 2 suppressions to {out}"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    with out.open() as file:
        rows = list(csv.DictReader(file))
    assert [(r["address"], r["scope"], r["reason"]) for r in rows] == [
        ("a@x.org", "topic:news", "unsubscribe"),
        ("b@x.org", "global", "hard_bounce"),
    ]
    assert rows[0]["expires_at"] == "" and rows[1]["expires_at"].endswith("Z")
    back = cli(config, "suppress", "import", str(out))
    assert back.returncode == 0
    assert "(optout): 2 rows, 0 added, 0 strengthened, 2 already suppressed, 0 bad" in back.stdout


def test_show_proves_when_and_how(config: Path) -> None:
    cli(config, "suppress", "add", "--actor", "alice", "--reason", "manual", "fr@x.org")
    cli(config, "suppress", "add", "--actor", "bob", "--reason", "complaint", "FR@x.org")
    cli(config, "suppress", "add", "--scope", "topic:news", "fr@x.org")
    # A complaint is the recipient's own word: an operator lifts it only with --force.
    removed = cli(config, "suppress", "remove", "--scope", "global", "--actor", "carl", "fr@x.org")
    assert removed.returncode == 2
    cli(config, "suppress", "remove", "--force", "--scope", "global", "--actor", "carl", "fr@x.org")
    shown = cli(config, "suppress", "show", "fr@X.org")
    assert shown.returncode == 0
    lines = shown.stdout.splitlines()
    assert lines[:2] == ["address: fr@x.org", f"key: {lines[1][5:]}"]
    assert lines[2] == "suppressed:"
    assert lines[3].startswith("  topic:news, manual via cli, since ")
    assert lines[4] == "history:"
    assert lines[5].endswith(" add global manual via cli by alice")
    assert " strengthen global complaint via cli by bob " in lines[6]
    assert " add topic:news manual via cli by " in lines[7]
    assert " remove global complaint via cli by carl " in lines[8]
    assert '"forced": true, "previous": {"created_at": ' in lines[8]


def test_subject_export_and_erase(config: Path, tmp_path: Path) -> None:
    async def seed() -> None:
        settings = Settings(storage=StorageSettings(tmp_path / "data"))
        async with Stores(settings) as stores:
            await stores.suppressions.remember(["Gina@Example.org"])
            key = stores.suppressions.hasher.hash("gina@example.org")
            await stores.events.record(Event(EventType.DELIVERED, key, "c1", "Q1"))

    asyncio.run(seed())
    cli(config, "suppress", "add", "--scope", "topic:news", "gina@example.org")
    exported = cli(config, "subject", "export", "GINA@example.org")
    assert exported.returncode == 0, exported.stderr
    document = json.loads(exported.stdout)
    assert document["address"] == "gina@example.org"
    assert [e["type"] for e in document["events"]] == ["delivered"]
    assert document["suppressions"][0]["scope"] == "topic:news"

    refused = cli(config, "subject", "erase", "gina@example.org")
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "pass --yes" in refused.stderr

    erased = cli(config, "subject", "erase", "--yes", "--actor", "dpo", "gina@example.org")
    assert erased.returncode == 0, erased.stderr
    assert erased.stdout.splitlines()[1:] == [
        "  suppressions: 2 kept, by key only, address deleted (global suppression by key"
        " added: mail to it stays refused)",
        "  contact: deleted",
        "  events: 1 anonymised",
        "  tracking: 2 withdrawn",
        "  webhooks: 0 anonymised",
        "  outbox: 0 files deleted",
        "  (anonymised events keep their campaign counts, without the address)",
    ]
    shown = cli(config, "suppress", "show", "gina@example.org")
    assert shown.returncode == 0  # still suppressed
    assert "erased: " in shown.stdout
    assert " erase global via subject-request by dpo " in shown.stdout
    data = tmp_path / "data"
    for path in data.iterdir():
        assert b"gina@example.org" not in path.read_bytes().lower(), path


def test_purge_deletes_what_retention_no_longer_allows(config: Path, tmp_path: Path) -> None:
    async def seed() -> None:
        settings = Settings(storage=StorageSettings(tmp_path / "data"))
        async with Stores(settings) as stores:
            old, new = "2020-01-01T00:00:00.000Z", "2999-01-01T00:00:00.000Z"
            await stores.events.record(
                Event(EventType.OPEN, None, "c", "Q", machine=True, at=old),
                Event(EventType.OPEN, None, "c", "Q", machine=True, at=new),
                Event(EventType.DELIVERED, None, "c", "Q", at=old),
            )

    asyncio.run(seed())
    purged = cli(config, "purge", "--keep", "open=180d", "--keep", "delivered=forever")
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.strip() == "purged 1 event (1 open), 0 contacts, 0 lapsed suppressions"
    events = cli(config, "events")
    # Oldest first: the 2020 delivery, then the open dated 2999.
    assert [json.loads(line)["type"] for line in events.stdout.splitlines()] == [
        "delivered",
        "open",
    ]


BAD_USAGE = [
    (("suppress", "import", "absent.csv"), "'absent.csv' does not exist"),
    (("suppress", "import", "--format", "xml", "-"), "'xml' is not one of"),
    (("suppress", "import", "unknown.csv"), "cannot tell which column holds the addresses"),
    (
        ("suppress", "import", "--reason", "unsubscribe", "--expires", "30d", "unknown.csv"),
        "never expires",
    ),
    (("suppress", "add", "--expires", "soon", "a@x.org"), "invalid age 'soon'"),
    (("suppress", "show", "nobody"), "invalid address 'nobody'"),
    (("subject", "erase", "--yes", "not-an-address"), "invalid address"),
    (("purge", "--keep", "open"), "'open' is not KIND=AGE"),
    (("purge", "--keep", "planet=1d"), "retention.planet: unknown key"),
]


def test_bad_usage_is_one_line_and_exit_2(config: Path) -> None:
    (config.parent / "unknown.csv").write_text("name,city\nAnn,Paris\n")
    # Side by side: each is a process start, and none of them changes anything.
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda case: cli(config, *case[0]), BAD_USAGE))
    for (args, message), result in zip(BAD_USAGE, results, strict=True):
        assert result.returncode == 2, (args, result.stderr)
        assert result.stdout == "", args
        assert result.stderr.count("\n") == 1, (args, result.stderr)
        assert result.stderr.startswith("optout-relay: error: "), args
        assert message in result.stderr, (args, result.stderr)
