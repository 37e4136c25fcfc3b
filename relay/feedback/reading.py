"""What a message that reached the feedback listener is: a delivery status notification
(RFC 3464), a complaint report (RFC 5965 ARF), an automatic reply, a bounce in some older
text form, or a person's message. Reading only: what to do about it is `effects`' job.

DSNs and ARF reports are read with the email package (it parses message/delivery-status
into its per-recipient blocks itself); bounces in the many non-standard text forms (old
qmail, Exim, Exchange, Yahoo, ...) are recognised by `flufl.bounce`, Mailman's detectors,
rather than by patterns of our own.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser
from enum import StrEnum

from flufl.bounce import all_failures

from ..mime import address_domain

# RFC 3464 §2.3.3: what happened to one recipient.
FAILED = "failed"
DELAYED = "delayed"
# RFC 5965 §7.3 and RFC 6591: the feedback types that are a recipient's complaint.
COMPLAINT_TYPES = frozenset({"abuse", "fraud", "virus"})
# Headers that only automatic responders set (RFC 3834 §5 names Auto-Submitted; the others
# are what vacation programs and challenge-response systems add in practice).
_AUTOMATIC_HEADERS = (
    "x-autoreply",
    "x-autorespond",
    "x-autoresponder",
    "x-autoreply-from",
    "x-mail-autoreply",
    "x-vacation",
    "x-boxtrapper",
    "x-cr-hashedpuzzle",
    "x-challenge",
)
_AUTOMATIC_PRECEDENCE = frozenset({"auto_reply", "bulk", "junk"})
_VACATION_SUBJECTS = (
    "auto:",
    "autoreply",
    "auto-reply",
    "auto reply",
    "automatic reply",
    "out of office",
    "out of the office",
    "vacation",
    "abwesenheitsnotiz",
    "réponse automatique",
)


class Nature(StrEnum):
    DSN = "dsn"  # multipart/report; report-type=delivery-status
    ARF = "arf"  # multipart/report; report-type=feedback-report
    TEXT_BOUNCE = "text"  # a bounce flufl.bounce recognises
    AUTOMATIC = "automatic"  # an auto-reply, vacation notice or challenge
    MESSAGE = "message"  # none of these: a person wrote it (or nobody can tell)
    UNREADABLE = "unreadable"  # the parser gave up: kept for the operator, never acted on


class BounceKind(StrEnum):
    HARD = "hard"
    SOFT = "soft"
    POLICY = "policy"  # 5.7.x / 4.7.x: the receiver refused the sender, not the address


@dataclass(frozen=True, slots=True)
class Bounce:
    kind: BounceKind
    status: str | None  # RFC 3463, e.g. 5.1.1
    diagnostic: str | None
    reporting_mta: str | None
    remote_mta: str | None
    action: str | None  # RFC 3464's, for DSNs


@dataclass(frozen=True, slots=True)
class Complaint:
    feedback_type: str
    reporter: str | None  # the reporting MTA, or the domain the report came from
    user_agent: str | None


@dataclass(frozen=True, slots=True)
class Reading:
    nature: Nature
    bounce: Bounce | None = None
    complaint: Complaint | None = None
    # The headers of the message it is about, as returned in the report ("Name: value"
    # lines), where our tokens may be found when the recipient's address is redacted.
    returned_headers: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    subject: str | None = None

    @property
    def automatic(self) -> bool:
        return self.nature is not Nature.MESSAGE


def read_report(content: bytes, mail_from: str) -> Reading:
    """What `content`, received from `mail_from` ('' for the null sender), is."""
    try:
        return _read(content, mail_from)
    except Exception as exc:  # whatever the email package trips on: kept, not acted on
        return Reading(Nature.UNREADABLE, notes=(f"{type(exc).__name__}: {exc}"[:200],))


def _read(content: bytes, mail_from: str) -> Reading:
    message = email.message_from_bytes(content, policy=email.policy.compat32)
    subject = _one_line(message.get("Subject"))
    if message.get_content_type() == "multipart/report":
        param = message.get_param("report-type")
        report_type = param.lower() if isinstance(param, str) else ""
        if report_type == "delivery-status":
            return _read_dsn(message, subject)
        if report_type == "feedback-report":
            return _read_arf(message, subject)
    failures = _flufl_failures(message)
    if failures is not None:
        return failures
    if _is_automatic(message, mail_from):
        return Reading(Nature.AUTOMATIC, subject=subject)
    return Reading(Nature.MESSAGE, subject=subject)


# ---- RFC 3464 delivery status notifications ----


def _read_dsn(message: Message, subject: str | None) -> Reading:
    parts = _parts(message)
    if not parts:
        return Reading(Nature.DSN, notes=("malformed: no parts",), subject=subject)
    status_part = next(
        (p for p in parts if p.get_content_type() == "message/delivery-status"), None
    )
    blocks = _parts(status_part) if status_part is not None else []
    if not blocks:
        return Reading(Nature.DSN, notes=("malformed: no delivery-status",), subject=subject)
    per_message, recipients = blocks[0], blocks[1:]
    reporting_mta = _typed_value(per_message.get("Reporting-MTA"))
    chosen = _worst(recipients)
    returned = _returned_headers(parts)
    if chosen is None:
        return Reading(Nature.DSN, notes=("no recipient block",), returned_headers=returned)
    action = (_one_line(chosen.get("Action")) or "").lower()
    status = _status(chosen.get("Status"))
    bounce = None
    if action in (FAILED, DELAYED):
        bounce = Bounce(
            kind=_bounce_kind(action, status),
            status=status,
            diagnostic=_typed_value(chosen.get("Diagnostic-Code")),
            reporting_mta=reporting_mta,
            remote_mta=_typed_value(chosen.get("Remote-MTA")),
            action=action,
        )
    notes = () if bounce else (f"action {action or 'missing'}: not a failure",)
    return Reading(
        Nature.DSN, bounce=bounce, returned_headers=returned, notes=notes, subject=subject
    )


def _worst(recipients: list[Message]) -> Message | None:
    """The block that says most: a failure, else a delay, else the first. A copy has one
    recipient, so there is rarely a choice."""
    for wanted in (FAILED, DELAYED):
        for block in recipients:
            if (_one_line(block.get("Action")) or "").lower() == wanted:
                return block
    return recipients[0] if recipients else None


def _status(value: object) -> str | None:
    text = _one_line(value)
    if not text:
        return None
    code = text.split()[0]
    pieces = code.split(".")
    if len(pieces) == 3 and pieces[0] in "245" and all(p.isdigit() for p in pieces):
        return code
    return None


def _bounce_kind(action: str, status: str | None) -> BounceKind:
    """RFC 3463: class 5 is permanent, 4 transient; subject 7 is security or policy."""
    if status is not None and status[2:4] == "7.":
        return BounceKind.POLICY
    if action == FAILED and (status is None or status.startswith("5.")):
        return BounceKind.HARD
    return BounceKind.SOFT


# ---- RFC 5965 abuse reporting format ----


def _read_arf(message: Message, subject: str | None) -> Reading:
    parts = _parts(message)
    if not parts:
        return Reading(Nature.ARF, notes=("malformed: no parts",), subject=subject)
    report = next((p for p in parts if p.get_content_type() == "message/feedback-report"), None)
    fields = _feedback_fields(report)
    if fields is None:
        return Reading(Nature.ARF, notes=("malformed: no feedback-report",), subject=subject)
    feedback_type = (_one_line(fields.get("Feedback-Type")) or "").lower()
    reporter = _typed_value(fields.get("Reporting-MTA")) or _sender_domain(message)
    complaint = Complaint(
        feedback_type=feedback_type or "unknown",
        reporter=reporter,
        user_agent=_one_line(fields.get("User-Agent")),
    )
    return Reading(
        Nature.ARF,
        complaint=complaint,
        returned_headers=_returned_headers(parts),
        subject=subject,
    )


def _feedback_fields(part: Message | None) -> Message | None:
    """The fields of a message/feedback-report part (the email package parses a message/*
    part it does not know as an enclosed message: its headers are the fields)."""
    if part is None:
        return None
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        return payload[0]
    if isinstance(payload, str):
        return BytesHeaderParser(policy=email.policy.compat32).parsebytes(
            payload.encode("utf-8", "surrogateescape")
        )
    return None


def _returned_headers(parts: list[Message]) -> str:
    """The header fields of the message a report is about, from its message/rfc822,
    message/rfc822-headers or text/rfc822-headers part."""
    for part in parts[1:]:
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/global"):
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                return _header_lines(inner[0])
        if ctype in ("text/rfc822-headers", "message/rfc822-headers"):
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                parsed = BytesHeaderParser(policy=email.policy.compat32).parsebytes(payload)
                return _header_lines(parsed)
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                return _header_lines(inner[0])
    return ""


def _header_lines(message: Message) -> str:
    return "\n".join(f"{name}: {_one_line(value) or ''}" for name, value in message.items())


# ---- everything else ----


def _flufl_failures(message: Message) -> Reading | None:
    """A bounce in one of the text forms Mailman's detectors know; None if none says so."""
    try:
        temporary, permanent = all_failures(message)
    except Exception:  # a detector tripping over a strange message is no bounce
        return None
    if not (temporary or permanent):
        return None
    kind = BounceKind.HARD if permanent else BounceKind.SOFT
    bounce = Bounce(kind, None, None, _sender_domain(message), None, None)
    return Reading(
        Nature.TEXT_BOUNCE,
        bounce=bounce,
        returned_headers=_returned_headers(_parts(message)),
        subject=_one_line(message.get("Subject")),
    )


def _parts(message: Message) -> list[Message]:
    """The parts of a multipart entity (or the blocks of a delivery-status one)."""
    payload = message.get_payload()
    if not isinstance(payload, list):
        return []
    return [part for part in payload if isinstance(part, Message)]


def _is_automatic(message: Message, mail_from: str) -> bool:
    """An auto-reply, vacation notice or challenge (RFC 3834): never a person's opt-out."""
    if not mail_from:
        return True  # responders use the null sender (RFC 3834 §3.3); people never do
    submitted = (_one_line(message.get("Auto-Submitted")) or "no").split(";")[0].strip().lower()
    if submitted != "no":
        return True
    if any(message.get(name) is not None for name in _AUTOMATIC_HEADERS):
        return True
    if (_one_line(message.get("Precedence")) or "").lower() in _AUTOMATIC_PRECEDENCE:
        return True
    subject = (_one_line(message.get("Subject")) or "").lower()
    return subject.startswith(_VACATION_SUBJECTS)


def _sender_domain(message: Message) -> str | None:
    sender = _one_line(message.get("From"))
    if not sender:
        return None
    addresses = email.utils.getaddresses([sender])
    for _name, address in addresses:
        if "@" in address:
            return address_domain(address)
    return None


def _typed_value(value: object) -> str | None:
    """`dns; mx.example` -> `mx.example`; `smtp; 550 ...` -> `550 ...` (RFC 3464 §2.1.2)."""
    text = _one_line(value)
    if not text:
        return None
    kind, semicolon, rest = text.partition(";")
    typed = semicolon and kind.strip().isascii() and " " not in kind.strip()
    return rest.strip() if typed else text


def _one_line(value: object) -> str | None:
    if value is None:
        return None
    return " ".join(str(value).split())
