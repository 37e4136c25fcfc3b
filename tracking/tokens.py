"""What a per-recipient token says, and the URLs that carry it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from suppression import GLOBAL

from .errors import BadToken
from .signing import Namespace, Signer, Verified

UNSUBSCRIBE_PATH = "/u/"
PREFERENCES_PATH = "/p/"  # the recipient's tracking preferences, with their unsubscribe token
OPEN_PATH = "/o/"
CLICK_PATH = "/c/"
PIXEL_SUFFIX = ".gif"
# Where a click URL names its recipient, an aggregate one has this (no token is one).
AGGREGATE_CLICK = "-"
# The first item of an aggregate payload: no keyed hash is ever this.
_AGGREGATE = "*"
# What a Location header may carry: printable ASCII, no spaces (the rewriter encodes the rest).
_PRINTABLE = re.compile(r"[\x21-\x7e]+")


def is_redirectable(url: str) -> bool:
    """An absolute http(s) URL with a host, and nothing that could bend a header: the only
    links the rewriter turns into click URLs, and the only ones a click redirects to."""
    if not _PRINTABLE.fullmatch(url):
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


@dataclass(frozen=True, slots=True)
class RecipientRef:
    """A recipient of one message, named by keyed hash: no address is in any token.

    The message is named by the relay's queue id (12 characters), not its Message-ID, which
    is long and the sender's text; events look the Message-ID up when they are recorded.
    """

    address_hash: str
    scope: str = GLOBAL
    campaign: str | None = None
    queue_id: str | None = None

    def payload(self) -> list[str | None]:
        return [self.address_hash, self.scope, self.campaign, self.queue_id]

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


@dataclass(frozen=True, slots=True)
class Reading:
    """A genuine token read: the recipient, when the copy was personalised, which key."""

    ref: RecipientRef
    signed_at: int  # Unix time the copy was made, i.e. about when it was delivered
    key_id: str

    @classmethod
    def of(cls, verified: Verified) -> Reading:
        return cls(RecipientRef.from_payload(verified.payload), verified.signed_at, verified.key_id)


@dataclass(frozen=True, slots=True)
class AggregateRef:
    """What an aggregate pixel or link names: the campaign and the sending domain, for the
    counts. Nothing of the recipient, the copy or the message's queue id."""

    campaign: str | None = None
    domain: str | None = None

    def payload(self) -> list[str | None]:
        return [_AGGREGATE, self.campaign, self.domain]

    @classmethod
    def from_payload(cls, payload: Any) -> AggregateRef:
        if (
            not isinstance(payload, list)
            or len(payload) != 3
            or payload[0] != _AGGREGATE
            or not all(item is None or isinstance(item, str) for item in payload[1:])
        ):
            raise BadToken("malformed payload")
        return cls(payload[1], payload[2])


@dataclass(frozen=True, slots=True)
class AggregateReading:
    """A genuine aggregate token read: the counts it goes to, when its message came in."""

    ref: AggregateRef
    signed_at: int  # Unix time the message arrived (the same for every copy)
    key_id: str


@dataclass(frozen=True, slots=True)
class Click:
    """A genuine click URL: the reading (a recipient's, or an aggregate one) and the one URL
    signed for the message."""

    reading: Reading | AggregateReading
    url: str


def _is_aggregate(payload: Any) -> bool:
    return isinstance(payload, list) and bool(payload) and payload[0] == _AGGREGATE


class TrackingUrls:
    """Builds and reads the URLs placed in mail, all under the public base URL."""

    def __init__(self, public_url: str, signer: Signer) -> None:
        self.public_url = public_url.rstrip("/")
        self._signer = signer

    @property
    def key_ids(self) -> tuple[str, ...]:
        return self._signer.key_ids

    def unsubscribe_url(self, ref: RecipientRef) -> str:
        token = self._signer.sign(Namespace.UNSUBSCRIBE, ref.payload())
        return f"{self.public_url}{UNSUBSCRIBE_PATH}{token}"

    def pixel_url(self, ref: RecipientRef) -> str:
        token = self._signer.sign(Namespace.OPEN, ref.payload())
        return f"{self.public_url}{OPEN_PATH}{token}{PIXEL_SUFFIX}"

    def preferences_url(self, unsubscribe_url: str) -> str:
        """The tracking preference page of the recipient an unsubscribe URL names (the same
        signed token: no second signature per copy)."""
        token = unsubscribe_url.rpartition(UNSUBSCRIBE_PATH)[2]
        return f"{self.public_url}{PREFERENCES_PATH}{token}"

    def aggregate_pixel_url(self, ref: AggregateRef, at: int) -> str:
        """The pixel of every copy of a message measured in aggregate: signed with the
        message's arrival time `at`, so that every copy, retries included, has this URL."""
        token = self._signer.sign_at(Namespace.OPEN, ref.payload(), at)
        return f"{self.public_url}{OPEN_PATH}{token}{PIXEL_SUFFIX}"

    def aggregate_click_url(self, ref: AggregateRef, url: str, at: int) -> str:
        """A link of every copy of a message measured in aggregate (see
        `aggregate_pixel_url`): one token, the counts and the destination."""
        token = self._signer.sign_at(Namespace.LINK, [*ref.payload(), url], at)
        return f"{self.public_url}{CLICK_PATH}{AGGREGATE_CLICK}/{token}"

    def link_token(self, queue_id: str, url: str) -> str:
        """The per-message half of a click URL: signs exactly one destination (once per link)."""
        return self._signer.sign(Namespace.LINK, [queue_id, url])

    def click_prefix(self, ref: RecipientRef) -> str:
        """The per-recipient half of every click URL of a copy; a link token follows it."""
        token = self._signer.sign(Namespace.CLICK, ref.payload())
        return f"{self.public_url}{CLICK_PATH}{token}/"

    def click_url(self, ref: RecipientRef, url: str) -> str:
        """One click URL on its own (the pipeline joins prefix and link tokens itself)."""
        assert ref.queue_id is not None
        return self.click_prefix(ref) + self.link_token(ref.queue_id, url)

    def read_unsubscribe(self, token: str) -> RecipientRef:
        return self.check_unsubscribe(token).ref

    def read_open(self, token: str) -> RecipientRef:
        return self.check_open(token).ref

    def check_unsubscribe(self, token: str) -> Reading:
        return Reading.of(self._signer.open(Namespace.UNSUBSCRIBE, token))

    def check_open(self, token: str) -> Reading:
        reading = self.check_beacon(token)
        if isinstance(reading, AggregateReading):
            raise BadToken("an aggregate pixel names no recipient")
        return reading

    def check_beacon(self, token: str) -> Reading | AggregateReading:
        """A genuine pixel token: a recipient's, or an aggregate one."""
        verified = self._signer.open(Namespace.OPEN, token)
        if _is_aggregate(verified.payload):
            ref = AggregateRef.from_payload(verified.payload)
            return AggregateReading(ref, verified.signed_at, verified.key_id)
        return Reading.of(verified)

    def check_click(self, recipient_token: str, link_token: str) -> Click:
        """Both halves genuine and of the same message; else BadToken (no redirect at all).
        An aggregate link is one token (`AGGREGATE_CLICK` where the recipient would be)."""
        if recipient_token == AGGREGATE_CLICK:
            return self._check_aggregate_click(link_token)
        reading = Reading.of(self._signer.open(Namespace.CLICK, recipient_token))
        link = self._signer.open(Namespace.LINK, link_token).payload
        if (
            not isinstance(link, list)
            or len(link) != 2
            or not isinstance(link[0], str)
            or not isinstance(link[1], str)
        ):
            raise BadToken("malformed link")
        queue_id, url = link
        if reading.ref.queue_id is None or queue_id != reading.ref.queue_id:
            raise BadToken("link of another message")
        return Click(reading, url)

    def _check_aggregate_click(self, link_token: str) -> Click:
        verified = self._signer.open(Namespace.LINK, link_token)
        payload = verified.payload
        if not _is_aggregate(payload) or len(payload) != 4 or not isinstance(payload[3], str):
            raise BadToken("malformed link")
        ref = AggregateRef.from_payload(payload[:3])
        return Click(AggregateReading(ref, verified.signed_at, verified.key_id), payload[3])
