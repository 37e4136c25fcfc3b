"""Feedback tests' parts: settings with the listener on, copies as delivery records them,
and the reports mailbox providers send (DSNs, ARF, text bounces, auto-replies)."""

from __future__ import annotations

import smtplib
from dataclasses import dataclass, replace
from pathlib import Path

from relay.app import Relay
from relay.feedback import CopyRecord, CopyTokens, FeedbackStore, TokenKind, copy_id
from relay.settings import FeedbackSettings, Listen, Settings
from relay.stores import signer, tracking_urls
from suppression import GLOBAL
from tracking import RecipientRef, TrackingUrls

FEEDBACK_DOMAIN = "bounces.shop.example"
ARF_DIR = Path(__file__).parent / "data" / "arf"


def with_feedback(settings: Settings, **changes: object) -> Settings:
    feedback = FeedbackSettings(listen=Listen("127.0.0.1", 0), domain=FEEDBACK_DOMAIN)
    return replace(settings, feedback=replace(feedback, **changes))


@dataclass(frozen=True)
class SentCopy:
    address: str
    queue_id: str
    return_path: str  # b-...@domain
    mailto: str  # u-...@domain
    reference: str  # r-...
    unsubscribe_url: str


async def sent_copy(
    relay: Relay,
    address: str,
    *,
    queue_id: str = "0A1B2C3D4E5F",
    scope: str = GLOBAL,
    campaign: str | None = "spring",
) -> SentCopy:
    """A copy as the delivery worker records it before sending: its record and addresses."""
    suppressions = relay.stores.suppressions
    address_hash = suppressions.hasher.hash(address)
    await suppressions.remember([address])
    copy = copy_id(queue_id, address_hash)
    await FeedbackStore(suppressions.database).record_copies(
        [
            CopyRecord(
                copy,
                address_hash,
                queue_id,
                scope,
                campaign,
                recipient_domain=address.rpartition("@")[2],
            )
        ]
    )
    tokens = CopyTokens(signer(relay.settings))
    urls = relay_urls(relay)
    return SentCopy(
        address,
        queue_id,
        tokens.address(TokenKind.RETURN_PATH, copy, FEEDBACK_DOMAIN),
        tokens.address(TokenKind.MAILTO, copy, FEEDBACK_DOMAIN),
        tokens.make(TokenKind.REFERENCE, copy),
        urls.unsubscribe_url(RecipientRef(address_hash, scope, campaign, queue_id)),
    )


def relay_urls(relay: Relay) -> TrackingUrls:
    return tracking_urls(relay.settings)


def feedback_port(relay: Relay) -> int:
    assert relay.addresses.feedback is not None
    return relay.addresses.feedback[1]


def send_report(
    port: int, content: bytes, recipients: list[str], sender: str = ""
) -> dict[str, tuple[int, bytes]]:
    """What the listener refused; raises if it refused everyone."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        return dict(client.sendmail(sender, recipients, content))


def dsn(
    to: str,
    recipient: str,
    *,
    action: str = "failed",
    status: str = "5.1.1",
    diagnostic: str = "smtp; 550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown",
    reporting_mta: str = "mx.example.org",
) -> bytes:
    """A delivery status notification as Postfix writes one (RFC 3464)."""
    boundary = "B0UND.1234/mx.example.org"
    lines = [
        "From: MAILER-DAEMON@mx.example.org (Mail Delivery System)",
        f"To: {to}",
        "Subject: Undelivered Mail Returned to Sender",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain",
        "",
        "I'm sorry to have to inform you that your message could not be delivered.",
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {reporting_mta}",
        "X-Postfix-Queue-ID: 4XkQ2",
        "",
        f"Final-Recipient: rfc822; {recipient}",
        f"Original-Recipient: rfc822;{recipient}",
        f"Action: {action}",
        f"Status: {status}",
        "Remote-MTA: dns; mx2.example.org",
        f"Diagnostic-Code: {diagnostic.format(rcpt=recipient)}",
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
        "From: Shop <news@shop.example>",
        f"To: {recipient}",
        "Subject: Spring sale",
        "",
        f"--{boundary}--",
        "",
    ]
    return "\r\n".join(lines).encode()


def arf(returned_headers: list[str], *, feedback_type: str = "abuse") -> bytes:
    """A complaint report as a feedback loop sends one (RFC 5965), returning the headers."""
    boundary = "arf_boundary_1"
    lines = [
        "From: <staff@hotmail.example>",
        "To: <fbl@bounces.shop.example>",
        "Subject: complaint about message from 192.0.2.7",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=feedback-report; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain",
        "",
        "This is an email abuse report for an email message received from IP 192.0.2.7.",
        "",
        f"--{boundary}",
        "Content-Type: message/feedback-report",
        "",
        f"Feedback-Type: {feedback_type}",
        "User-Agent: JMRP/1.0",
        "Version: 1",
        "Reporting-MTA: dns; mail.hotmail.example",
        "Original-Rcpt-To: <redacted>",
        "",
        f"--{boundary}",
        "Content-Type: message/rfc822",
        "Content-Disposition: inline",
        "",
        *returned_headers,
        "",
        "Our spring sale starts today.",
        f"--{boundary}--",
        "",
    ]
    return "\r\n".join(lines).encode()


def qmail_bounce(to: str, recipient: str) -> bytes:
    return "\r\n".join(
        [
            "From: MAILER-DAEMON@mail.example.org",
            f"To: {to}",
            "Subject: failure notice",
            "",
            "Hi. This is the qmail-send program at mail.example.org.",
            "I'm afraid I wasn't able to deliver your message to the following addresses.",
            "This is a permanent error; I've given up. Sorry it didn't work out.",
            "",
            f"<{recipient}>:",
            "Sorry, no mailbox here by that name. (#5.1.1)",
            "",
            "--- Below this line is a copy of the message.",
            "",
            "Subject: Spring sale",
            "",
        ]
    ).encode()


def person_message(sender: str, to: str, *, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"From: {sender}", f"To: {to}", "Subject: unsubscribe"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    lines += ["", "Please take me off this list.", ""]
    return "\r\n".join(lines).encode()
