"""The header checks at DATA, for every client: a header section of bounded size and one
From field that every reader takes for the same author. For an account, that author must
also be in a domain the account may send as, since the From header, not MAIL FROM, is
what the recipient's client shows."""

from __future__ import annotations

import asyncio
import functools
import logging

from ..accounts import Account
from ..from_header import AmbiguousFrom, authors, from_values
from ..mime import MimeLimits, entity_bounds, headers_of, limit_problem
from ..spool import Spilled
from .data import DataProblem

log = logging.getLogger("optout.smtp")

# The longest header section taken (Postfix's header_size_limit is 100 KiB; ours is
# roomier for the long Received and ARC chains of forwarded mail). A spilled message is
# read this far for it; a longer one is refused, since its From could not be checked.
HEADER_LIMIT = 1024 * 1024
HEADERS_TOO_BIG = "552 5.3.4 Message header section exceeds fixed maximum size"
NO_FROM = "550 5.7.1 Message has no From address this account may send as"


def _whole_header_section(start: bytes, size: int) -> bytes | None:
    """The header section of a message of `size` octets that begins with `start`; None if
    `start` may end inside it (no blank line in it, and more of the message follows)."""
    header_end, body_start = entity_bounds(start)
    return start[:header_end] if header_end < body_start or len(start) == size else None


async def header_block(message: bytes | Spilled) -> bytes | None:
    """The message's header section; None if it is longer than HEADER_LIMIT."""
    if isinstance(message, bytes):
        found: bytes | None = headers_of(message)
    else:
        found = _whole_header_section(message.head, message.size)
        if found is None:
            start = await asyncio.to_thread(message.file.read_start, HEADER_LIMIT)
            found = _whole_header_section(start, message.size)
    return None if found is None or len(found) > HEADER_LIMIT else found


async def header_refusal(
    account: Account | None, message: bytes | Spilled, *, client: str, mail_from: str
) -> str | None:
    """The reply refusing `message` at DATA, or None if its headers may pass; `account`
    is the one the client logged in as, if any. `client` and `mail_from` are for the log."""
    try:
        block = await header_block(message)
    except OSError as exc:
        log.error("NOQUEUE: cannot read spilled message from=<%s>: %s", mail_from, exc)
        return DataProblem.CANNOT_STORE.value
    if block is None:
        log.info(
            "NOQUEUE: reject: DATA from %s: 552 5.3.4 header section over %d octets; from=<%s>",
            client,
            HEADER_LIMIT,
            mail_from,
        )
        return HEADERS_TOO_BIG
    try:
        found = authors(from_values(block))
    except AmbiguousFrom as exc:
        # Mail clients, DMARC and the DKIM signer could each take a different author.
        reason = "".join(c if " " <= c <= "~" else "?" for c in str(exc))  # one reply line
        log.info(
            "NOQUEUE: reject: DATA from %s: 550 5.7.1 %s; from=<%s>", client, reason, mail_from
        )
        return f"550 5.7.1 From header cannot be read unambiguously: {reason}"
    if account is None:
        return None
    if not found:
        # Without a From address there is no domain to allow: the account could
        # otherwise send as anyone a mail client makes of the header (rule 1).
        log.info(
            "NOQUEUE: reject: DATA from %s: 550 5.7.1 %s sent no From address; from=<%s>",
            client,
            account.username,
            mail_from,
        )
        return NO_FROM
    foreign = sorted({a.domain for a in found if not account.may_send_as(a.domain)})
    if foreign:
        log.info(
            "NOQUEUE: reject: DATA from %s: 550 5.7.1 %s may not send as %s; from=<%s>",
            client,
            account.username,
            ", ".join(foreign),
            mail_from,
        )
        return f"550 5.7.1 From domain {foreign[0]} not allowed for this account"
    return None


async def structure_refusal(
    message: bytes | Spilled, limits: MimeLimits, *, client: str, mail_from: str | None
) -> str | None:
    """The reply refusing a message whose MIME structure is past the limits on the work the
    relay spends on one message (parts, nesting, header sections), or None. Only header
    blocks and delimiter lines are read; a spilled message is mapped, not loaded."""
    check = functools.partial(limit_problem, limits=limits)
    try:
        if isinstance(message, bytes):
            problem = check(message)
        else:
            problem = await asyncio.to_thread(message.file.inspect, check)
    except OSError as exc:
        log.error("NOQUEUE: cannot read spilled message from=<%s>: %s", mail_from, exc)
        return DataProblem.CANNOT_STORE.value
    if problem is None:
        return None
    log.info("NOQUEUE: reject: DATA from %s: 554 5.6.0 %s; from=<%s>", client, problem, mail_from)
    return f"554 5.6.0 Message structure over this relay's limits: {problem}"
