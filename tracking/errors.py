"""The tracking package's exceptions."""


class TrackingError(Exception):
    """Base of every error this package raises on purpose."""


class BadToken(TrackingError):
    """A token that is forged, tampered with, expired or of another kind."""
