"""The CLI as an operator uses it: output, exit codes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import (
    CaptureServer,
    StartRelay,
    asubmit,
    cli,
    newsletter,
    relay_settings,
    wait_for,
)


def test_add_check_list_remove(config: Path) -> None:
    added = cli(config, "suppress", "add", "Frank@Example.ORG", "grace@example.org")
    assert added.returncode == 0, added.stderr
    assert added.stdout.splitlines() == [
        "suppressed: Frank@Example.ORG (global)",
        "suppressed: grace@example.org (global)",
    ]
    again = cli(config, "suppress", "add", "frank@example.org")
    assert again.stdout.strip() == "already suppressed: frank@example.org (global)"

    checked = cli(config, "suppress", "check", "FRANK@example.org")
    assert checked.returncode == 0
    assert checked.stdout.startswith(
        "suppressed: FRANK@example.org (global, manual via cli, since "
    )
    missing = cli(config, "suppress", "check", "nobody@example.org")
    assert (missing.returncode, missing.stdout.strip()) == (1, "not suppressed: nobody@example.org")

    listed = cli(config, "suppress", "list", "--format", "jsonl")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["address"] for r in rows] == ["frank@example.org", "grace@example.org"]
    assert all(r["reason"] == "manual" and r["scope"] == "global" for r in rows)

    removed = cli(config, "suppress", "remove", "frank@example.org")
    assert (removed.returncode, removed.stdout.strip()) == (
        0,
        "removed 1 suppression of frank@example.org",
    )
    assert cli(config, "suppress", "check", "frank@example.org").returncode == 1
    assert cli(config, "suppress", "remove", "frank@example.org").returncode == 1


def test_scopes(config: Path) -> None:
    cli(
        config,
        "suppress",
        "add",
        "--scope",
        "topic:news",
        "--reason",
        "unsubscribe",
        "h@example.org",
    )
    assert cli(config, "suppress", "check", "h@example.org").returncode == 1
    scoped = cli(config, "suppress", "check", "--scope", "topic:news", "h@example.org")
    assert scoped.returncode == 0
    assert "(topic:news, unsubscribe via cli" in scoped.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("suppress", "add", "not-an-address"), "invalid address 'not-an-address'"),
        (("suppress", "add", "--scope", "planet:mars", "a@example.org"), "invalid scope"),
        (("suppress", "add", "--reason", "whim", "a@example.org"), "'whim' is not one of"),
        (("suppress", "check"), "Missing argument 'ADDRESS'"),
        (("suppress", "frobnicate"), "No such command 'frobnicate'"),
        (("events", "--format", "xml"), "'xml' is not one of 'jsonl', 'csv'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    config: Path, args: tuple[str, ...], message: str
) -> None:
    result = cli(config, *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("optout-relay: error: ")
    assert message in result.stderr


async def test_events_jsonl_has_the_documented_fields(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    settings = relay_settings(tmp_path / "data", downstream.port)
    relay = await start_relay(settings)
    message = newsletter(["ivan@example.org"], headers={"X-Optout-Campaign": "c-42"})
    await asubmit(relay.addresses.smtp[1], message, "news@shop.example", ["ivan@example.org"])
    await wait_for(lambda: len(downstream.handler.messages) == 1)
    await relay.stop()
    config = tmp_path / "relay.toml"
    config.write_text(f'[storage]\ndir = "{settings.storage.dir}"\n')
    result = cli(config, "events", "--format", "jsonl")
    assert result.returncode == 0, result.stderr
    [event] = [json.loads(line) for line in result.stdout.splitlines()]
    assert event["type"] == "delivered"
    assert event["recipient"] == "ivan@example.org"
    assert event["campaign"] == "c-42"
    assert len(event["queue_id"]) == 12
    assert event["message_id"] == "<spring-2026@shop.example>"
    assert event["at"].endswith("Z") and event["at"][:4].isdigit()


def test_a_corrupt_database_is_one_line_and_exit_1(config: Path) -> None:
    data = config.parent / "data"
    data.mkdir(mode=0o700)
    (data / "optout.db").write_bytes(b"this is not an SQLite database at all, " * 20)
    (data / "address-hash.key").write_text("a-key-of-the-right-length-0123456789\n")
    result = cli(config, "suppress", "list")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("optout-relay: error: ")
    assert "not a database" in result.stderr
