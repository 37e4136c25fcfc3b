"""CLI habits an operator brings from sqlite-utils and Postfix: where --config goes, the
environment, and commands that only read never creating a store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import cli, run_cli

READING = [
    ("suppress", "list"),
    ("suppress", "check", "ann@example.org"),
    ("suppress", "show", "ann@example.org"),
    ("suppress", "export"),
    ("suppress", "remove", "ann@example.org"),
    ("events",),
    ("subject", "export", "ann@example.org"),
]


def test_config_goes_before_or_after_the_command_or_in_the_environment(
    config: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    added = run_cli("--config", str(config), "suppress", "add", "ann@example.org", cwd=elsewhere)
    assert added.returncode == 0, added.stderr
    after = run_cli("suppress", "check", "ann@example.org", "--config", str(config), cwd=elsewhere)
    assert after.returncode == 0, after.stderr
    between = run_cli("suppress", "--config", str(config), "show", "ann@example.org", cwd=elsewhere)
    assert between.returncode == 0, between.stderr
    env = {**os.environ, "OPTOUT_RELAY_CONFIG": str(config)}
    from_env = run_cli("suppress", "check", "ann@example.org", cwd=elsewhere, env=env)
    assert from_env.returncode == 0, from_env.stderr
    assert from_env.stdout.startswith("suppressed: ann@example.org (global, manual via cli")
    # Nothing was ever written where the commands ran: all three read the config's store.
    assert list(elsewhere.iterdir()) == []


def test_an_explicit_config_wins_over_the_environment(config: Path, tmp_path: Path) -> None:
    cli(config, "suppress", "add", "ann@example.org")
    other = tmp_path / "other.toml"
    other.write_text(f'[storage]\ndir = "{tmp_path / "other-data"}"\n')
    env = {**os.environ, "OPTOUT_RELAY_CONFIG": str(other)}
    checked = run_cli(
        "--config", str(config), "suppress", "check", "ann@example.org", cwd=tmp_path, env=env
    )
    assert checked.returncode == 0, checked.stderr


def test_two_different_config_files_are_refused(config: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text("")
    for places in (
        ("--config", str(other), "suppress", "list", "--config", str(config)),
        ("--config", str(other), "suppress", "--config", str(config), "list"),
    ):
        result = run_cli(*places, cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.startswith("optout-relay: error: --config given twice: ")
        assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("command", READING, ids=" ".join)
def test_a_command_that_reads_finds_no_store_and_creates_none(
    config: Path, command: tuple[str, ...]
) -> None:
    result = cli(config, *command)
    assert result.returncode == 2, result.stdout
    assert result.stdout == ""
    data = config.parent / "data"
    assert result.stderr == (
        f"optout-relay: error: no store in {data}: nothing recorded there yet (serve,"
        " suppress add and suppress import create it); is --config or OPTOUT_RELAY_CONFIG"
        " the right file?\n"
    )
    assert not data.exists()


def test_commands_that_write_create_the_store(config: Path) -> None:
    listing = config.parent / "list.txt"
    listing.write_text("ann@example.org\n")
    assert cli(config, "suppress", "import", str(listing)).returncode == 0
    assert (config.parent / "data" / "optout.db").is_file()
    assert cli(config, "suppress", "list").stdout.startswith("ann@example.org\tglobal\t")


def test_a_store_without_its_hash_key_is_not_given_a_new_one(config: Path) -> None:
    cli(config, "suppress", "add", "ann@example.org")
    key = config.parent / "data" / "address-hash.key"
    key.unlink()
    for command in (("suppress", "check", "ann@example.org"), ("suppress", "add", "b@x.org")):
        result = cli(config, *command)
        assert result.returncode == 2
        assert result.stderr == (
            f"optout-relay: error: config: storage.dir: {key} is missing beside optout.db:"
            " restore it from a backup (the stored suppressions are keyed by it)\n"
        )
    assert not key.exists()
