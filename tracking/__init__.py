"""Signed per-recipient tokens, the tracking HTTP app and the event log."""

from typing import TYPE_CHECKING

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
else:
    from suppression._faces import names_on_first_use

    # A command that needs one submodule (the CLI's config reads tracking.modes) loads
    # neither the event log, the tokens nor aiohttp.
    __getattr__ = names_on_first_use(
        __name__,
        {
            "PIXEL_GIF": ".app",
            "create_app": ".app",
            "BadToken": ".errors",
            "TrackingError": ".errors",
            "MIGRATIONS": ".events",
            "Event": ".events",
            "EventStore": ".events",
            "EventType": ".events",
            "RateLimit": ".ratelimit",
            "Namespace": ".signing",
            "Signer": ".signing",
            "Verified": ".signing",
            "Click": ".tokens",
            "Reading": ".tokens",
            "RecipientRef": ".tokens",
            "TrackingUrls": ".tokens",
            "Judge": ".verdict",
            "Verdict": ".verdict",
        },
    )
