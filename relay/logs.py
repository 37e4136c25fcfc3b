"""Operator logs on stderr: Postfix-like lines keyed by queue id, or JSON for log shippers."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from aiosmtpd.smtp import Session

LogFormat = Literal["text", "json"]


def client_name(session: Session) -> str:
    """An SMTP client as logs name it: `unknown[IP]`, as Postfix does without reverse DNS
    lookups (smtpd_peername_lookup = no). The HELO name is only the client's claim, so it
    is logged apart, as `helo=<...>`, never as the client's name."""
    peer = session.peer[0] if isinstance(session.peer, tuple) and session.peer else "?"
    return f"unknown[{peer}]"


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        queue_id = getattr(record, "queue_id", None)
        prefix = f"{queue_id}: " if queue_id else ""
        line = (
            f"{_timestamp(record)} optout-relay/{record.name.removeprefix('optout.')}"
            f"[{os.getpid()}]: {record.levelname.lower()}: {prefix}{record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "at": _timestamp(record),
            "level": record.levelname.lower(),
            "component": record.name.removeprefix("optout."),
            "message": record.getMessage(),
        }
        queue_id = getattr(record, "queue_id", None)
        if queue_id:
            entry["queue_id"] = queue_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(log_format: LogFormat = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger("optout")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # aiosmtpd logs every command at INFO, addresses included; ours says what matters once.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
