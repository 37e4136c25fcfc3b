"""The relay's header parser reads every header block as the email package does."""

from __future__ import annotations

import email.parser
from email.policy import compat32

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.mime import entity_bounds, parse_headers

_REFERENCE = email.parser.BytesHeaderParser(policy=compat32)

# Fragments that exercise every rule: names, colons, folding, line endings of all kinds,
# envelope lines, blank lines, bytes beyond ASCII and control characters.
_FRAGMENTS = st.sampled_from(
    [
        b"Subject",
        b"Content-Type",
        b": ",
        b":",
        b"text/html; charset=utf-8",
        b"\r\n",
        b"\n",
        b"\r",
        b" ",
        b"\t",
        b"From ",
        b"From: a@b.example",
        b"X y",
        b"\x0b",
        b"\x1c",
        b"\xc3\xa9",
        b"\xff",
        b"=?utf-8?q?x?=",
        b";",
        b"a",
    ]
)


def _same(block: bytes) -> None:
    ours, theirs = parse_headers(block), _REFERENCE.parsebytes(block)
    assert list(ours.raw_items()) == list(theirs.raw_items())
    assert ours.get_unixfrom() == theirs.get_unixfrom()


@settings(max_examples=2000)
@given(st.lists(_FRAGMENTS, max_size=30).map(b"".join))
def test_any_header_block_reads_as_the_email_package_reads_it(block: bytes) -> None:
    _same(block)


@given(st.binary(max_size=200))
def test_any_bytes_read_as_the_email_package_reads_them(block: bytes) -> None:
    _same(block)


def test_folded_fields_keep_their_folding_and_parameters() -> None:
    block = (
        b"From: Shop <news@shop.example>\r\n"
        b"Content-Type: multipart/alternative;\r\n"
        b' boundary="b1"\r\n'
    )
    headers = parse_headers(block)
    assert headers["Content-Type"] == 'multipart/alternative;\r\n boundary="b1"'
    assert headers.get_boundary() == "b1"
    assert headers.get_all("From") == ["Shop <news@shop.example>"]


@given(st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b"a", b": ", b" "]), max_size=30))
def test_the_header_block_ends_at_the_first_blank_line(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    blank_lines = [(at, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (at := data.find(sep)) >= 0]
    if data.startswith((b"\r\n", b"\n")):
        expected = (b"", data[2:] if data.startswith(b"\r\n") else data[1:])
    elif blank_lines:
        at, size = min(blank_lines)
        expected = (data[: at + size // 2], data[at + size :])
    else:
        expected = (data, b"")
    header_end, body_start = entity_bounds(data)
    assert (data[:header_end], data[body_start:]) == expected
    # The same entity inside other bytes: the same bounds, shifted.
    framed = b"\n\n" + data + b"\r\n\r\n"
    assert entity_bounds(framed, 2, 2 + len(data)) == (header_end + 2, body_start + 2)
