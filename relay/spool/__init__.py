"""The spool: accepted mail, durably in SQLite, and the incoming files of messages on their
way in. The front door writes to it, delivery reads from it; neither knows the other."""

from ._operator import QueueEntry
from .incoming import COPY_CHUNK, INCOMING, Spilled, SpillFile
from .store import (
    DEFAULT_RESERVE,
    DSN,
    WHOLE,
    Delivery,
    Partition,
    Record,
    Report,
    Spool,
    SpooledMessage,
    SpoolFull,
    is_disk_full,
    iso_utc,
)

__all__ = [
    "COPY_CHUNK",
    "DEFAULT_RESERVE",
    "DSN",
    "INCOMING",
    "WHOLE",
    "Delivery",
    "Partition",
    "QueueEntry",
    "Record",
    "Report",
    "SpillFile",
    "Spilled",
    "Spool",
    "SpoolFull",
    "SpooledMessage",
    "is_disk_full",
    "iso_utc",
]
