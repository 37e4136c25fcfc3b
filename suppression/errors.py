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
