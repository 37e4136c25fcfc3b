"""MAIL FROM and RCPT TO paths: the front door's fast path reads them as aiosmtpd does."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtpd.server import RelaySMTP


def outcome(parse: Callable[[str], object], arg: str) -> object:
    try:
        return parse(arg)
    except Exception as exc:  # aiosmtpd's parser fails on some input ("<"): so must ours
        return type(exc)


def both(arg: str, local_part_limit: int = 0) -> tuple[object, object]:
    # Only the parsing is asked of them: no session, no event loop.
    reference = SMTP.__new__(SMTP)
    reference.local_part_limit = local_part_limit
    ours = RelaySMTP.__new__(RelaySMTP)
    ours.local_part_limit = local_part_limit
    return outcome(reference._getaddr, arg), outcome(ours._getaddr, arg)


@pytest.mark.parametrize(
    "arg",
    [
        "<ann@example.org>",
        " <ann@example.org> SIZE=100 BODY=8BITMIME",
        "<Ann.Lee+tag@Example.ORG>\tSMTPUTF8",
        "<ann@example.org>  (a comment) SIZE=1",
        "<>",
        '<"ann lee"@example.org>',
        "<ann@[192.0.2.1]>",
        "<@relay.example:ann@example.org>",
        "<ann@example..org>",
        "<ann@example.org.>",
        "<änn@example.org>",
        "ann@example.org",
        "<ann@example.org",
    ],
)
def test_paths_read_as_aiosmtpd_reads_them(arg: str) -> None:
    reference, ours = both(arg)
    assert ours == reference


def test_the_local_part_limit_still_applies() -> None:
    reference, ours = both(f"<{'a' * 65}@example.org>", local_part_limit=64)
    assert ours == reference == (None, None)


_PIECES = st.sampled_from([*'<>@. \t()"aZ9+-_[]:,=ä', "SIZE=1", "example.org"])


@settings(max_examples=500, deadline=None)
@given(st.lists(_PIECES, max_size=14).map("".join))
def test_any_argument_reads_as_aiosmtpd_reads_it(arg: str) -> None:
    reference, ours = both(arg)
    assert ours == reference
