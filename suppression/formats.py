"""Which kind of list a file is, where its columns are, and what an ESP's reasons mean to us.

Recognised by the header: exports of SendGrid (`email,created[,reason,status|ip]`), Mailgun
(`address[,code,error][,tags],created_at`), Amazon SES (`EmailAddress,Reason,LastUpdateTime`),
Postmark (`EmailAddress,SuppressionReason,Origin,CreatedAt`), our own export
(`address,address_hash,scope,reason,...`), any CSV with an address column, hashed lists
(one MD5 or SHA-256 hex digest per line, or a `md5`/`sha256` column) and plain lists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from .errors import ImportFormatError
from .reasons import Reason


class Format(StrEnum):
    AUTO = "auto"
    CSV = "csv"
    LIST = "list"
    HASHES = "hashes"
    SENDGRID = "sendgrid"
    MAILGUN = "mailgun"
    SES = "ses"
    POSTMARK = "postmark"
    OPTOUT = "optout"


ESP_FORMATS = frozenset({Format.SENDGRID, Format.MAILGUN, Format.SES, Format.POSTMARK})
ADDRESS_NAMES = ("email", "emailaddress", "address", "mail", "recipient", "emailaddr")
HASH_NAMES = (
    "md5",
    "sha256",
    "hash",
    "emailmd5",
    "emailsha256",
    "md5email",
    "sha256email",
    "hashedemail",
    "emailhash",
)
HEX_DIGEST = re.compile(r"^(?:[0-9a-fA-F]{32}|[0-9a-fA-F]{64})$")


# A spreadsheet runs a cell that begins with one of these as a formula (CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_ESCAPED_STARTS = (*FORMULA_STARTS, "'")


def escape_cell(text: str) -> str:
    """A CSV cell a spreadsheet shows as text, as OWASP recommends: a leading apostrophe
    before a formula character. A cell that begins with an apostrophe gets one more, so that
    `unescape_cell` gives back exactly what was written (an export imports back)."""
    return "'" + text if text.startswith(_ESCAPED_STARTS) else text


def unescape_cell(text: str) -> str:
    """The cell `escape_cell` was given."""
    return text[1:] if text.startswith("'") and text[1:].startswith(_ESCAPED_STARTS) else text


def canon(name: str) -> str:
    """`Email Address`, `email_address` and `E-mail` all name the same column."""
    return re.sub(r"[\s_\-]", "", name.strip().lower())


@dataclass(frozen=True, slots=True)
class Layout:
    format: Format
    header: bool
    delimiter: str
    # role -> column index; roles: address, hash, key, reason, origin, since, scope, expires
    columns: dict[str, int] = field(default_factory=dict)
    # The reason every row has, when the file's kind says it (a SendGrid unsubscribe export).
    reason: Reason | None = None


def sniff_delimiter(line: str) -> str:
    counts = {d: line.count(d) for d in (",", "\t", ";")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def detect(first: list[str], second: list[str] | None, wanted: Format, delimiter: str) -> Layout:
    """The layout of a file from its first two rows (`wanted` is the --format asked for)."""
    names = [canon(cell) for cell in first]
    index = {name: i for i, name in reversed(list(enumerate(names)))}
    if wanted is Format.LIST:
        header = len(names) == 1 and names[0] in ADDRESS_NAMES
        return Layout(Format.LIST, header=header, delimiter=delimiter, columns={"address": 0})
    header_format = _format_from_header(index)
    if header_format is not None and wanted in (Format.AUTO, header_format):
        return _header_layout(header_format, index, delimiter)
    if wanted in ESP_FORMATS or wanted is Format.OPTOUT:
        raise ImportFormatError(
            "header", f"does not look like a {wanted} export (columns: {', '.join(first)})"
        )
    if header_format is not None and wanted in (Format.CSV, Format.HASHES):
        # Asked for a generic reading of a file we would have recognised: honour the ask.
        return _generic_header_layout(wanted, index, first, delimiter)
    return _headless_layout(first, second, wanted, delimiter)


def _format_from_header(index: dict[str, int]) -> Format | None:
    has = index.__contains__
    if has("addresshash"):
        return Format.OPTOUT
    if has("suppressionreason") and has("emailaddress"):
        return Format.POSTMARK
    if has("emailaddress") and has("reason") and (has("lastupdatetime") or has("lastupdatedtime")):
        return Format.SES
    if has("address") and (has("code") or has("error") or has("tags") or has("createdat")):
        return Format.MAILGUN
    if has("email") and has("created"):
        return Format.SENDGRID
    if any(has(name) for name in ADDRESS_NAMES):
        return Format.CSV
    if any(has(name) for name in HASH_NAMES):
        return Format.HASHES
    return None


def _first(index: dict[str, int], names: tuple[str, ...]) -> int | None:
    for name in names:
        if name in index:
            return index[name]
    return None


def _header_layout(kind: Format, index: dict[str, int], delimiter: str) -> Layout:
    def pick(**roles: tuple[str, ...]) -> dict[str, int]:
        columns = {}
        for role, names in roles.items():
            found = _first(index, names)
            if found is not None:
                columns[role] = found
        return columns

    reason: Reason | None = None
    if kind is Format.OPTOUT:
        columns = pick(
            address=("address",),
            key=("addresshash",),
            scope=("scope",),
            reason=("reason",),
            expires=("expiresat",),
            since=("createdat",),
        )
    elif kind is Format.POSTMARK:
        columns = pick(
            address=("emailaddress",),
            reason=("suppressionreason",),
            origin=("origin",),
            since=("createdat",),
        )
    elif kind is Format.SES:
        columns = pick(
            address=("emailaddress",),
            reason=("reason",),
            since=("lastupdatetime", "lastupdatedtime"),
        )
    elif kind is Format.MAILGUN:
        columns = pick(address=("address",), since=("createdat",))
        # Mailgun exports one list per kind, told apart by their columns.
        if "code" in index or "error" in index:
            reason = Reason.HARD_BOUNCE
        elif "tags" in index:
            reason = Reason.UNSUBSCRIBE
        else:
            reason = Reason.COMPLAINT
    elif kind is Format.SENDGRID:
        columns = pick(address=("email",), since=("created",))
        # SendGrid likewise: spam reports carry `ip`, bounces/blocks `status`, invalid
        # emails `reason`, global unsubscribes only `email,created`.
        if "ip" in index:
            reason = Reason.COMPLAINT
        elif "status" in index or "reason" in index:
            reason = Reason.HARD_BOUNCE
        else:
            reason = Reason.UNSUBSCRIBE
    elif kind is Format.HASHES:
        columns = pick(hash=HASH_NAMES)
    else:
        columns = pick(address=ADDRESS_NAMES)
    return Layout(kind, header=True, delimiter=delimiter, columns=columns, reason=reason)


def _generic_header_layout(
    wanted: Format, index: dict[str, int], first: list[str], delimiter: str
) -> Layout:
    role, names = ("hash", HASH_NAMES) if wanted is Format.HASHES else ("address", ADDRESS_NAMES)
    column = _first(index, names)
    if column is None:
        raise ImportFormatError("header", f"no {role} column among: {', '.join(first)}")
    return Layout(wanted, header=True, delimiter=delimiter, columns={role: column})


def _headless_layout(
    first: list[str], second: list[str] | None, wanted: Format, delimiter: str
) -> Layout:
    """No header we know: find the column from the data, perhaps below an unknown header."""
    for row, header in ((first, False), (second, True)):
        if row is None:
            continue
        for i, cell in enumerate(row):
            value = cell.strip()
            if wanted in (Format.AUTO, Format.HASHES) and HEX_DIGEST.match(value):
                return Layout(Format.HASHES, header, delimiter, {"hash": i})
            if wanted in (Format.AUTO, Format.CSV) and "@" in value:
                kind = Format.LIST if len(first) == 1 and wanted is Format.AUTO else Format.CSV
                return Layout(kind, header, delimiter, {"address": i})
    raise ImportFormatError(
        "line 1",
        "cannot tell which column holds the addresses: name it 'email' or 'address'"
        " in a header row, or pass --format",
    )
