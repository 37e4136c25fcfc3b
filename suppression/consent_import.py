"""Importing consent to tracking from a file: a CSV with an address column (and, if it has
them, a purposes column and when and how the consent was given), or a plain list of
addresses. Each row is recorded and audited as `consent add` would (suppression.consent),
with the file's name as the source; the import as a whole is audited with the file's digest.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from .consent import ConsentRow, ConsentStore, Purpose, State, parse_purposes
from .errors import ImportFormatError, InvalidAddress
from .formats import ADDRESS_NAMES, canon, sniff_delimiter, unescape_cell
from .imports import BadRow, choose_encoding

BATCH_SIZE = 10_000
MAX_FILE = 512 * 1024 * 1024  # read whole: consent lists are lists of people, not logs
PURPOSE_NAMES = ("purpose", "purposes", "consent", "tracking")
GIVEN_AT_NAMES = ("consentedat", "consentdate", "givenat", "date", "at", "timestamp")
GIVEN_VIA_NAMES = ("source", "via", "method", "origin")


@dataclass(slots=True)
class ConsentImportReport:
    source: str
    rows: int = 0
    changed: int = 0  # rows that changed something
    purposes_changed: int = 0
    unchanged: int = 0  # rows that changed nothing (already in that state)
    bad: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)
    sha256: str = ""

    def summary(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "changed": self.changed,
            "purposes_changed": self.purposes_changed,
            "unchanged": self.unchanged,
            "bad": self.bad,
            "sha256": self.sha256,
        }


@dataclass(frozen=True, slots=True)
class _Columns:
    header: bool
    delimiter: str
    address: int
    purposes: int | None = None
    given_at: int | None = None
    given_via: int | None = None


def _columns(first: list[str], delimiter: str) -> _Columns:
    names = [canon(cell) for cell in first]

    def find(candidates: tuple[str, ...]) -> int | None:
        return next((i for i, name in enumerate(names) if name in candidates), None)

    address = find(ADDRESS_NAMES)
    if address is None:
        if len(first) == 1 and "@" in first[0]:
            return _Columns(header=False, delimiter=delimiter, address=0)
        raise ImportFormatError("header", "no address column (email, address, ...)")
    return _Columns(
        True, delimiter, address, find(PURPOSE_NAMES), find(GIVEN_AT_NAMES), find(GIVEN_VIA_NAMES)
    )


def parse_consent_file(
    data: bytes,
    name: str,
    hash_address: Callable[[str], str],
    purposes: frozenset[Purpose],
    encoding: str | None = None,
) -> tuple[list[ConsentRow], list[BadRow]]:
    """The rows of a consent file (any line ending; UTF-8, UTF-16/32 with a mark, or
    Latin-1), and the rows that could not be read. `purposes`: those of rows that name
    none."""
    codec = choose_encoding(data[:65536], encoding, name)
    text = data.decode(codec, errors="replace")
    lines = text.splitlines()
    rows: list[ConsentRow] = []
    bad: list[BadRow] = []
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        return rows, bad
    delimiter = sniff_delimiter(first)
    reader = csv.reader(lines, delimiter=delimiter)
    columns: _Columns | None = None
    for number, row in enumerate(reader, start=1):
        if not any(cell.strip() for cell in row):
            continue
        if columns is None:
            columns = _columns(row, delimiter)
            if columns.header:
                continue
        try:
            rows.append(_row(number, row, columns, hash_address, purposes))
        except (InvalidAddress, ValueError, IndexError) as exc:
            bad.append(BadRow(number, str(exc) if not isinstance(exc, IndexError) else "short"))
    return rows, bad


def _row(
    number: int,
    row: list[str],
    columns: _Columns,
    hash_address: Callable[[str], str],
    purposes: frozenset[Purpose],
) -> ConsentRow:
    address = unescape_cell(row[columns.address].strip())
    if not address:
        raise ValueError("no address")
    wanted = purposes
    if columns.purposes is not None and row[columns.purposes].strip():
        wanted = parse_purposes(row[columns.purposes])
    detail: dict[str, str] = {}
    for key, index in (("given_at", columns.given_at), ("given_via", columns.given_via)):
        if index is not None and index < len(row) and row[index].strip():
            detail[key] = unescape_cell(row[index].strip())[:200]
    return ConsentRow(number, hash_address(address), wanted, detail)


async def import_consent(
    store: ConsentStore,
    raw: IO[bytes],
    name: str,
    *,
    purposes: frozenset[Purpose],
    state: State = State.GRANTED,
    actor: str | None = None,
    encoding: str | None = None,
) -> ConsentImportReport:
    """Record every readable row (a batch per transaction); report the rest."""
    data = await asyncio.to_thread(raw.read, MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise ImportFormatError(name, f"larger than {MAX_FILE >> 20} MiB: split it")
    source = f"import:{name}"
    report = ConsentImportReport(source, sha256=hashlib.sha256(data).hexdigest())
    rows, bad = await asyncio.to_thread(
        parse_consent_file, data, name, store.hasher.hash, purposes, encoding
    )
    report.rows = len(rows) + len(bad)
    report.bad, report.bad_rows = len(bad), bad
    for start in range(0, len(rows), BATCH_SIZE):
        batch = rows[start : start + BATCH_SIZE]
        rows_changed, purposes_changed = await store.apply(batch, state, source=source, actor=actor)
        report.changed += rows_changed
        report.purposes_changed += purposes_changed
        report.unchanged += len(batch) - rows_changed
    await store.record_import(source, actor, {**report.summary(), "state": state.value})
    return report
