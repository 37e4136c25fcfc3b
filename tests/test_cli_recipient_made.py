"""Suppressions the recipient made stay made: an operator lifts them only with --force,
and the audit log says who did and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import cli


def history(config: Path, address: str) -> list[dict[str, object]]:
    shown = cli(config, "suppress", "show", "--format", "json", address)
    return list(json.loads(shown.stdout)["history"])


@pytest.mark.parametrize(
    ("reason", "why"),
    [("unsubscribe", "opted out themselves"), ("complaint", "complained")],
)
def test_the_recipients_own_opt_out_needs_force(config: Path, reason: str, why: str) -> None:
    cli(config, "suppress", "add", "--reason", reason, "--scope", "topic:news", "ann@example.org")
    refused = cli(config, "suppress", "remove", "ann@example.org")
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert refused.stderr.startswith(
        f"optout-relay: error: not removed: ann@example.org {why} (topic:news, {reason} via cli"
        " since "
    )
    assert refused.stderr.endswith("; pass --force to lift it anyway (audited)\n")
    assert (
        cli(config, "suppress", "check", "--scope", "topic:news", "ann@example.org").returncode == 0
    )

    forced = cli(
        config,
        "suppress",
        "remove",
        "--force",
        "--actor",
        "alice",
        "--note",
        "re-subscribed by phone, ticket 4711",
        "ann@example.org",
    )
    assert (forced.returncode, forced.stdout) == (0, "removed 1 suppression of ann@example.org\n")
    assert (
        cli(config, "suppress", "check", "--scope", "topic:news", "ann@example.org").returncode == 1
    )
    removal = history(config, "ann@example.org")[-1]
    assert (removal["action"], removal["actor"], removal["source"]) == ("remove", "alice", "cli")
    assert removal["detail"] == {
        "forced": True,
        "note": "re-subscribed by phone, ticket 4711",
        "previous": {
            "reason": reason,
            "source": "cli",
            "created_at": history(config, "ann@example.org")[0]["at"],
            "expires_at": None,
        },
    }


def test_an_operators_own_entry_comes_off_without_force(config: Path) -> None:
    cli(config, "suppress", "add", "--reason", "manual", "bob@example.org")
    removed = cli(config, "suppress", "remove", "--actor", "carl", "bob@example.org")
    assert removed.returncode == 0, removed.stderr
    assert "forced" not in history(config, "bob@example.org")[-1]["detail"]  # type: ignore[operator]


def test_one_protected_scope_keeps_every_scope_in_place(config: Path) -> None:
    cli(config, "suppress", "add", "--reason", "manual", "cy@example.org")
    cli(
        config, "suppress", "add", "--reason", "unsubscribe", "--scope", "topic:x", "cy@example.org"
    )
    assert cli(config, "suppress", "remove", "cy@example.org").returncode == 2
    listed = cli(config, "suppress", "list").stdout.splitlines()
    assert [line.split("\t")[1] for line in listed] == ["global", "topic:x"]
    # The operator's own scope alone is theirs to lift.
    assert cli(config, "suppress", "remove", "--scope", "global", "cy@example.org").returncode == 0


def test_lifting_an_erasures_suppression_needs_force_and_is_audited(config: Path) -> None:
    cli(config, "suppress", "add", "--scope", "topic:news", "dee@example.org")
    erased = cli(config, "subject", "erase", "--yes", "--actor", "dpo", "dee@example.org")
    assert erased.returncode == 0, erased.stderr
    refused = cli(config, "suppress", "remove", "dee@example.org")
    assert refused.returncode == 2
    assert "not removed: dee@example.org was erased on " in refused.stderr
    assert "(a data-subject request) and is kept suppressed; pass --force" in refused.stderr
    forced = cli(
        config,
        "suppress",
        "remove",
        "--force",
        "--actor",
        "dpo",
        "--note",
        "court order",
        "dee@example.org",
    )
    assert forced.stdout == "removed 2 suppressions of dee@example.org\n"
    removals = [h for h in history(config, "dee@example.org") if h["action"] == "remove"]
    assert len(removals) == 2
    assert all(
        r["actor"] == "dpo" and r["detail"]["forced"] and r["detail"]["note"] == "court order"  # type: ignore[index]
        for r in removals
    )


def test_add_keeps_a_free_note_beside_its_fixed_reason(config: Path) -> None:
    added = cli(
        config, "suppress", "add", "--reason", "manual", "--note", "asked at the fair", "e@x.org"
    )
    assert added.returncode == 0, added.stderr
    assert history(config, "e@x.org")[0]["detail"] == {"note": "asked at the fair"}
    shown = cli(config, "suppress", "show", "e@x.org").stdout
    assert '{"note": "asked at the fair"}' in shown
    wrong = cli(config, "suppress", "add", "--reason", "asked at the fair", "e@x.org")
    assert wrong.returncode == 2
    assert "'--reason'" in wrong.stderr and "'asked at the fair' is not one of" in wrong.stderr
    bad_note = cli(config, "suppress", "add", "--note", "two\nlines", "e@x.org")
    assert bad_note.returncode == 2
    assert "'--note': at most 1000 printable characters on one line" in bad_note.stderr
