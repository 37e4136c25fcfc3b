"""Why an address is suppressed, and which reasons outrank or outlast others."""

from __future__ import annotations

from enum import StrEnum

from .errors import InvalidReason, PermanentReason


class Reason(StrEnum):
    UNSUBSCRIBE = "unsubscribe"
    COMPLAINT = "complaint"
    HARD_BOUNCE = "hard_bounce"
    MANUAL = "manual"
    IMPORT = "import"
    SOFT_BOUNCE = "soft_bounce"  # repeated temporary failures: held for a while, then lapses


# When two reasons meet on one entry the stronger is kept: complaints and hard bounces also
# stop transactional mail, and an unsubscribe is a recipient's own word.
RANK: dict[str, int] = {
    Reason.SOFT_BOUNCE: -1,  # the weakest: a guess that the mailbox is unwell
    Reason.IMPORT: 0,
    Reason.MANUAL: 1,
    Reason.UNSUBSCRIBE: 2,
    Reason.HARD_BOUNCE: 3,
    Reason.COMPLAINT: 4,
}
# The reasons that stop transactional mail too (DESIGN: only hard bounces and complaints);
# every reason stops marketing mail.
STOPS_TRANSACTIONAL = frozenset({Reason.HARD_BOUNCE, Reason.COMPLAINT})
# Reasons that may carry an expiry. A withdrawal of consent (unsubscribe, complaint) never lapses.
SOFT_REASONS = frozenset({Reason.HARD_BOUNCE, Reason.MANUAL, Reason.IMPORT, Reason.SOFT_BOUNCE})


def parse_reason(reason: str) -> Reason:
    try:
        return Reason(reason.strip().lower())
    except ValueError:
        raise InvalidReason(reason) from None


def stronger(first: str, second: str) -> str:
    return second if RANK.get(second, -1) > RANK.get(first, -1) else first


def check_expiry(reason: Reason, expires_at: str | None) -> None:
    if expires_at is not None and reason not in SOFT_REASONS:
        raise PermanentReason(reason)
