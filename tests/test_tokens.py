"""Signed tokens: namespaces, rotation, no readable address, forgery never verifies."""

from __future__ import annotations

import base64
import binascii

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from suppression import AddressHasher
from tracking import BadToken, Namespace, RecipientRef, Signer, TrackingUrls

HASHER = AddressHasher(b"k" * 32)
ADDRESS = "Dave.Smith@Example.ORG"
SIGNER = Signer(["newest-key-0123456789abcdef", "older-key-0123456789abcdef"])
URLS = TrackingUrls("https://mail.shop.example", SIGNER)
REF = RecipientRef(HASHER.hash(ADDRESS), "topic:news", "spring", "QID1")
TOKEN = URLS.unsubscribe_url(REF).rsplit("/", 1)[1]


def decoded_parts(token: str) -> list[bytes]:
    out = []
    for part in token.split("."):
        try:
            out.append(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        except (binascii.Error, ValueError):
            out.append(part.encode())
    return out


def test_round_trip_binds_recipient_and_scope() -> None:
    assert URLS.read_unsubscribe(TOKEN) == REF


def test_no_address_in_plain_or_decoded_form() -> None:
    for blob in [TOKEN.encode(), *decoded_parts(TOKEN)]:
        lowered = blob.lower()
        assert b"dave" not in lowered
        assert b"example.org" not in lowered


def test_hash_is_case_insensitive_and_keyed() -> None:
    assert HASHER.hash("dave.smith@example.org") == HASHER.hash(ADDRESS)
    assert AddressHasher(b"x" * 32).hash(ADDRESS) != HASHER.hash(ADDRESS)


def test_namespaces_do_not_mix() -> None:
    open_token = URLS.pixel_url(REF).rsplit("/", 1)[1].removesuffix(".gif")
    assert URLS.read_open(open_token) == REF
    with pytest.raises(BadToken):
        URLS.read_unsubscribe(open_token)
    with pytest.raises(BadToken):
        URLS.read_open(TOKEN)


def test_rotation_newest_signs_all_verify() -> None:
    old_only = Signer(["older-key-0123456789abcdef"])
    new_only = Signer(["newest-key-0123456789abcdef"])
    old_token = old_only.sign(Namespace.UNSUBSCRIBE, REF.payload())
    assert SIGNER.verify(Namespace.UNSUBSCRIBE, old_token) == REF.payload()
    # Tokens signed after rotation verify with the newest key alone.
    assert new_only.verify(Namespace.UNSUBSCRIBE, TOKEN) == REF.payload()
    with pytest.raises(BadToken):
        old_only.verify(Namespace.UNSUBSCRIBE, TOKEN)


def test_tokens_last_at_least_a_year() -> None:
    from tracking.signing import DEFAULT_MAX_AGE

    assert DEFAULT_MAX_AGE.days >= 365


@settings(max_examples=2000, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=7))
def test_any_bit_flip_is_rejected(position: int, bit: int) -> None:
    raw = bytearray(TOKEN.encode())
    index = position % len(raw)
    raw[index] ^= 1 << bit
    try:
        mutated = raw.decode("ascii")
    except UnicodeDecodeError:
        return
    if mutated == TOKEN:
        return
    try:
        ref = URLS.read_unsubscribe(mutated)
    except BadToken:
        return
    # Base64 has spare bits in its last character: the same bytes may decode.
    assert ref == REF


@settings(max_examples=2000, deadline=None)
@given(st.text(max_size=400))
def test_random_tokens_never_verify_or_crash(token: str) -> None:
    with pytest.raises(BadToken):
        URLS.read_unsubscribe(token)
