"""The From check at DATA: an account's message must say it is from a domain the account
may send as, since the From header, not MAIL FROM, is what the recipient's client shows."""

from __future__ import annotations

import asyncio
import logging

from ..accounts import Account
from ..mime import entity_bounds, from_domains, headers_of, parse_headers
from ..spool import Spilled
from .data import DataProblem

log = logging.getLogger("optout.smtp")

# How much of a spilled message is read for its header section when that is longer than
# the head kept in memory. A longer header section is refused: its From could not be checked.
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
        return headers_of(message)
    found = _whole_header_section(message.head, message.size)
    if found is None:
        start = await asyncio.to_thread(message.file.read_start, HEADER_LIMIT)
        found = _whole_header_section(start, message.size)
    return found


async def from_refusal(
    account: Account, message: bytes | Spilled, *, client: str, mail_from: str | None
) -> str | None:
    """The reply refusing `account`'s `message` at DATA, or None if its From domains are
    all the account's to use. `client` and `mail_from` are for the log line."""
    try:
        block = await header_block(message)
    except OSError as exc:
        log.error("NOQUEUE: cannot read spilled message from=<%s>: %s", mail_from, exc)
        return DataProblem.CANNOT_STORE.value
    if block is None:
        log.info(
            "NOQUEUE: reject: DATA from %s: 552 5.3.4 header section over %d octets",
            client,
            HEADER_LIMIT,
        )
        return HEADERS_TOO_BIG
    domains = from_domains(parse_headers(block))
    if not domains:
        # Without a From address there is no domain to allow: the account could
        # otherwise send as anyone a mail client makes of the header (rule 1).
        log.info(
            "NOQUEUE: reject: DATA from %s: 550 5.7.1 %s sent no readable From",
            client,
            account.username,
        )
        return NO_FROM
    foreign = sorted(d for d in domains if not account.may_send_as(d))
    if foreign:
        log.info(
            "NOQUEUE: reject: DATA from %s: 550 5.7.1 %s may not send as %s",
            client,
            account.username,
            ", ".join(foreign),
        )
        return f"550 5.7.1 From domain {foreign[0]} not allowed for this account"
    return None
