"""The suppression list: normalised, hash-keyed opt-outs in SQLite."""

from .addresses import AddressHasher, NormalizationPolicy, digest_keys, normalize_address
from .audit import AuditRecord
from .database import (
    Database,
    Migration,
    format_time,
    fsync_directory,
    row_dicts,
    utc_now,
    zeroing,
)
from .engine import Connection, Dialect, Engine, EngineSpec
from .entries import Entry, Outcome
from .errors import (
    ImportFormatError,
    InvalidAddress,
    InvalidAge,
    InvalidReason,
    InvalidScope,
    NormalizationChanged,
    PermanentReason,
    ProtectedSuppression,
    StorageUnavailable,
    SuppressionError,
)
from .imports import BadRow, ImportOptions, ImportReport, import_file
from .reasons import SOFT_REASONS, STOPS_TRANSACTIONAL, parse_reason
from .retention import format_age, parse_age
from .scopes import sender_scopes, topic_scope
from .store import (
    GLOBAL,
    MIGRATIONS,
    Reason,
    SubjectRecord,
    Suppression,
    SuppressionStore,
    parse_scope,
)
from .subject import (
    DataHolder,
    ErasureReport,
    Subject,
    caseless,
    erase_subject,
    export_subject,
)

__all__ = [
    "GLOBAL",
    "MIGRATIONS",
    "SOFT_REASONS",
    "STOPS_TRANSACTIONAL",
    "AddressHasher",
    "AuditRecord",
    "BadRow",
    "Connection",
    "DataHolder",
    "Database",
    "Dialect",
    "Engine",
    "EngineSpec",
    "Entry",
    "ErasureReport",
    "ImportFormatError",
    "ImportOptions",
    "ImportReport",
    "InvalidAddress",
    "InvalidAge",
    "InvalidReason",
    "InvalidScope",
    "Migration",
    "NormalizationChanged",
    "NormalizationPolicy",
    "Outcome",
    "PermanentReason",
    "ProtectedSuppression",
    "Reason",
    "StorageUnavailable",
    "Subject",
    "SubjectRecord",
    "Suppression",
    "SuppressionError",
    "SuppressionStore",
    "caseless",
    "digest_keys",
    "erase_subject",
    "export_subject",
    "format_age",
    "format_time",
    "fsync_directory",
    "import_file",
    "normalize_address",
    "parse_age",
    "parse_reason",
    "parse_scope",
    "row_dicts",
    "sender_scopes",
    "topic_scope",
    "utc_now",
    "zeroing",
]
