"""Delivery: from the spool to the downstream MTA.

`DeliveryWorker` takes due deliveries, personalises and signs each copy through the
pipeline, and sends it through a `Transport` (pooled, pipelined SMTP, or the outbox
folder); 4xx waits by the `RetryPolicy`, 5xx and expiry send the sender a DSN.
`DeliveryRuntime` wires one worker from the settings; `DeliveryProcess` runs them in
child processes.
"""

from .processes import DeliveryProcess
from .runtime import DeliveryRuntime, build_transport, destination
from .worker import DeliveryWorker, RetryPolicy

__all__ = [
    "DeliveryProcess",
    "DeliveryRuntime",
    "DeliveryWorker",
    "RetryPolicy",
    "build_transport",
    "destination",
]
