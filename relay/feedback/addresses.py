"""Which addresses the feedback listener answers for, and what each of them is."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .tokens import CopyToken, CopyTokens, TokenKind

# RFC 5321 §4.5.1 (postmaster), RFC 2142 (abuse); fbl is the CFBL-Address (RFC 9477).
FBL_LOCAL_PART = "fbl"
ROLE_LOCAL_PARTS = frozenset({"postmaster", "abuse", FBL_LOCAL_PART})


class Destination(StrEnum):
    RETURN_PATH = "return-path"  # a copy's VERP envelope sender: bounces
    MAILTO = "mailto"  # a copy's List-Unsubscribe mailto: address
    ROLE = "role"  # postmaster, abuse, fbl
    FORGED = "forged"  # at a feedback domain, but no genuine token: 550 5.1.1
    FOREIGN = "foreign"  # not a feedback domain at all: 550 5.7.1, we are no relay


@dataclass(frozen=True, slots=True)
class Recipient:
    destination: Destination
    token: CopyToken | None = None
    local_part: str = ""


class FeedbackAddresses:
    def __init__(self, domains: tuple[str, ...], tokens: CopyTokens) -> None:
        self.domains = frozenset(d.lower().rstrip(".") for d in domains)
        self.tokens = tokens

    def classify(self, address: str) -> Recipient:
        local, at, domain = address.strip().strip("<>").rpartition("@")
        if not at or domain.lower().rstrip(".") not in self.domains:
            return Recipient(Destination.FOREIGN)
        local = local.lower()
        if local in ROLE_LOCAL_PARTS:
            return Recipient(Destination.ROLE, local_part=local)
        token = self.tokens.check(local)
        if token is None or token.kind is TokenKind.REFERENCE:
            return Recipient(Destination.FORGED, local_part=local)
        if token.kind is TokenKind.RETURN_PATH:
            return Recipient(Destination.RETURN_PATH, token, local)
        return Recipient(Destination.MAILTO, token, local)
