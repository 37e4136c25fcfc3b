"""Signed per-recipient tokens, the tracking HTTP app and the event log."""

from .app import PIXEL_GIF, create_app
from .errors import BadToken, TrackingError
from .events import MIGRATIONS, Event, EventStore, EventType
from .signing import Namespace, Signer
from .tokens import RecipientRef, TrackingUrls

__all__ = [
    "MIGRATIONS",
    "PIXEL_GIF",
    "BadToken",
    "Event",
    "EventStore",
    "EventType",
    "Namespace",
    "RecipientRef",
    "Signer",
    "TrackingError",
    "TrackingUrls",
    "create_app",
]
