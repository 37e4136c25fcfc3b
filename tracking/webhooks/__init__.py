"""Signed webhooks (Standard Webhooks) for events and suppression changes, through an
outbox that triggers fill in the event's own transaction.

This face loads no HTTP client: the CLI lists and retries through it. The dispatcher and
the POST itself are in `tracking.webhooks.dispatch` (aiohttp).
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .endpoints import (
        SUPPRESSION_ADDED,
        SUPPRESSION_REMOVED,
        TEST_TYPE,
        WebhookConfigError,
        WebhookDelivery,
        WebhookEndpoint,
        check_secret,
        check_types,
        check_url,
        known_types,
        url_label,
    )
    from .outbox import (
        DELIVERED,
        FAILED,
        PENDING,
        STATES,
        Attempt,
        EndpointHealth,
        OutboxRow,
        WebhookOutbox,
        describe_health,
        iso_time,
    )
    from .schema import MIGRATIONS
else:
    from suppression._faces import names_on_first_use

    __getattr__ = names_on_first_use(
        __name__,
        {
            "SUPPRESSION_ADDED": ".endpoints",
            "SUPPRESSION_REMOVED": ".endpoints",
            "TEST_TYPE": ".endpoints",
            "WebhookConfigError": ".endpoints",
            "WebhookDelivery": ".endpoints",
            "WebhookEndpoint": ".endpoints",
            "check_secret": ".endpoints",
            "check_types": ".endpoints",
            "check_url": ".endpoints",
            "known_types": ".endpoints",
            "url_label": ".endpoints",
            "DELIVERED": ".outbox",
            "FAILED": ".outbox",
            "PENDING": ".outbox",
            "STATES": ".outbox",
            "Attempt": ".outbox",
            "EndpointHealth": ".outbox",
            "OutboxRow": ".outbox",
            "WebhookOutbox": ".outbox",
            "describe_health": ".outbox",
            "iso_time": ".outbox",
            "MIGRATIONS": ".schema",
        },
    )

__all__ = [
    "DELIVERED",
    "FAILED",
    "MIGRATIONS",
    "PENDING",
    "STATES",
    "SUPPRESSION_ADDED",
    "SUPPRESSION_REMOVED",
    "TEST_TYPE",
    "Attempt",
    "EndpointHealth",
    "OutboxRow",
    "WebhookConfigError",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookOutbox",
    "check_secret",
    "check_types",
    "check_url",
    "describe_health",
    "iso_time",
    "known_types",
    "url_label",
]
