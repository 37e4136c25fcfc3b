"""Suppression scopes: everything (`global`), one sender, or one topic."""

from __future__ import annotations

import contextlib
import re
import unicodedata

from .addresses import split_address
from .errors import InvalidAddress, InvalidScope

GLOBAL = "global"
# Matched whole (fullmatch): `$` would let a trailing newline through, to be stored as given.
_SCOPE = re.compile(r"global|topic:[\w.\-]{1,64}|sender:[\w.\-@+]{1,255}", re.IGNORECASE)


def parse_scope(scope: str) -> str:
    """Validate and canonicalise a scope: `global`, `topic:NAME` or `sender:DOMAIN|ACCOUNT`.

    Scopes compare case-insensitively and in Unicode NFC, so one name has one spelling; a
    sender domain is kept in its IDNA ASCII form so that `sender:bücher.example` and
    `sender:xn--bcher-kva.example` are one scope. Nothing else is forgiven: whitespace
    (a trailing newline too) or a control character makes the scope invalid.
    """
    if not scope.isascii():
        scope = unicodedata.normalize("NFC", scope)
    if _SCOPE.fullmatch(scope) is None:
        raise InvalidScope(scope)
    kind, _, name = scope.partition(":")
    if kind.lower() == "sender" and not name.isascii() and "@" not in name:
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise InvalidScope(scope) from None
        scope = f"sender:{name}"
    return scope.lower()


def topic_scope(topic: str) -> str:
    return parse_scope(f"topic:{topic}")


def sender_scopes(mail_from: str | None, account: str | None = None) -> tuple[str, ...]:
    """The scopes an envelope is subject to: global, its From domain and its SMTP account.

    For the RCPT check: `store.check(rcpt, sender_scopes(envelope.mail_from, session.login))`.
    A sender or account that cannot be a scope simply adds none (global still applies).
    """
    scopes = [GLOBAL]
    if mail_from:
        try:
            _local, domain = split_address(mail_from)
        except InvalidAddress:
            pass
        else:
            with contextlib.suppress(InvalidScope):
                scopes.append(parse_scope(f"sender:{domain}"))
    if account:
        with contextlib.suppress(InvalidScope):
            scopes.append(parse_scope(f"sender:{account}"))
    return tuple(dict.fromkeys(scopes))
