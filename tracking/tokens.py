"""What a per-recipient token says, and the URLs that carry it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from suppression import GLOBAL

from .errors import BadToken
from .signing import Namespace, Signer

UNSUBSCRIBE_PATH = "/u/"
OPEN_PATH = "/o/"
PIXEL_SUFFIX = ".gif"


@dataclass(frozen=True, slots=True)
class RecipientRef:
    """A recipient of one message, named by keyed hash: no address is in any token."""

    address_hash: str
    scope: str = GLOBAL
    campaign: str | None = None
    message_id: str | None = None

    def payload(self) -> list[str | None]:
        return [self.address_hash, self.scope, self.campaign, self.message_id]

    @classmethod
    def from_payload(cls, payload: Any) -> RecipientRef:
        if (
            not isinstance(payload, list)
            or len(payload) != 4
            or not isinstance(payload[0], str)
            or not isinstance(payload[1], str)
            or not all(item is None or isinstance(item, str) for item in payload[2:])
        ):
            raise BadToken("malformed payload")
        return cls(*payload)


class TrackingUrls:
    """Builds and reads the URLs placed in mail, all under the public base URL."""

    def __init__(self, public_url: str, signer: Signer) -> None:
        self.public_url = public_url.rstrip("/")
        self._signer = signer

    def unsubscribe_url(self, ref: RecipientRef) -> str:
        token = self._signer.sign(Namespace.UNSUBSCRIBE, ref.payload())
        return f"{self.public_url}{UNSUBSCRIBE_PATH}{token}"

    def pixel_url(self, ref: RecipientRef) -> str:
        token = self._signer.sign(Namespace.OPEN, ref.payload())
        return f"{self.public_url}{OPEN_PATH}{token}{PIXEL_SUFFIX}"

    def read_unsubscribe(self, token: str) -> RecipientRef:
        return RecipientRef.from_payload(self._signer.verify(Namespace.UNSUBSCRIBE, token))

    def read_open(self, token: str) -> RecipientRef:
        return RecipientRef.from_payload(self._signer.verify(Namespace.OPEN, token))
