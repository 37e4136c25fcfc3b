"""Webhook endpoints as configured, how a body is signed for them, and the retry policy."""

from __future__ import annotations

import base64
import binascii
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"  # noqa: S105 - the prefix, not a secret
# Standard Webhooks: secrets of 24 to 64 random bytes.
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64

SUPPRESSION_ADDED = "suppression.added"
SUPPRESSION_REMOVED = "suppression.removed"
# Types the contract announces that other parts of the relay record (feedback, front door);
# an endpoint may ask for them before they are written.
_ANNOUNCED = ("complaint", "refused")
TEST_TYPE = "webhook.test"


def known_types() -> frozenset[str]:
    # Imported here: tracking.events queues webhooks, so it imports this package.
    from ..events import EventType

    return frozenset(
        {*(kind.value for kind in EventType), SUPPRESSION_ADDED, SUPPRESSION_REMOVED, *_ANNOUNCED}
    )


class WebhookConfigError(ValueError):
    """A webhook setting that cannot be used; the message names the problem."""


def check_url(url: str) -> str:
    """An http(s) URL with a host (any host: the operator names it, loopback included)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise WebhookConfigError(f"not a usable URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookConfigError(f"must be an http:// or https:// URL with a host (got {url!r})")
    if parts.fragment:
        raise WebhookConfigError("must not have a #fragment")
    return url


def check_secret(secret: str) -> str:
    """A Standard Webhooks secret: whsec_ and the base64 of 24 to 64 random bytes."""
    if not secret.startswith(SECRET_PREFIX):
        raise WebhookConfigError(f"must start with {SECRET_PREFIX} (a Standard Webhooks secret)")
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise WebhookConfigError(f"must be {SECRET_PREFIX} followed by base64") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise WebhookConfigError(
            f"must hold {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes (has {len(key)})"
        )
    return secret


def check_types(types: Iterable[str]) -> tuple[str, ...]:
    known = known_types()
    wanted = tuple(dict.fromkeys(types))
    for kind in wanted:
        if kind not in known:
            choices = ", ".join(sorted(known))
            raise WebhookConfigError(f"unknown event type {kind!r} (one of {choices})")
    return wanted


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    """One `[[webhooks]]` table. The secrets never show in a repr, a log line or an error."""

    url: str
    secret: str = field(repr=False)
    events: tuple[str, ...] | None = None  # None: every type
    # While a rotation is under way the receiver may still know only the old secret: every
    # POST carries a signature by each (Standard Webhooks allows several, space-separated).
    previous_secret: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_url(self.url)
        check_secret(self.secret)
        if self.previous_secret is not None:
            check_secret(self.previous_secret)
        if self.events is not None:
            check_types(self.events)

    @property
    def types(self) -> tuple[str, ...]:
        """What the outbox triggers match: the listed types, or '*' for all."""
        return self.events if self.events is not None else ("*",)

    @property
    def label(self) -> str:
        """scheme://host[:port], for logs and /healthz: a path or query may hold a token."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"

    def signature(self, webhook_id: str, timestamp: int, body: bytes) -> str:
        """The webhook-signature header: `v1,<base64>`, one per secret, newest first."""
        moment = datetime.fromtimestamp(timestamp, UTC)
        secrets = (
            [self.secret]
            if self.previous_secret is None
            else [
                self.secret,
                self.previous_secret,
            ]
        )
        return " ".join(Webhook(secret).sign(webhook_id, moment, body) for secret in secrets)

    def headers(self, webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        return {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": self.signature(webhook_id, timestamp, body),
            "Content-Type": "application/json",
        }


def url_label(url: str) -> str:
    """scheme://host[:port] of any URL (for rows whose endpoint is no longer configured)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "(unreadable URL)"
    return f"{parts.scheme}://{parts.hostname}{f':{port}' if port else ''}"


# The waits before each retry, in units of `first_retry`: with its default of 5 s, the
# first two retries come within a minute (5 s, 30 s), then 2 min, 10 min, 30 min, 1 h, 2 h,
# 4 h, 8 h, and every 12 h after that until `give_up_after` (3 days).
_BACKOFF = (1, 6, 24, 120, 360, 720, 1440, 2880, 5760, 8640)
JITTER = 0.1


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """The `[webhook_delivery]` section: how hard and how long the relay tries."""

    timeout: float = 10.0  # seconds for one POST, connecting included
    first_retry: float = 5.0
    give_up_after: float = 3 * 24 * 3600.0
    concurrency: int = 4  # POSTs in flight at once, over all endpoints

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after `attempts` failed tries (1 after the first), with jitter."""
        step = _BACKOFF[min(attempts, len(_BACKOFF)) - 1] if attempts >= 1 else 0
        base = self.first_retry * step
        return base * (1 + (rng or random).uniform(-JITTER, JITTER))
