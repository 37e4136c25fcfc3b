"""Taking an erased person out of the recipient fields of a message still waiting for others.

A message to several recipients names them all in To/Cc. Once one of them is erased, the
copies the relay still holds for the others must not carry that person's address on: the
field is rewritten without their mailbox, as if they had been Bcc'd, and when nobody is
left in it, it says `undisclosed-recipients:;` (RFC 5322 group syntax, as MTAs write for
Bcc-only mail). Every other header field keeps its bytes. The relay signs each copy after
this, so no signature of ours is broken; the sender's own was already broken by the rewrite.
"""

from __future__ import annotations

import email.policy
from collections.abc import Callable
from email.headerregistry import Group

_RECIPIENT_FIELDS = frozenset({"to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc"})
_EMPTY = "undisclosed-recipients:;"


def header_section_end(head: bytes) -> int | None:
    """Where the header section of a message beginning with `head` ends (the index of the
    blank line), or None when `head` does not reach it."""
    if head.startswith((b"\r\n", b"\n")):
        return 0  # no header section at all
    ends = [i for i in (head.find(b"\r\n\r\n"), head.find(b"\n\n")) if i >= 0]
    return min(ends) + (1 if head[min(ends)] == 0x0D else 0) + 1 if ends else None


def _fields(block: bytes) -> list[bytes]:
    """The header fields of a header section, each with its continuation lines."""
    fields: list[bytes] = []
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def _rewritten(field: bytes, matches: Callable[[str], bool]) -> bytes | None:
    """`field` without the mailboxes `matches` picks, or None when it names none of them."""
    name, colon, raw = field.partition(b":")
    if not colon or name.strip().lower().decode("ascii", "replace") not in _RECIPIENT_FIELDS:
        return None
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None  # not text we can parse; left as it is (the erasure report says so)
    policy = email.policy.SMTP.clone(utf8=not value.isascii())
    try:
        header = policy.header_factory(name.strip().decode("ascii"), " ".join(value.split()))
        groups = header.groups
    except Exception:  # the email package's parser on hostile input: leave it as it is
        return None
    kept: list[str] = []
    found = False
    for group in groups:
        addresses = [a for a in group.addresses if not matches(a.addr_spec)]
        found = found or len(addresses) < len(group.addresses)
        if group.display_name is None:
            kept.extend(str(address) for address in addresses)
        else:
            kept.append(str(Group(group.display_name, addresses)))
    if not found:
        return None
    folded: str = policy.header_factory(
        name.strip().decode("ascii"), ", ".join(kept) or _EMPTY
    ).fold(policy=policy)
    text = folded.encode("utf-8")
    return text if field.endswith(b"\r\n") else text.replace(b"\r\n", b"\n")


def without_recipient(head: bytes, matches: Callable[[str], bool]) -> tuple[int, bytes] | None:
    """For a message beginning with `head`: the length of its header section and that
    section with the mailboxes `matches` picks taken out of To, Cc and Bcc (and their
    Resent- forms); None when there is nothing to take out (or no end of headers in `head`).
    """
    end = header_section_end(head)
    if end is None:
        return None
    fields = _fields(head[:end])
    changed = False
    for index, field in enumerate(fields):
        rewritten = _rewritten(field, matches)
        if rewritten is not None:
            fields[index] = rewritten
            changed = True
    return (end, b"".join(fields)) if changed else None
