"""The compact signed addresses that name one copy: short enough for a local part,
distinct per kind, surviving key rotation and case folding, and unforgeable."""

from __future__ import annotations

import itertools

from relay.feedback import CopyTokens, TokenKind, copy_id
from tracking.signing import Signer

NEW, OLD = "newest-key-0123456789abcdef", "older-key-0123456789abcdef"
COPY = copy_id("0A1B2C3D4E5F", "kQ3v9Zr0bq1cYg7mWn2xAa")


def test_every_kind_fits_a_local_part_and_names_no_address() -> None:
    tokens = CopyTokens(Signer([NEW]))
    for kind in TokenKind:
        token = tokens.make(kind, COPY)
        assert len(token) <= 64  # RFC 5321 §4.5.3.1.1
        assert token == token.lower() and token.isascii()
        assert "@" not in token and "kq3v9zr0" not in token  # neither address nor its hash
        checked = tokens.check(token)
        assert checked is not None and checked.kind is kind and checked.copy_id == COPY


def test_one_kind_never_passes_as_another() -> None:
    tokens = CopyTokens(Signer([NEW]))
    for made, asked in itertools.permutations(TokenKind, 2):
        token = tokens.make(made, COPY)
        assert tokens.check(token, asked) is None
        # Re-labelled by hand: the MAC was made in the other kind's namespace.
        relabelled = asked.value + token[1:]
        assert tokens.check(relabelled) is None


def test_rotation_keeps_old_addresses_valid_and_case_does_not_matter() -> None:
    before = CopyTokens(Signer([OLD])).make(TokenKind.RETURN_PATH, COPY)
    after = CopyTokens(Signer([NEW, OLD]))
    for spelling in (before, before.upper(), before.capitalize()):
        checked = after.check(spelling, TokenKind.RETURN_PATH)
        assert checked is not None and checked.copy_id == COPY
    assert CopyTokens(Signer([NEW])).check(before) is None  # the old key retired


def test_tampered_or_foreign_tokens_are_refused() -> None:
    tokens = CopyTokens(Signer([NEW]))
    token = tokens.make(TokenKind.MAILTO, COPY)
    for position in range(2, len(token)):
        if token[position] == "-":
            continue
        other = "a" if token[position] != "a" else "b"
        changed = token[:position] + other + token[position + 1 :]
        assert tokens.check(changed) is None, position
    assert CopyTokens(Signer(["another-relay-key-0123456789"])).check(token) is None
    assert tokens.check(token + "a") is None
    assert tokens.check("") is None


def test_a_token_is_found_inside_a_returned_header() -> None:
    tokens = CopyTokens(Signer([NEW]))
    address = tokens.address(TokenKind.RETURN_PATH, COPY, "bounces.shop.example")
    found = tokens.find(f"Return-Path: <{address.upper()}>")
    assert found is not None and found.kind is TokenKind.RETURN_PATH
