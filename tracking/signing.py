"""The one signing primitive: itsdangerous, a namespace per token kind, rotating keys."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from enum import StrEnum
from typing import Any

from itsdangerous import BadData, URLSafeTimedSerializer

from .errors import BadToken

# Links must keep working for at least a year (law asks 30-60 days); two years of slack.
DEFAULT_MAX_AGE = timedelta(days=730)


class Namespace(StrEnum):
    """Token kinds; a token signed for one never verifies as another."""

    UNSUBSCRIBE = "optout.unsubscribe"
    OPEN = "optout.open"


class Signer:
    """Signs JSON payloads; the first key signs, every key verifies (rotation)."""

    def __init__(
        self, secret_keys: Sequence[str | bytes], *, max_age: timedelta = DEFAULT_MAX_AGE
    ) -> None:
        if not secret_keys:
            raise ValueError("at least one signing key is needed")
        # itsdangerous signs with the last key of the list and verifies with all of them.
        self._keys = [k.encode() if isinstance(k, str) else k for k in reversed(secret_keys)]
        self._max_age = int(max_age.total_seconds())
        self._serializers = {
            ns: URLSafeTimedSerializer(self._keys, salt=ns.value) for ns in Namespace
        }

    def sign(self, namespace: Namespace, payload: Any) -> str:
        token = self._serializers[namespace].dumps(payload)
        assert isinstance(token, str)
        return token

    def verify(self, namespace: Namespace, token: str) -> Any:
        """The payload of a genuine, unexpired token of `namespace`; BadToken otherwise."""
        try:
            return self._serializers[namespace].loads(token, max_age=self._max_age)
        except BadData as exc:
            raise BadToken(type(exc).__name__) from None
        except (ValueError, TypeError, UnicodeError, OverflowError) as exc:
            raise BadToken(type(exc).__name__) from None
