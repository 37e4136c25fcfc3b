"""What a report does, decided and written in one transaction of the store database.

The report is marked processed in the same transaction as its suppressions and events, and
only if it was still waiting: a crash before the commit leaves it waiting with no effect, a
crash after leaves it done; two runners cannot both act on it. So each accepted report is
processed exactly once in effect.

Rules (DESIGN, compliance rule 11):
- a bounce is believed only when it comes to a copy's signed return path (VERP);
- a hard bounce suppresses globally at once (`hard_bounce`); a soft one is counted, and
  `soft_bounce_limit` of them within the window suppress for `soft_bounce_hold`;
- a policy refusal (5.7.x, 4.7.x) never suppresses: an event of its own;
- a complaint (ARF abuse, fraud, virus) suppresses globally (`complaint`), matched to its
  copy by our tokens in the returned headers, whatever the reporter redacted;
- a person's message to a copy's mailto: address unsubscribes the copy's recipient in the
  copy's scope; automatic mail (auto-replies, vacation, challenges) changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from suppression import GLOBAL, Connection, Entry, Outcome, format_time, utc_now
from suppression.audit import dumps
from suppression.entries import apply_entries
from suppression.reasons import Reason
from tracking.events import Event, EventType, insert_events
from tracking.tokens import RecipientRef

from .reading import COMPLAINT_TYPES, BounceKind, Nature, Reading
from .store import CopyRecord, Report, find_copy

DONE = "done"  # something was suppressed or recorded
KEPT = "kept"  # nothing to act on: kept for the operator


@dataclass(frozen=True, slots=True)
class Target:
    """A copy a report points at: by one of our copy tokens, or by an unsubscribe URL's
    token (which names the recipient itself)."""

    how: str  # return-path, mailto, reference, list-unsubscribe
    key_id: str
    copy_id: bytes | None = None
    ref: RecipientRef | None = None


@dataclass(frozen=True, slots=True)
class Examined:
    """A report read, and the tokens of its envelope and returned headers checked."""

    report: Report
    reading: Reading
    return_paths: tuple[Target, ...] = ()  # envelope recipients that are VERP addresses
    mailtos: tuple[Target, ...] = ()  # envelope recipients that are mailto: addresses
    returned: tuple[Target, ...] = ()  # tokens in the headers the report returned
    roles: tuple[str, ...] = ()  # postmaster, abuse, fbl, ... at a feedback domain


@dataclass(frozen=True, slots=True)
class Rules:
    soft_bounce_limit: int
    soft_bounce_window: timedelta
    soft_bounce_hold: timedelta


@dataclass(slots=True)
class Result:
    """What processing a report did, for the log and the report's `outcome`."""

    state: str
    action: str  # hard-bounce, soft-bounce, policy-refusal, complaint, unsubscribe, kept...
    why: str = ""
    queue_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    suppressed: bool = False
    already_done: bool = False
    policy_domain: str | None = None

    def outcome(self) -> str:
        return json.dumps(
            {"action": self.action, "why": self.why, "queue_id": self.queue_id, **self.detail},
            separators=(",", ":"),
            sort_keys=True,
        )


@dataclass(frozen=True, slots=True)
class _Copy:
    """The copy a target resolved to."""

    address_hash: str
    scope: str
    campaign: str | None
    queue_id: str | None
    message_id: str | None
    recipient_domain: str | None

    @classmethod
    def of_record(cls, record: CopyRecord) -> _Copy:
        return cls(
            record.address_hash,
            record.scope,
            record.campaign,
            record.queue_id,
            record.message_id,
            record.recipient_domain,
        )

    @classmethod
    def of_ref(cls, ref: RecipientRef) -> _Copy:
        return cls(ref.address_hash, ref.scope, ref.campaign, ref.queue_id, None, None)


def _resolve(db: Connection, target: Target) -> _Copy | None:
    if target.ref is not None:
        return _Copy.of_ref(target.ref)
    assert target.copy_id is not None
    record = find_copy(db, target.copy_id)
    return None if record is None else _Copy.of_record(record)


def apply_report(db: Connection, examined: Examined, rules: Rules) -> Result:
    """Within a write transaction: act on one report and mark it processed."""
    report_id = examined.report.id
    claimed = db.execute(
        "UPDATE feedback_reports SET state = 'done' WHERE id = ? AND state = 'new'", [report_id]
    ).rowcount
    if not claimed:
        return Result(KEPT, "none", "already processed", already_done=True)
    now = datetime.now(UTC)
    result = _decide(db, examined, rules, now)
    db.execute(
        "UPDATE feedback_reports SET state = ?, processed_at = ?, outcome = ? WHERE id = ?",
        [result.state, format_time(now), result.outcome(), report_id],
    )
    return result


def _decide(db: Connection, examined: Examined, rules: Rules, now: datetime) -> Result:
    reading = examined.reading
    nature = reading.nature
    base = {"nature": str(nature), **({"notes": list(reading.notes)} if reading.notes else {})}
    if nature is Nature.ARF:
        return _complaint(db, examined, base, now)
    if nature in (Nature.DSN, Nature.TEXT_BOUNCE):
        return _bounce(db, examined, rules, base, now)
    if nature is Nature.MESSAGE and examined.mailtos:
        return _unsubscribe(db, examined, base, now)
    why = {
        Nature.AUTOMATIC: "automatic mail (auto-reply, vacation or challenge) changes nothing",
        Nature.UNREADABLE: "unreadable",
    }.get(nature, "a message that is neither a report nor to a mailto: address")
    return Result(KEPT, "kept", why, detail=base)


def _bounce(
    db: Connection,
    examined: Examined,
    rules: Rules,
    base: dict[str, Any],
    now: datetime,
) -> Result:
    bounce = examined.reading.bounce
    if bounce is None:
        return Result(KEPT, "kept", "a report that tells of no failure", detail=base)
    if not examined.return_paths:
        # Rule 11: only the copy's signed return path makes a bounce believable.
        return Result(KEPT, "kept", "a bounce not sent to a return path of ours", detail=base)
    copy = _resolve(db, examined.return_paths[0])
    if copy is None:
        return Result(KEPT, "kept", "the copy is no longer known", detail=base)
    detail: dict[str, Any] = {
        "kind": str(bounce.kind),
        "status": bounce.status,
        "diagnostic": bounce.diagnostic,
        "reporting_mta": bounce.reporting_mta,
        "source": "dsn" if examined.reading.nature is Nature.DSN else "text",
        "report": examined.report.id,
    }
    if bounce.remote_mta:
        detail["remote_mta"] = bounce.remote_mta
    if bounce.kind is BounceKind.POLICY:
        detail["domain"] = copy.recipient_domain
        _event(db, EventType.POLICY_REFUSAL, copy, detail, now)
        return Result(
            DONE,
            "policy-refusal",
            "a policy refusal is the sender's problem: nobody suppressed",
            copy.queue_id,
            {**base, "status": bounce.status},
            policy_domain=copy.recipient_domain,
        )
    _event(db, EventType.BOUNCED, copy, detail, now)
    if bounce.kind is BounceKind.HARD:
        suppressed = _suppress(
            db, copy.address_hash, GLOBAL, Reason.HARD_BOUNCE, f"bounce:{detail['source']}", detail
        )
        return Result(
            DONE, "hard-bounce", "", copy.queue_id, {**base, "status": bounce.status}, suppressed
        )
    recent = _soft_bounces_since(db, copy.address_hash, now - rules.soft_bounce_window)
    counted = {**base, "status": bounce.status, "soft_bounces": recent}
    if recent < rules.soft_bounce_limit:
        return Result(DONE, "soft-bounce", "counted", copy.queue_id, counted)
    hold = {**detail, "soft_bounces": recent, "window_days": rules.soft_bounce_window.days}
    suppressed = _suppress(
        db,
        copy.address_hash,
        GLOBAL,
        Reason.SOFT_BOUNCE,
        f"bounce:{detail['source']}",
        hold,
        expires_at=now + rules.soft_bounce_hold,
    )
    return Result(DONE, "soft-bounce", "limit reached", copy.queue_id, counted, suppressed)


def _complaint(db: Connection, examined: Examined, base: dict[str, Any], now: datetime) -> Result:
    complaint = examined.reading.complaint
    if complaint is None:
        return Result(KEPT, "kept", "a feedback report without its fields", detail=base)
    info = {**base, "feedback_type": complaint.feedback_type}
    if complaint.feedback_type not in COMPLAINT_TYPES:
        return Result(KEPT, "kept", f"feedback type {complaint.feedback_type}", detail=info)
    # Our tokens in the returned headers name the copy whatever the reporter redacted; an
    # envelope token of ours (a report sent to the return path) is as good.
    for target in (*examined.returned, *examined.return_paths, *examined.mailtos):
        copy = _resolve(db, target)
        if copy is None:
            continue
        detail = {
            "feedback_type": complaint.feedback_type,
            "reporter": complaint.reporter,
            "user_agent": complaint.user_agent,
            "matched_by": target.how,
            "report": examined.report.id,
        }
        _event(db, EventType.COMPLAINT, copy, detail, now)
        suppressed = _suppress(
            db, copy.address_hash, GLOBAL, Reason.COMPLAINT, "complaint:arf", detail
        )
        return Result(
            DONE,
            "complaint",
            "",
            copy.queue_id,
            {**info, "matched_by": target.how},
            suppressed,
        )
    return Result(KEPT, "kept", "a complaint that matches no copy of ours", detail=info)


def _unsubscribe(db: Connection, examined: Examined, base: dict[str, Any], now: datetime) -> Result:
    target = examined.mailtos[0]
    copy = _resolve(db, target)
    if copy is None:
        return Result(KEPT, "kept", "the copy is no longer known", detail=base)
    detail = {
        "method": "mailto",
        "scope": copy.scope,
        "key_id": target.key_id,
        "report": examined.report.id,
    }
    suppressed = _suppress(db, copy.address_hash, copy.scope, Reason.UNSUBSCRIBE, "mailto", detail)
    if suppressed:
        # As one-click: a repeated request finds the entry in place and records nothing new.
        _event(db, EventType.UNSUBSCRIBE, copy, detail, now)
    return Result(DONE, "unsubscribe", "", copy.queue_id, {**base, "scope": copy.scope}, suppressed)


def _suppress(
    db: Connection,
    address_hash: str,
    scope: str,
    reason: Reason,
    source: str,
    detail: Mapping[str, Any],
    expires_at: datetime | None = None,
) -> bool:
    """As SuppressionStore.add_hash, inside the caller's transaction; True if it changed
    anything (added or strengthened)."""
    row = db.execute(
        "SELECT address FROM contacts WHERE address_hash = ?", [address_hash]
    ).fetchone()
    entry = Entry(
        address_hash,
        scope,
        reason,
        source,
        row[0] if row else None,
        None if expires_at is None else format_time(expires_at),
        dumps(detail),
    )
    [outcome] = apply_entries(db, [entry], actor=None, now=utc_now())
    return outcome is not Outcome.UNCHANGED


def _event(
    db: Connection,
    kind: EventType,
    copy: _Copy,
    detail: Mapping[str, Any],
    now: datetime,
) -> None:
    insert_events(
        db,
        [
            Event(
                kind,
                copy.address_hash,
                copy.campaign,
                copy.queue_id,
                detail={k: v for k, v in detail.items() if v is not None},
                at=format_time(now),
                message_id=copy.message_id,
            )
        ],
    )


def _soft_bounces_since(db: Connection, address_hash: str, since: datetime) -> int:
    """Soft bounces of this recipient recorded since `since`, this one included."""
    row = db.execute(
        "SELECT COUNT(*) FROM events WHERE address_hash = ? AND type = ? AND at >= ?"  # noqa: S608
        f" AND {db.dialect.json_text('detail', 'kind')} = 'soft'",
        [address_hash, str(EventType.BOUNCED), format_time(since)],
    ).fetchone()
    return int(row[0])
