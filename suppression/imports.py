"""Importing suppression lists: any size, in batched transactions, never weakening an entry.

The file is read, parsed and hashed on a worker thread one batch ahead of the writer thread
that commits the previous batch. Bad rows are reported with their line numbers and skipped;
the rest is imported. Re-running an import changes nothing (every entry is then unchanged).
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO

from . import audit
from .addresses import MD5_PREFIX, SHA256_PREFIX, is_keyed_hash
from .database import format_time
from .entries import Entry, Outcome
from .errors import ImportFormatError, InvalidAddress, InvalidReason, InvalidScope
from .formats import HEX_DIGEST, Format, Layout, detect, sniff_delimiter, unescape_cell
from .reasons import SOFT_REASONS, Reason, check_expiry, parse_reason
from .scopes import GLOBAL, parse_scope
from .store import SuppressionStore

BATCH_SIZE = 100_000
MAX_KEPT_BAD_ROWS = 100
_CHUNK = 1 << 20
_STORED_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
_SES_REASONS = {"BOUNCE": Reason.HARD_BOUNCE, "COMPLAINT": Reason.COMPLAINT}
_POSTMARK_REASONS = {"hardbounce": Reason.HARD_BOUNCE, "spamcomplaint": Reason.COMPLAINT}


@dataclass(frozen=True, slots=True)
class ImportOptions:
    format: Format = Format.AUTO
    scope: str = GLOBAL
    # None: each row's own reason (ESP exports) or `import`; given: every row gets it.
    reason: Reason | None = None
    # Applied to rows with a soft reason only; unsubscribes and complaints never lapse.
    expires_at: datetime | None = None
    source: str | None = None  # default: import:FILE NAME
    actor: str | None = None
    batch_size: int = BATCH_SIZE
    encoding: str | None = None  # None: told from the file (choose_encoding)


@dataclass(frozen=True, slots=True)
class BadRow:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(slots=True)
class ImportReport:
    source: str
    format: str = ""
    encoding: str = ""
    rows: int = 0
    added: int = 0
    strengthened: int = 0
    unchanged: int = 0
    bad: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)
    bytes_read: int = 0
    sha256: str = ""

    def summary(self) -> dict[str, object]:
        return {
            "format": self.format,
            "encoding": self.encoding,
            "rows": self.rows,
            "added": self.added,
            "strengthened": self.strengthened,
            "unchanged": self.unchanged,
            "bad": self.bad,
            "bytes": self.bytes_read,
            "sha256": self.sha256,
        }


class _Bad(Exception):
    pass


_Batch = tuple[list[Entry], list[BadRow], int]


# Byte-order marks, longest first (a UTF-32 LE mark begins like a UTF-16 LE one).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
UTF8 = "utf-8"
LATIN1 = "latin-1"


def choose_encoding(head: bytes, asked: str | None, source: str) -> str:
    """The codec to read a file with: the one asked for, else its byte-order mark, else
    UTF-8, else Latin-1 (which reads anything) when no byte beyond ASCII at its start is
    UTF-8. A UTF-8 file with a stray byte stays UTF-8: that row is then a bad row, rather
    than every non-ASCII address garbled.

    A file with NUL bytes and no mark is no text we can read: UTF-16 without a mark, or a
    spreadsheet saved in its own format.
    """
    if asked is not None:
        try:
            return codecs.lookup(asked).name
        except LookupError:
            raise ImportFormatError(source, f"unknown encoding {asked!r}") from None
    for mark, name in _BOMS:
        if head.startswith(mark):
            return name
    if b"\0" in head:
        raise ImportFormatError(
            source,
            "not a text file (NUL bytes): UTF-16 without a byte-order mark? pass"
            " --encoding utf-16-le (or utf-16-be); a spreadsheet? save it as CSV",
        )
    text = codecs.getincrementaldecoder(UTF8)(errors="replace").decode(head, final=False)
    if "\ufffd" in text and not any(ch > "\x7f" and ch != "\ufffd" for ch in text):
        return LATIN1
    return UTF8


class _Reader:
    """Lines of a text file as the csv module wants them (any line ending made `\\n`),
    counting and hashing the bytes."""

    def __init__(self, raw: IO[bytes], encoding: str | None, source: str) -> None:
        self._raw = raw
        self.bytes_read = 0
        self.digest = hashlib.sha256()
        self._head = self._read()
        self.encoding = choose_encoding(self._head, encoding, source)

    def _read(self) -> bytes:
        chunk = self._raw.read(_CHUNK)
        self.bytes_read += len(chunk)
        self.digest.update(chunk)
        return chunk

    def lines(self) -> Iterator[str]:
        # UTF-8 (the usual case): an undecodable row becomes a bad row instead of ending the
        # import. Other codecs put U+FFFD there, which no address may contain either.
        utf8 = codecs.lookup(self.encoding).name in (UTF8, "utf-8-sig")
        decoder = codecs.getincrementaldecoder("utf-8-sig" if utf8 else self.encoding)(
            errors="surrogateescape" if utf8 else "replace"
        )
        pending = carried = ""
        chunk = self._head
        while chunk:
            text = carried + decoder.decode(chunk)
            # Old Mac (CR) and Windows (CRLF) endings. A CR at the end of a chunk waits for
            # the next one, which may begin with its LF.
            carried = "\r" if text.endswith("\r") else ""
            if carried:
                text = text[:-1]
            if "\r" in text:
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            pending += text
            *complete, pending = pending.split("\n")
            for line in complete:
                yield line + "\n"
            chunk = self._read()  # only now: `bytes_read` is how far the lines yielded go
        pending += (carried + decoder.decode(b"", final=True)).replace("\r", "\n")
        *complete, pending = pending.split("\n")
        for line in complete:
            yield line + "\n"
        if pending:
            yield pending


class _Parser:
    """Turns a file into batches of entries (run on a worker thread, never on the loop)."""

    def __init__(
        self, store: SuppressionStore, raw: IO[bytes], options: ImportOptions, name: str
    ) -> None:
        self._hasher = store.hasher
        self._options = options
        self._scope = parse_scope(options.scope)
        self._expires = None if options.expires_at is None else format_time(options.expires_at)
        if options.reason is not None:
            check_expiry(options.reason, self._expires)
        self._reader = _Reader(raw, options.encoding, name)
        self._lines = self._reader.lines()
        self.layout = self._detect()

    @property
    def encoding(self) -> str:
        return self._reader.encoding

    @property
    def bytes_read(self) -> int:
        return self._reader.bytes_read

    @property
    def sha256(self) -> str:
        return self._reader.digest.hexdigest()

    def _detect(self) -> Layout | None:
        head: list[str] = []
        rows: list[str] = []
        for line in self._lines:
            head.append(line)
            if line.strip() and not line.lstrip().startswith("#"):
                rows.append(line)
                if len(rows) == 2:
                    break
        self._lines = itertools.chain(head, self._lines)
        if not rows:
            return None
        delimiter = sniff_delimiter(rows[0])
        try:
            parsed = [next(csv.reader([row], delimiter=delimiter), []) for row in rows]
        except csv.Error as exc:
            raise ImportFormatError("first rows", f"not CSV: {exc}") from None
        second = parsed[1] if len(parsed) > 1 else None
        return detect(parsed[0], second, self._options.format, delimiter)

    def batches(self, size: int) -> Iterator[_Batch]:
        layout = self.layout
        if layout is None:
            return
        entries: list[Entry] = []
        bad: list[BadRow] = []
        skip_header = layout.header
        # Our own export escapes cells a spreadsheet would run as formulas; undone here.
        escaped = layout.format is Format.OPTOUT
        for line, row in self._rows(layout):
            if skip_header:
                skip_header = False
                continue
            try:
                if isinstance(row, csv.Error):
                    raise _Bad(f"not CSV: {row}")
                if escaped:
                    row = [unescape_cell(cell) for cell in row]
                entries.append(self._entry(layout, row, line))
            except _Bad as exc:
                bad.append(BadRow(line, str(exc)))
            if len(entries) + len(bad) >= size:
                yield entries, bad, self._reader.bytes_read
                entries, bad = [], []
        if entries or bad:
            yield entries, bad, self._reader.bytes_read

    def _rows(self, layout: Layout) -> Iterator[tuple[int, list[str] | csv.Error]]:
        if layout.format is Format.LIST:
            for number, line in enumerate(self._lines, start=1):
                text = line.strip()
                if text and not text.startswith("#"):
                    yield number, [text]
            return
        reader = csv.reader(self._lines, delimiter=layout.delimiter)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                # A broken row (an over-long field, say) is one bad row; reading goes on.
                yield reader.line_num, exc
                continue
            if not row or not any(cell.strip() for cell in row):
                continue
            if row[0].lstrip().startswith("#"):
                continue
            yield reader.line_num, row

    def _entry(self, layout: Layout, row: list[str], line: int) -> Entry:
        columns = layout.columns
        scope = self._scope
        if "scope" in columns and _cell(row, columns["scope"]):
            try:
                scope = parse_scope(_cell(row, columns["scope"]))
            except InvalidScope as exc:
                raise _Bad(str(exc)) from None
        reason = self._reason(layout, row)
        expires = self._expires if reason in SOFT_REASONS else None
        if "expires" in columns and _cell(row, columns["expires"]):
            expires = _cell(row, columns["expires"])
            if not _STORED_TIME.match(expires):
                raise _Bad(f"expires_at {expires!r} is not an ISO 8601 UTC time")
            if reason not in SOFT_REASONS:
                raise _Bad(f"a {reason} suppression cannot expire")
        since = _cell(row, columns["since"]) if "since" in columns else ""
        detail = (
            json.dumps({"line": line, "since": since[:64]}, separators=(",", ":"))
            if since
            else f'{{"line":{line}}}'
        )
        key, address = self._key(layout, row)
        return Entry(key, scope, reason, self._source, address, expires, detail)

    @property
    def _source(self) -> str:
        return self._options.source or "import"

    def _key(self, layout: Layout, row: list[str]) -> tuple[str, str | None]:
        columns = layout.columns
        if "hash" in columns:
            return _digest_key(_required(row, columns["hash"], "digest")), None
        value = _cell(row, columns["address"]) if "address" in columns else ""
        if not value and "key" in columns:
            key = _required(row, columns["key"], "address or address_hash")
            if is_keyed_hash(key) or (
                key.startswith((MD5_PREFIX, SHA256_PREFIX))
                and HEX_DIGEST.match(key.partition(":")[2])
            ):
                return key, None
            raise _Bad(f"address_hash {key!r} is not a key this relay makes")
        if not value:
            raise _Bad("no address")
        _check_text(value)
        try:
            normalized = self._hasher.normalize(value)
        except InvalidAddress as exc:
            raise _Bad(str(exc)) from None
        return self._hasher.hash_normalized(normalized), normalized

    def _reason(self, layout: Layout, row: list[str]) -> Reason:
        if self._options.reason is not None:
            return self._options.reason
        if layout.reason is not None:
            return layout.reason
        if "reason" not in layout.columns:
            return Reason.IMPORT
        text = _cell(row, layout.columns["reason"])
        if layout.format is Format.SES:
            if text.upper() in _SES_REASONS:
                return _SES_REASONS[text.upper()]
            raise _Bad(f"unknown SES reason {text!r} (expected BOUNCE or COMPLAINT)")
        if layout.format is Format.POSTMARK:
            return _postmark_reason(text, row, layout)
        if layout.format is Format.OPTOUT:
            try:
                return parse_reason(text)
            except InvalidReason as exc:
                raise _Bad(str(exc)) from None
        return Reason.IMPORT


def _postmark_reason(text: str, row: list[str], layout: Layout) -> Reason:
    kind = text.strip().lower()
    if kind in _POSTMARK_REASONS:
        return _POSTMARK_REASONS[kind]
    if kind == "manualsuppression":
        # Postmark records a recipient's own unsubscribe as a manual suppression whose
        # origin is the recipient; customer or admin origins are an operator's decision.
        origin = _cell(row, layout.columns["origin"]) if "origin" in layout.columns else ""
        return Reason.UNSUBSCRIBE if origin.strip().lower() == "recipient" else Reason.MANUAL
    raise _Bad(
        f"unknown Postmark reason {text!r} (expected HardBounce, SpamComplaint"
        " or ManualSuppression)"
    )


def _cell(row: list[str], index: int) -> str:
    return row[index].strip() if index < len(row) else ""


def _required(row: list[str], index: int, what: str) -> str:
    if index >= len(row) or not row[index].strip():
        raise _Bad(f"no {what}")
    return row[index].strip()


def _check_text(value: str) -> None:
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Bad("not valid UTF-8 (another encoding? pass --encoding)") from None
        if "\ufffd" in value:
            raise _Bad("bytes the file's encoding cannot read (pass --encoding)")


def _digest_key(value: str) -> str:
    _check_text(value)
    if not HEX_DIGEST.match(value):
        raise _Bad(
            f"{value[:80]!r} is not an MD5 (32 hex digits) or SHA-256 (64 hex digits) digest"
        )
    prefix = MD5_PREFIX if len(value) == 32 else SHA256_PREFIX
    return prefix + value.lower()


async def import_file(
    store: SuppressionStore,
    raw: IO[bytes],
    name: str,
    options: ImportOptions = ImportOptions(),
    *,
    on_bad_row: Callable[[BadRow], None] | None = None,
    on_progress: Callable[[int, ImportReport], None] | None = None,
) -> ImportReport:
    """Import the list in `raw` (named `name` in reports and the audit log).

    Raises ImportFormatError (before anything is written) when the file cannot be read as
    the format asked for; every other problem is a bad row in the report. `on_progress`
    hears the bytes read and the report so far after each batch.
    """
    source = options.source or f"import:{name}"
    options = ImportOptions(
        options.format,
        options.scope,
        options.reason,
        options.expires_at,
        source,
        options.actor,
        max(1, options.batch_size),
        options.encoding,
    )
    parser = await asyncio.to_thread(_Parser, store, raw, options, name)
    report = ImportReport(
        source, str(parser.layout.format) if parser.layout else "empty", parser.encoding
    )
    batches = parser.batches(options.batch_size)
    item = await asyncio.to_thread(next, batches, None)
    while item is not None:
        entries, bad, position = item
        report.rows += len(entries) + len(bad)
        for row in bad:
            report.bad += 1
            if len(report.bad_rows) < MAX_KEPT_BAD_ROWS:
                report.bad_rows.append(row)
            if on_bad_row is not None:
                on_bad_row(row)
        write = (
            asyncio.ensure_future(store.apply(entries, actor=options.actor)) if entries else None
        )
        try:
            # Parse and hash the next batch while the writer thread commits this one.
            item = await asyncio.to_thread(next, batches, None)
        finally:
            outcomes = [] if write is None else await write
        for outcome in outcomes:
            if outcome is Outcome.ADDED:
                report.added += 1
            elif outcome is Outcome.STRENGTHENED:
                report.strengthened += 1
            else:
                report.unchanged += 1
        if on_progress is not None:
            on_progress(position, report)
    report.bytes_read = parser.bytes_read
    report.sha256 = parser.sha256
    await store.database.write(
        lambda db: audit.record(
            db,
            "import",
            scope=parse_scope(options.scope),
            reason=options.reason,
            source=source,
            actor=options.actor,
            detail=report.summary(),
        )
    )
    return report
