"""The relay package's exceptions."""


class RelayError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(RelayError):
    """A config key that is unknown, of the wrong type or unusable; names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem
