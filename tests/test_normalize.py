"""Address normalisation: one key per mailbox, and no guessing beyond what is configured."""

from __future__ import annotations

import hashlib
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from suppression import (
    AddressHasher,
    InvalidAddress,
    NormalizationPolicy,
    digest_keys,
    normalize_address,
    sender_scopes,
)

KEY = b"normalize-test-key-0123456789abcdef"


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("Frank@Example.ORG", "frank@example.org"),
        ("FRANK@EXAMPLE.org.", "frank@example.org"),
        ("<frank@example.org>", "frank@example.org"),
        ("  frank@example.org\n", "frank@example.org"),
        # IDN domains compare in their IDNA ASCII form, whichever way they were written.
        ("anna@Bücher.Example", "anna@xn--bcher-kva.example"),
        ("anna@XN--BCHER-KVA.example", "anna@xn--bcher-kva.example"),
        # Unicode local parts: NFC, then case folded.
        ("JÖRG@example.de", "jörg@example.de"),
        (unicodedata.normalize("NFD", "jörg@example.de"), "jörg@example.de"),
        ("Δημήτρης@παράδειγμα.δοκιμή", "δημήτρησ@xn--hxajbheg2az3al.xn--jxalpdlp"),
        # Nothing else is guessed by default.
        ("first.last+news@gmail.com", "first.last+news@gmail.com"),
    ],
)
def test_spellings_of_one_mailbox_normalise_alike(spelling: str, canonical: str) -> None:
    assert normalize_address(spelling) == canonical


def test_spellings_share_one_keyed_hash() -> None:
    hasher = AddressHasher(KEY)
    spellings = [
        "Jörg@Bücher.example",
        "jo\u0308rg@xn--bcher-kva.EXAMPLE",
        "<JÖRG@bücher.example.>",
    ]
    assert len({hasher.hash(s) for s in spellings}) == 1
    assert len(hasher.hash(spellings[0])) == 22
    assert hasher.hash("joerg@bücher.example") != hasher.hash(spellings[0])


def test_local_part_case_folding_can_be_turned_off() -> None:
    strict = NormalizationPolicy(fold_local_part=False)
    assert normalize_address("Frank@Example.ORG", policy=strict) == "Frank@example.org"
    hasher = AddressHasher(KEY, policy=strict)
    assert hasher.hash("Frank@example.org") != hasher.hash("frank@example.org")
    assert hasher.hash("Frank@EXAMPLE.org") == hasher.hash("Frank@example.org")


def test_subaddress_and_dots_only_when_configured() -> None:
    policy = NormalizationPolicy(strip_subaddress=True, ignore_dots_domains=("GMail.com",))
    assert normalize_address("First.Last+news@gmail.com", policy=policy) == "firstlast@gmail.com"
    # Dots elsewhere are significant; a leading + is not a tag separator.
    assert normalize_address("first.last+x@example.org", policy=policy) == "first.last@example.org"
    assert normalize_address("+tag@example.org", policy=policy) == "+tag@example.org"
    assert policy.describe() != NormalizationPolicy().describe()


@pytest.mark.parametrize(
    "bad",
    [
        "no-at-sign",
        "@example.org",
        "local@",
        "two words@example.org",
        "tab\t@example.org",
        "nul\x00@example.org",
        "a@exa..mple.org",
        "a@.",
        f"{'x' * 65}@example.org",
        f"a@{'d' * 64}.example",
    ],
)
def test_invalid_addresses_are_refused_with_a_reason(bad: str) -> None:
    with pytest.raises(InvalidAddress) as caught:
        normalize_address(bad)
    assert caught.value.address == bad
    assert caught.value.why


def test_digest_keys_are_those_advertisers_exchange() -> None:
    keys = digest_keys("Frank@Example.ORG")
    assert f"md5:{hashlib.md5(b'frank@example.org').hexdigest()}" in keys
    assert f"sha256:{hashlib.sha256(b'frank@example.org').hexdigest()}" in keys
    # An IDN domain may have been hashed in either form.
    idn = digest_keys("anna@bücher.example")
    assert f"md5:{hashlib.md5(b'anna@xn--bcher-kva.example').hexdigest()}" in idn
    assert f"md5:{hashlib.md5('anna@bücher.example'.encode()).hexdigest()}" in idn


def test_sender_scopes() -> None:
    assert sender_scopes("news@Shop.Example", "mautic") == (
        "global",
        "sender:shop.example",
        "sender:mautic",
    )
    assert sender_scopes("news@bücher.example") == ("global", "sender:xn--bcher-kva.example")
    assert sender_scopes("", None) == ("global",)
    assert sender_scopes("not an address", "bad account!") == ("global",)


_local = st.text(
    alphabet=st.characters(whitelist_categories=("Ll", "Lu", "Nd"), max_codepoint=0x2FFF),
    min_size=1,
    max_size=20,
)


@given(_local, st.sampled_from(["example.org", "Bücher.example", "EXAMPLE.COM"]))
def test_normalising_twice_changes_nothing(local: str, domain: str) -> None:
    try:
        once = normalize_address(f"{local}@{domain}")
    except InvalidAddress:
        return
    assert normalize_address(once) == once
    assert normalize_address(once.upper()) == once or not once.isascii()


@pytest.mark.parametrize("key", [b"k" * 16, b"x" * 64, b"long-key-" * 12])
def test_keyed_hash_is_hmac_sha256_so_stored_keys_stay_valid(key: bytes) -> None:
    import base64
    import hmac

    hasher = AddressHasher(key)
    for address in ("bob@example.org", "jörg@bücher.example"):
        mac = hmac.digest(key, hasher.normalize(address).encode(), "sha256")
        expected = base64.urlsafe_b64encode(mac[:16]).rstrip(b"=").decode()
        assert hasher.hash(address) == expected
