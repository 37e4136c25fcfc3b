"""The relay package's exceptions."""


class RelayError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(RelayError):
    """A config key that is unknown, of the wrong type or unusable; names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class MissingStore(RelayError):
    """A command that only reads found no store to read (and does not create one)."""

    def __init__(self, path: object) -> None:
        super().__init__(
            f"no store in {path}: nothing recorded there yet (serve, suppress add and"
            " suppress import create it); is --config or OPTOUT_RELAY_CONFIG the right file?"
        )
        self.path = path
