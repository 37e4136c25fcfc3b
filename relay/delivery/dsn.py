"""Delivery status notifications (RFC 3464): telling the sender a message failed for good."""

from __future__ import annotations

import quopri
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, formatdate

from ..mime import crlf_line_breaks, headers_of

_ENHANCED = re.compile(r"^\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b")


@dataclass(frozen=True, slots=True)
class Failure:
    recipient: str
    reply: str  # the downstream's reply, or our own reason
    status: str  # RFC 3463 enhanced status code, e.g. 5.1.1
    remote_mta: str | None


def status_of(reply: str, default: str = "5.0.0") -> str:
    """The enhanced status code in an SMTP reply, or `default`."""
    match = _ENHANCED.match(reply)
    return match.group(1) if match else default


def _ascii(text: str) -> str:
    # Header and report fields are ASCII here; anything else is shown escaped, not dropped.
    return (
        text.encode("ascii", "backslashreplace")
        .decode("ascii")
        .replace("\r", " ")
        .replace("\n", " ")
    )


def build_dsn(
    *,
    reporting_mta: str,
    original_sender: str,
    original: bytes,
    arrival: datetime,
    failure: Failure,
    queue_id: str,
) -> bytes:
    """A multipart/report DSN for one failed recipient, sent from the null sender."""
    boundary = f"{queue_id}.{secrets.token_hex(8)}/{reporting_mta}"
    now = datetime.now(UTC)
    headers = headers_of(original)
    recipient = _ascii(failure.recipient)
    diagnostic = _ascii(failure.reply)
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{_ascii(original_sender)}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {formatdate(localtime=False)}",
        f"Message-ID: <{queue_id}.{secrets.token_hex(6)}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "It is attached below.",
        "",
        f"<{recipient}>: {diagnostic}",
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Queue-ID: {queue_id}",
        f"Arrival-Date: {format_datetime(arrival)}",
        "",
        f"Final-Recipient: rfc822; {recipient}",
        "Action: failed",
        f"Status: {failure.status}",
    ]
    if failure.remote_mta:
        lines.append(f"Remote-MTA: dns; {_ascii(failure.remote_mta)}")
    lines += [
        f"Diagnostic-Code: smtp; {diagnostic}",
        f"Last-Attempt-Date: {format_datetime(now)}",
        "",
        f"--{boundary}",
        "Content-Description: Undelivered Message Headers",
        "Content-Type: text/rfc822-headers",
    ]
    original_headers = headers if headers.endswith(b"\n") else headers + b"\r\n"
    if not original_headers.isascii():
        # A report is 7-bit, whatever the next hop takes: 8-bit headers go encoded.
        lines.append("Content-Transfer-Encoding: quoted-printable")
        original_headers = crlf_line_breaks(quopri.encodestring(original_headers))
    lines.append("")
    head = "\r\n".join(lines).encode("ascii") + b"\r\n"
    return head + original_headers + f"\r\n--{boundary}--\r\n".encode("ascii")
