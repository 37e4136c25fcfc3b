"""`optout-relay consent ...` as an operator runs it: consent as data with its proof (time,
source, actor in the audit log), withdrawals, imports with bad rows, and what a data-subject
export and an erasure do with it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from relay.stores import STORE_FILE
from tests.helpers import cli

ANN = "ann@example.org"


def consent_rows(config: Path) -> list[tuple[str, str, str, str | None]]:
    with sqlite3.connect(config.parent / "data" / STORE_FILE) as db:
        return list(
            db.execute(
                "SELECT purpose, state, source, actor FROM tracking_consent"
                " ORDER BY address_hash, purpose"
            )
        )


def test_add_remove_show_with_time_source_and_actor(config: Path) -> None:
    added = cli(
        config, "consent", "add", "Ann@Example.org", "--purpose", "opens",
        "--note", "double opt-in form, 2026-03-01", "--actor", "dpo",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert added.stdout == "consent recorded: Ann@Example.org (opens)\n"
    again = cli(config, "consent", "add", "ann@example.org", "--purpose", "opens")
    assert again.stdout == "already consented: ann@example.org (opens)\n"

    shown = cli(config, "consent", "show", "ann@example.org")
    assert shown.returncode == 0  # consents to something
    lines = shown.stdout.splitlines()
    assert lines[0] == "address: ann@example.org"
    assert lines[2].startswith("opens: granted since ") and lines[2].endswith(" via cli by dpo")
    assert lines[3] == "clicks: no record"
    assert "consent-grant opens via cli by dpo" in lines[5]
    assert '"note": "double opt-in form, 2026-03-01"' in lines[5]

    removed = cli(config, "consent", "remove", "ann@example.org", "--actor", "support")
    assert removed.stdout == "withdrawal recorded: ann@example.org (clicks, opens)\n"
    assert consent_rows(config) == [
        ("clicks", "withdrawn", "cli", "support"),
        ("opens", "withdrawn", "cli", "support"),
    ]
    document = json.loads(cli(config, "consent", "show", "--format", "json", ANN).stdout)
    assert document["consent"]["opens"]["state"] == "withdrawn"
    assert [(c["action"], c["scope"], c["actor"]) for c in document["history"]] == [
        ("consent-grant", "tracking:opens", "dpo"),
        ("consent-withdraw", "tracking:clicks", "support"),
        ("consent-withdraw", "tracking:opens", "support"),
    ]
    assert document["history"][2]["detail"] == {"previous": "granted"}
    assert cli(config, "consent", "show", ANN).returncode == 1  # consents to nothing now
    # The proof stays in the suppression audit log, which `suppress show` prints too.
    assert (
        "consent-withdraw tracking:opens via cli by support"
        in cli(config, "suppress", "show", ANN).stdout
    )


def test_import_records_each_row_and_reports_bad_ones(config: Path) -> None:
    listing = config.parent / "consents.csv"
    listing.write_text(
        "Email;Purposes;Consented At;Source\r\n"
        "bob@example.org;opens clicks;2026-02-01T10:00Z;signup form\r\n"
        "not-an-address;opens;;\r\n"
        "cy@example.org;;;\r\n"
        "dee@example.org;telepathy;;\r\n"
    )
    result = cli(config, "consent", "import", str(listing), "--purpose", "opens", "--actor", "ops")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "optout-relay: consents.csv:3: invalid address 'not-an-address':"
        " expected local-part@domain",
        "optout-relay: consents.csv:5: 'telepathy' is not a purpose (opens, clicks)",
    ]
    assert result.stdout == (
        "imported consents.csv: 4 rows, 2 consented now, 0 already consented, 2 bad\n"
    )
    assert sorted(consent_rows(config)) == [
        ("clicks", "granted", "import:consents.csv", "ops"),
        ("opens", "granted", "import:consents.csv", "ops"),
        ("opens", "granted", "import:consents.csv", "ops"),  # cy: the default purpose
    ]
    history = json.loads(
        cli(config, "consent", "show", "--format", "json", "bob@example.org").stdout
    )["history"]
    assert history[0]["detail"] == {
        "given_at": "2026-02-01T10:00Z",
        "given_via": "signup form",
        "line": 2,
    }
    withdrawn = config.parent / "objections.txt"
    withdrawn.write_text("cy@example.org\n")
    out = cli(config, "consent", "import", "--withdraw", str(withdrawn))
    assert out.returncode == 0, out.stderr
    assert (
        out.stdout
        == "imported objections.txt: 1 rows, 1 withdrawn now, 0 already withdrawn, 0 bad\n"
    )
    with sqlite3.connect(config.parent / "data" / STORE_FILE) as db:
        summary = db.execute(
            "SELECT source, actor, detail FROM suppression_audit WHERE action = 'consent-import'"
            " ORDER BY id"
        ).fetchall()
    assert [row[0] for row in summary] == ["import:consents.csv", "import:objections.txt"]
    assert json.loads(summary[0][2])["bad"] == 2 and len(json.loads(summary[0][2])["sha256"]) == 64


def test_bad_input_is_one_line_and_exit_2(config: Path) -> None:
    missing = cli(config, "consent", "show", "ann@example.org")
    assert missing.returncode == 2  # reading never creates a store
    assert missing.stderr.startswith("optout-relay: error: no store")
    assert not (config.parent / "data" / STORE_FILE).exists()
    wrong = cli(config, "consent", "add", "ann@example.org", "--purpose", "reading")
    assert wrong.returncode == 2
    assert "Invalid value for '--purpose'" in wrong.stderr and "Traceback" not in wrong.stderr
    bad = cli(config, "consent", "add", "nobody")
    assert bad.returncode == 2
    assert bad.stderr == (
        "optout-relay: error: invalid address 'nobody': expected local-part@domain\n"
    )


def test_subject_export_shows_consent_and_erasure_withdraws_it(config: Path) -> None:
    cli(config, "consent", "add", "eve@example.org", "--purpose", "clicks")
    exported = cli(config, "subject", "export", "eve@example.org")
    assert exported.returncode == 0, exported.stderr
    tracking = json.loads(exported.stdout)["tracking"]
    assert tracking["consent"]["clicks"]["state"] == "granted"
    assert tracking["measured"] == {"opens": "individual", "clicks": "off"}
    erased = cli(config, "subject", "erase", "--yes", "eve@example.org")
    assert erased.returncode == 0, erased.stderr
    assert "tracking: 2 withdrawn" in erased.stdout
    assert consent_rows(config) == [
        ("clicks", "withdrawn", "erasure", None),
        ("opens", "withdrawn", "erasure", None),
    ]
