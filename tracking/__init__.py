"""Signed per-recipient tokens, the tracking HTTP app and the event log."""

from .app import PIXEL_GIF, create_app
from .errors import BadToken, TrackingError
from .events import MIGRATIONS, Event, EventStore, EventType
from .ratelimit import RateLimit
from .signing import Namespace, Signer, Verified
from .tokens import Click, Reading, RecipientRef, TrackingUrls
from .verdict import Judge, Verdict

__all__ = [
    "MIGRATIONS",
    "PIXEL_GIF",
    "BadToken",
    "Click",
    "Event",
    "EventStore",
    "EventType",
    "Judge",
    "Namespace",
    "RateLimit",
    "Reading",
    "RecipientRef",
    "Signer",
    "TrackingError",
    "TrackingUrls",
    "Verdict",
    "Verified",
    "create_app",
]
