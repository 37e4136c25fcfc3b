"""What each copy carries so that its feedback finds its way back (used at delivery):

- its envelope sender: a return path of its own at the feedback domain (VERP), so a bounce
  names the copy by where it arrives, whatever the bounce says or leaves out;
- a mailto: unsubscribe address after the https one in List-Unsubscribe (RFC 2369, 8058);
- `CFBL-Address: <fbl@domain>; report=arf` and `CFBL-Feedback-ID` (RFC 9477), the latter
  the copy's reference token, which complaint reports return even when they redact the
  recipient; and Gmail's `Feedback-ID` (campaign:account:scope:sender) unless the sender
  set one. They are added before DKIM signing and covered by its `h=`; RFC 9477 wants the
  CFBL-Address domain aligned with the signing domain, so it is added only then.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..accounts import Account
from .addresses import FBL_LOCAL_PART
from .store import CopyRecord
from .tokens import CopyTokens, TokenKind, copy_id

# Feedback-ID fields are colon-separated: anything but letters, digits, ".", "_" and "-" goes.
_FEEDBACK_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class CopyMarks:
    """One copy's addresses and the header fields that carry them."""

    record: CopyRecord
    return_path: str
    mailto: str
    fields: tuple[bytes, ...]  # CFBL-Address, CFBL-Feedback-ID, Feedback-ID (as they apply)


def aligned(domain: str, signing_domain: str | None) -> bool:
    """Whether `domain` is the DKIM signing domain or under it (RFC 9477 §3.1)."""
    if signing_domain is None:
        return False
    return domain == signing_domain or domain.endswith("." + signing_domain)


def feedback_id(campaign: str | None, account: str | None, scope: str, sender: str) -> str:
    """Gmail's Feedback-ID: up to three identifiers of ours and the sender's id last."""
    parts = [campaign or "", account or "", scope.replace(":", "-"), sender]
    return ":".join(_FEEDBACK_ID_UNSAFE.sub("-", part)[:60] for part in parts)


class FeedbackMarks:
    """Makes each copy's marks; None from `domain_for` means no feedback for that mail."""

    def __init__(self, tokens: CopyTokens, domain: str | None, accounts: Mapping[str, Account]):
        self.tokens = tokens
        self.domain = domain
        self._accounts = accounts

    def domain_for(self, account: str | None) -> str | None:
        """The account's own feedback domain, else the relay's."""
        own = self._accounts.get(account) if account else None
        return (own.feedback_domain if own else None) or self.domain

    def for_copy(
        self,
        *,
        queue_id: str,
        address_hash: str,
        recipient: str,
        scope: str,
        campaign: str | None,
        message_id: str | None,
        account: str | None,
        signing_domain: str | None,
        sender_domain: str | None,
        sender_fields: frozenset[str] = frozenset(),
    ) -> CopyMarks | None:
        """`sender_fields`: which of feedback-id and cfbl-address the sender set itself."""
        domain = self.domain_for(account)
        if domain is None:
            return None
        copy = copy_id(queue_id, address_hash)
        record = CopyRecord(
            copy,
            address_hash,
            queue_id,
            scope,
            campaign,
            message_id,
            account,
            recipient.rpartition("@")[2].lower() or None,
        )
        fields: list[bytes] = []
        if "cfbl-address" not in sender_fields and aligned(domain, signing_domain):
            fields.append(f"CFBL-Address: <{FBL_LOCAL_PART}@{domain}>; report=arf\r\n".encode())
            fields.append(
                f"CFBL-Feedback-ID: {self.tokens.make(TokenKind.REFERENCE, copy)}\r\n".encode()
            )
        if "feedback-id" not in sender_fields:
            value = feedback_id(campaign, account, scope, sender_domain or domain)
            fields.append(f"Feedback-ID: {value}\r\n".encode())
        return CopyMarks(
            record,
            self.tokens.address(TokenKind.RETURN_PATH, copy, domain),
            self.tokens.address(TokenKind.MAILTO, copy, domain),
            tuple(fields),
        )
