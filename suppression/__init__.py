"""The suppression list: normalised, hash-keyed opt-outs in SQLite."""

from .addresses import AddressHasher, normalize_address
from .database import Database, Migration, utc_now
from .errors import InvalidAddress, InvalidScope, SuppressionError
from .store import GLOBAL, MIGRATIONS, Reason, Suppression, SuppressionStore, parse_scope

__all__ = [
    "GLOBAL",
    "MIGRATIONS",
    "AddressHasher",
    "Database",
    "InvalidAddress",
    "InvalidScope",
    "Migration",
    "Reason",
    "Suppression",
    "SuppressionError",
    "SuppressionStore",
    "normalize_address",
    "parse_scope",
    "utc_now",
]
