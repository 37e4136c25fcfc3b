"""Signed per-recipient tokens, the tracking HTTP app and the event log."""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from .app import PIXEL_GIF, create_app


def __getattr__(name: str) -> Any:
    """The HTTP app on first use: a delivery process needs tokens and events, not aiohttp."""
    if name in ("PIXEL_GIF", "create_app"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
