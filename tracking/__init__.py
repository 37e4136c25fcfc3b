"""Signed per-recipient tokens, the tracking HTTP app and the event log."""

import importlib
from typing import TYPE_CHECKING, Any

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
    from .errors import BadToken, TrackingError
    from .events import MIGRATIONS, Event, EventStore, EventType
    from .ratelimit import RateLimit
    from .signing import Namespace, Signer, Verified
    from .tokens import Click, Reading, RecipientRef, TrackingUrls
    from .verdict import Judge, Verdict

# Each name from the private module that defines it, on first use: a command that needs
# one submodule (the CLI's config reads tracking.modes) loads neither the event log,
# the tokens nor aiohttp.
_HOMES = {
    "PIXEL_GIF": "app",
    "create_app": "app",
    "BadToken": "errors",
    "TrackingError": "errors",
    "MIGRATIONS": "events",
    "Event": "events",
    "EventStore": "events",
    "EventType": "events",
    "RateLimit": "ratelimit",
    "Namespace": "signing",
    "Signer": "signing",
    "Verified": "signing",
    "Click": "tokens",
    "Reading": "tokens",
    "RecipientRef": "tokens",
    "TrackingUrls": "tokens",
    "Judge": "verdict",
    "Verdict": "verdict",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value
