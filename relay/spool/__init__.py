"""The spool: accepted mail, durably in SQLite, and the incoming files of messages on their
way in. The front door writes to it, delivery reads from it; neither knows the other."""

from .incoming import COPY_CHUNK, INCOMING, Spilled, SpillFile
from .store import (
    DSN,
    WHOLE,
    Delivery,
    Partition,
    QueueEntry,
    Spool,
    SpooledMessage,
    iso_utc,
)

__all__ = [
    "COPY_CHUNK",
    "DSN",
    "INCOMING",
    "WHOLE",
    "Delivery",
    "Partition",
    "QueueEntry",
    "SpillFile",
    "Spilled",
    "Spool",
    "SpooledMessage",
    "iso_utc",
]
