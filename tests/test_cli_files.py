"""Files as operators really have them: any line ending and encoding in, spreadsheets and
pipes out, progress for long imports."""

from __future__ import annotations

import csv
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from suppression.formats import escape_cell, unescape_cell
from tests.helpers import ROOT, cli, run_cli

ADDRESSES = ["ann@example.org", "jörg@bücher.example", "zoë@example.org"]


def listed(config: Path) -> list[str]:
    result = cli(config, "suppress", "list")
    assert result.returncode == 0, result.stderr
    return sorted(line.split("\t")[0] for line in result.stdout.splitlines())


EXPECTED = sorted(["ann@example.org", "jörg@xn--bcher-kva.example", "zoë@example.org"])


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("mac.csv", ("email\r" + "\r".join(ADDRESSES) + "\r").encode()),
        ("windows.csv", ("email\r\n" + "\r\n".join(ADDRESSES) + "\r\n").encode()),
        ("excel-utf16.csv", ("email\r\n" + "\r\n".join(ADDRESSES) + "\r\n").encode("utf-16")),
        ("utf16-be.txt", "\ufeff".encode("utf-16-be") + "\n".join(ADDRESSES).encode("utf-16-be")),
        ("utf32.txt", "\n".join(ADDRESSES).encode("utf-32")),
        ("bom.csv", ("\ufeffe-mail;name\n" + "\n".join(f"{a};x" for a in ADDRESSES)).encode()),
    ],
)
def test_any_line_ending_and_marked_encoding_imports(config: Path, name: str, data: bytes) -> None:
    path = config.parent / name
    path.write_bytes(data)
    result = cli(config, "suppress", "import", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert " 3 rows, 3 added, 0 strengthened, 0 already suppressed, 0 bad" in result.stdout
    assert listed(config) == EXPECTED


def test_latin1_is_read_as_such_and_said(config: Path) -> None:
    path = config.parent / "legacy.csv"
    path.write_bytes("Name,Email\nJörg,jörg@example.org\nZoë,zoë@example.org\n".encode("latin-1"))
    result = cli(config, "suppress", "import", str(path))
    assert result.returncode == 0
    assert result.stderr == (
        "optout-relay: legacy.csv: not UTF-8, read as Latin-1 (--encoding to choose another)\n"
    )
    assert result.stdout == (
        "imported legacy.csv (csv, latin-1): 2 rows, 2 added, 0 strengthened,"
        " 0 already suppressed, 0 bad\n"
    )
    assert listed(config) == ["jörg@example.org", "zoë@example.org"]


def test_utf16_without_a_mark_is_one_line_and_then_imports_when_named(config: Path) -> None:
    path = config.parent / "nomark.csv"
    path.write_bytes("email\r\nann@example.org\r\n".encode("utf-16-le"))
    refused = cli(config, "suppress", "import", str(path))
    assert refused.returncode == 2
    assert refused.stderr == (
        "optout-relay: error: nomark.csv: not a text file (NUL bytes): UTF-16 without a"
        " byte-order mark? pass --encoding utf-16-le (or utf-16-be); a spreadsheet? save it"
        " as CSV\n"
    )
    wrong = cli(config, "suppress", "import", "--encoding", "utf-17", str(path))
    assert (wrong.returncode, wrong.stderr) == (
        2,
        "optout-relay: error: nomark.csv: unknown encoding 'utf-17'\n",
    )
    named = cli(config, "suppress", "import", "--encoding", "utf-16-le", str(path))
    assert named.returncode == 0, named.stderr
    assert listed(config) == ["ann@example.org"]


def test_a_broken_byte_deep_in_a_utf8_file_is_a_bad_row(config: Path) -> None:
    # The encoding is told from the first megabyte; a stray Latin-1 byte after it is one
    # bad row, never a garbled address.
    path = config.parent / "mixed.txt"
    lines = 70_000
    path.write_bytes(b"z\xc3\xabe@example.org\n" * lines + b"j\xf6rg@example.org\nbob@x.org\n")
    result = cli(config, "suppress", "import", "--format", "list", str(path))
    assert result.returncode == 1
    assert result.stderr == (
        f"optout-relay: mixed.txt:{lines + 1}: not valid UTF-8 (another encoding? pass"
        " --encoding)\n"
    )
    assert "(list): 70002 rows, 2 added, 0 strengthened, 69999 already suppressed, 1 bad" in (
        result.stdout
    )


def test_formula_cells_are_escaped_and_the_export_imports_back(
    config: Path, tmp_path: Path
) -> None:
    risky = ["=HYPERLINK(1)@x.org", "+1@x.org", "-rm@x.org", "'=quoted@x.org", "'plain@x.org"]
    for address in risky:
        added = run_cli("--config", str(config), "suppress", "add", "--", address, cwd=tmp_path)
        assert added.returncode == 0, added.stderr
    out = tmp_path / "export.csv"
    assert cli(config, "suppress", "export", "-o", str(out)).returncode == 0
    with out.open(newline="") as file:
        rows = list(csv.DictReader(file))
    cells = [cell for row in rows for cell in row.values() if cell]
    assert not [c for c in cells if c[0] in "=+-@\t\r"], cells
    assert [row["address"] for row in rows] == [
        "'=hyperlink(1)@x.org",
        "'+1@x.org",
        "'-rm@x.org",
        "''=quoted@x.org",
        "''plain@x.org",  # a spreadsheet hides the first apostrophe: shown as written
    ]
    again = cli(config, "suppress", "import", str(out))
    assert "5 rows, 0 added, 0 strengthened, 5 already suppressed, 0 bad" in again.stdout
    other = tmp_path / "other.toml"
    other.write_text(f'[storage]\ndir = "{tmp_path / "other-data"}"\n')
    back = cli(other, "suppress", "import", str(out))
    assert back.returncode == 0, back.stderr
    assert "5 rows, 5 added" in back.stdout
    assert listed(other) == listed(config) == sorted(a.lower() for a in risky)


def test_export_into_head_ends_quietly(config: Path) -> None:
    listing = config.parent / "many.txt"
    listing.write_text("".join(f"user{i}@example.org\n" for i in range(5000)))
    assert cli(config, "suppress", "import", str(listing)).returncode == 0
    for command in ("export", "list"):
        pipeline = subprocess.run(
            f"{sys.executable} -m relay suppress {command} --config {config} 2>err | head -n 1",
            shell=True,
            cwd=config.parent,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert pipeline.stdout.count("\n") == 1
        assert (config.parent / "err").read_text() == ""


def big_list(path: Path, rows: int) -> None:
    path.write_text("email\n" + "".join(f"someone.{i}@example.org\n" for i in range(rows)))


def test_a_long_import_reports_progress_in_a_log(config: Path) -> None:
    listing = config.parent / "big.csv"
    big_list(listing, 60_000)  # 1.6 MB: two chunks of the reader
    result = cli(config, "suppress", "import", "--batch-size", "20000", str(listing))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines, "no progress at all"
    assert all(line.startswith("importing big.csv: ") for line in lines)
    assert lines[0].endswith("% (20,000 rows)")
    assert result.stdout == (
        "imported big.csv (csv): 60000 rows, 60000 added, 0 strengthened,"
        " 0 already suppressed, 0 bad\n"
    )


def test_a_long_import_draws_a_bar_on_a_terminal(config: Path) -> None:
    listing = config.parent / "big.csv"
    big_list(listing, 60_000)
    main, terminal = pty.openpty()
    try:
        command = ["suppress", "import", str(listing), "--batch-size", "20000"]
        process = subprocess.Popen(
            [sys.executable, "-m", "relay", *command, "--config", str(config)],
            cwd=config.parent,
            env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"},
            stdout=subprocess.PIPE,
            stderr=terminal,
        )
        os.close(terminal)
        drawn = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the terminal's other end closed: the command is done
                break
            if not chunk:
                break
            drawn += chunk
        stdout, _ = process.communicate(timeout=60)
    finally:
        os.close(main)
    assert process.returncode == 0
    assert b"importing big.csv" in drawn and b"100%" in drawn
    assert stdout.startswith(b"imported big.csv (csv): 60000 rows, 60000 added")


@pytest.mark.parametrize(
    "cell",
    ["", "plain", "=1+1", "+1", "-x", "@SUM(A1)", "\tx", "\rx", "'", "''=x", "'-", "-_-KEYHASH"],
)
def test_escaping_is_reversible_and_never_leaves_a_formula(cell: str) -> None:
    escaped = escape_cell(cell)
    assert unescape_cell(escaped) == cell
    assert not escaped.startswith(("=", "+", "-", "@", "\t", "\r"))
