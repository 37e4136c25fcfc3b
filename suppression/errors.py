"""The suppression package's exceptions."""


class SuppressionError(Exception):
    """Base of every error this package raises on purpose."""


class InvalidAddress(SuppressionError, ValueError):
    def __init__(self, address: str, why: str) -> None:
        super().__init__(f"invalid address {address!r}: {why}")
        self.address = address
        self.why = why


class InvalidScope(SuppressionError, ValueError):
    def __init__(self, scope: str) -> None:
        super().__init__(
            f"invalid scope {scope!r}: expected 'global', 'topic:NAME' or 'sender:DOMAIN'"
        )
        self.scope = scope


class InvalidReason(SuppressionError, ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid reason {reason!r}")
        self.reason = reason


class PermanentReason(SuppressionError, ValueError):
    """An expiry was asked for a reason that must never lapse (a withdrawal of consent)."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"a suppression for reason {reason!r} never expires;"
            " only hard_bounce, manual and import may"
        )
        self.reason = reason


class ProtectedSuppression(SuppressionError):
    """A removal that needs `force`: the recipient's own opt-out, a complaint, or an erased
    person's suppression (nothing was removed)."""

    def __init__(self, address: str, why: str) -> None:
        super().__init__(f"not removed: {address} {why}; pass --force to lift it anyway (audited)")
        self.address = address
        self.why = why


class NormalizationChanged(SuppressionError):
    """The configured normalisation differs from the one the stored keys were made with."""

    def __init__(self, stored: str, configured: str) -> None:
        super().__init__(
            f"address normalisation changed from {stored!r} to {configured!r}: stored"
            " suppressions would no longer match; restore the setting or start a new data dir"
        )
        self.stored = stored
        self.configured = configured


class ImportFormatError(SuppressionError):
    """A file whose format cannot be recognised or that does not fit the format asked for."""

    def __init__(self, source: str, why: str) -> None:
        super().__init__(f"{source}: {why}")
        self.source = source
        self.why = why


class InvalidAge(SuppressionError, ValueError):
    def __init__(self, text: str, hint: str = "") -> None:
        super().__init__(
            f"invalid age {text!r}{hint}: a whole number and one of the units"
            " s, min, h, d, w, mo (30 days), y (365 days), e.g. 180d"
        )
        self.text = text


class SchemaMissing(SuppressionError):
    """A database opened only to read has no store in it (nothing was ever recorded)."""


class StorageUnavailable(SuppressionError):
    """The shared store (PostgreSQL) cannot be reached now: nothing was read or written.
    Callers answer 'try again later' (SMTP 451 4.3.0, HTTP 503), never a guess."""
