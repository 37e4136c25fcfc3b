"""The tracking package's exceptions."""


class TrackingError(Exception):
    """Base of every error this package raises on purpose."""


class BadToken(TrackingError):
    """A token that is forged, tampered with, expired or of another kind."""


class EventWriteError(TrackingError):
    """Open or click events that were not written (the database failed, or the event process
    stopped before it could write them)."""


class EventProcessError(TrackingError):
    """The event process (event_process.py) could not be started."""
