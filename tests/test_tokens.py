"""Signed tokens: namespaces, rotation, no readable address, forgery never verifies."""

from __future__ import annotations

import base64
import binascii
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from itsdangerous import BadData, TimestampSigner, URLSafeTimedSerializer

from suppression import AddressHasher
from tracking import BadToken, Namespace, RecipientRef, Signer, TrackingUrls
from tracking.signing import DEFAULT_MAX_AGE, key_id

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
    raise AssertionError(f"a changed token verified: {mutated!r} -> {ref}")


@settings(max_examples=2000, deadline=None)
@given(st.text(max_size=400))
def test_random_tokens_never_verify_or_crash(token: str) -> None:
    with pytest.raises(BadToken):
        URLS.read_unsubscribe(token)


def reference(namespace: Namespace, token: str) -> object:
    """itsdangerous' own check with the same keys: what `Signer.open` must never exceed."""
    keys = [b"older-key-0123456789abcdef", b"newest-key-0123456789abcdef"]
    serializer = URLSafeTimedSerializer(keys, salt=namespace.value)
    return serializer.loads(token, max_age=int(DEFAULT_MAX_AGE.total_seconds()))


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(list(Namespace)), st.integers(min_value=0), st.integers(0, 7))
def test_fast_check_accepts_only_what_itsdangerous_accepts(
    namespace: Namespace, position: int, bit: int
) -> None:
    token = SIGNER.sign(namespace, REF.payload())
    assert SIGNER.verify(namespace, token) == reference(namespace, token) == REF.payload()
    raw = bytearray(token.encode())
    raw[position % len(raw)] ^= 1 << bit
    mutated = raw.decode("latin-1")
    try:
        payload = SIGNER.verify(namespace, mutated)
    except BadToken:
        return
    assert payload == reference(namespace, mutated)  # never more lenient than itsdangerous


def test_the_reading_says_when_and_with_which_key() -> None:
    before = int(time.time())
    reading = URLS.check_unsubscribe(URLS.unsubscribe_url(REF).rsplit("/", 1)[1])
    assert reading.ref == REF
    assert before - 5 <= reading.signed_at <= int(time.time())
    assert reading.key_id == key_id(b"newest-key-0123456789abcdef") == SIGNER.key_ids[0]
    old = Signer(["older-key-0123456789abcdef"]).sign(Namespace.UNSUBSCRIBE, REF.payload())
    assert SIGNER.open(Namespace.UNSUBSCRIBE, old).key_id == SIGNER.key_ids[1]


def test_key_ids_are_short_and_reveal_no_key() -> None:
    for kid in SIGNER.key_ids:
        assert len(kid) == 10 and "key" not in kid
    assert len(set(SIGNER.key_ids)) == 2


class TwoYearsAgo(TimestampSigner):
    def get_timestamp(self) -> int:
        return int(time.time()) - int(DEFAULT_MAX_AGE.total_seconds()) - 60


def test_expired_tokens_are_refused() -> None:
    keys = [b"older-key-0123456789abcdef", b"newest-key-0123456789abcdef"]
    old = URLSafeTimedSerializer(keys, salt=Namespace.OPEN.value, signer=TwoYearsAgo)
    token = old.dumps(REF.payload())
    with pytest.raises(BadToken):
        SIGNER.verify(Namespace.OPEN, token)
    with pytest.raises(BadData):
        reference(Namespace.OPEN, token)


def test_click_halves_must_be_genuine_and_of_the_same_message() -> None:
    url = "https://shop.example/sale?a=1&b=2"
    full = URLS.click_url(REF, url)
    recipient, link = full.split("/c/", 1)[1].split("/")
    click = URLS.check_click(recipient, link)
    assert (click.reading.ref, click.url) == (REF, url)
    other_message = URLS.link_token("QID2", url)
    with pytest.raises(BadToken):
        URLS.check_click(recipient, other_message)
    with pytest.raises(BadToken):  # the halves swapped: each is of another kind
        URLS.check_click(link, recipient)
    unsubscribe = URLS.unsubscribe_url(REF).rsplit("/", 1)[1]
    with pytest.raises(BadToken):
        URLS.check_click(unsubscribe, link)


def test_oversized_and_non_ascii_tokens_are_refused_quickly() -> None:
    for token in ("x" * 5000, "é" + TOKEN, TOKEN + "\n", "." * 3, "..", ""):
        with pytest.raises(BadToken):
            URLS.read_unsubscribe(token)
