"""DKIM signing: every signature verifies with dkimpy and with OpenDKIM, is the one dkimpy makes
for the same inputs, and breaks when a signed field is added; keys are owner-only files.

OpenDKIM's verifier runs with a private DNS that serves only the generated TXT records (see
tests/opendkim.py); those tests are skipped when the tool or the namespaces are unavailable.
"""

from __future__ import annotations

import base64
import os
import re
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.dkim import (
    SIGNED_HEADERS,
    SIGNED_IF_PRESENT,
    DkimError,
    DkimKeyError,
    DkimMessageError,
    DkimSigner,
    DkimTxtRecord,
    SigningMemo,
    generate_key,
    load_private_key,
    load_signer,
    parse_private_key,
    signing_domains,
)
from relay.mime import smtp_lines
from tests.opendkim import OpenDkim

DOMAIN = "shop.example"
RSA_SELECTOR = "s2025"
ED_SELECTOR = "e2025"
CRLF = b"\r\n"

# --------------------------------------------------------------------------- keys and signers


@dataclass(frozen=True)
class Keys:
    rsa_path: Path
    rsa_record: DkimTxtRecord
    ed_path: Path
    ed_record: DkimTxtRecord

    @property
    def rsa_pem(self) -> bytes:
        return self.rsa_path.read_bytes()

    @property
    def ed_seed_b64(self) -> bytes:
        """The Ed25519 key as dkimpy (PyNaCl) takes it: the base64 of the 32-byte seed."""
        key = load_private_key(self.ed_path)
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        raw = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return base64.b64encode(raw)

    @property
    def records(self) -> list[DkimTxtRecord]:
        return [self.rsa_record, self.ed_record]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    folder = tmp_path_factory.mktemp("dkim-keys")
    rsa_path, rsa_record = generate_key(DOMAIN, RSA_SELECTOR, folder)
    ed_path, ed_record = generate_key(DOMAIN, ED_SELECTOR, folder, "ed25519")
    return Keys(rsa_path, rsa_record, ed_path, ed_record)


@pytest.fixture(scope="module")
def signer(keys: Keys) -> DkimSigner:
    return load_signer(DOMAIN, RSA_SELECTOR, keys.rsa_path)


@pytest.fixture(scope="module")
def dual_signer(keys: Keys) -> DkimSigner:
    return load_signer(
        DOMAIN,
        RSA_SELECTOR,
        keys.rsa_path,
        second_selector=ED_SELECTOR,
        second_key_file=keys.ed_path,
    )


@pytest.fixture(scope="session")
def dkimpy() -> Any:
    return pytest.importorskip("dkim", reason="dkimpy is not installed: pip install dkimpy")


@pytest.fixture(scope="session")
def nacl() -> Any:
    return pytest.importorskip(
        "nacl", reason="PyNaCl (dkimpy's Ed25519) is not installed: pip install 'dkimpy[ed25519]'"
    )


def dns_for(records: Sequence[DkimTxtRecord]) -> Callable[..., bytes | None]:
    """A dkimpy `dnsfunc` that answers from `records`, joining the TXT strings as DNS would."""
    table = {r.name: "".join(r.strings).encode() for r in records}

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return table.get(name.decode().rstrip("."))

    return lookup


def dkimpy_verifies(dkimpy: Any, keys: Keys, message: bytes, index: int = 0) -> bool:
    """dkimpy's verdict on the `index`-th signature from the top (dkim.verify checks only the
    first); a body hash mismatch, which dkimpy raises, is a failed verification."""
    checker = dkimpy.DKIM(message)
    try:
        return bool(checker.verify(idx=index, dnsfunc=dns_for(keys.records)))
    except dkimpy.DKIMException:
        return False


# --------------------------------------------------------------------------- messages


def wire(message: bytes) -> bytes:
    """`message` as the relay's SMTP client sends it: every CR, LF or CRLF line break
    as CRLF, ending in CRLF. What a receiver verifies."""
    message = re.sub(rb"\r\n|\n|\r(?!\n)", CRLF, message)
    return message if message.endswith(CRLF) else message + CRLF


def build(headers: Sequence[bytes], body: bytes | None, eol: bytes = CRLF) -> bytes:
    head = b"".join(h + eol for h in headers)
    return head if body is None else head + eol + body


BASE_HEADERS = [
    b'From: "Shop News" <news@shop.example>',
    b"To: Ann Example <ann@example.org>",
    b"Subject: Spring sale: 20% off everything",
    b"Date: Tue, 04 Mar 2025 10:00:00 +0000",
    b"Message-ID: <c1.r1@shop.example>",
    b"MIME-Version: 1.0",
    b'Content-Type: multipart/alternative; boundary="b1"',
    b"List-Unsubscribe: <https://mail.shop.example/u/tok-ann>,"
    b" <mailto:unsubscribe@shop.example?subject=tok-ann>",
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click",
]

MARKETING_BODY = CRLF.join(
    [
        b"--b1",
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Transfer-Encoding: quoted-printable",
        b"",
        b"Hello Ann,",
        b"",
        b"Our spring sale starts today: 20% off everything until Sunday.",
        b"Shop now: https://shop.example/sale?utm_source=newsletter",
        b"",
        b"Unsubscribe: https://mail.shop.example/u/tok-ann",
        b"--b1",
        b"Content-Type: text/html; charset=utf-8",
        b"Content-Transfer-Encoding: quoted-printable",
        b"",
        b"<!DOCTYPE html>",
        b"<html>",
        b'  <body style=3D"margin: 0; padding: 0;">',
        b'    <table width=3D"100%" cellpadding=3D"0">',
        b'      <tr><td style=3D"padding: 8px 12px;">Hello Ann,</td></tr>',
        b"      <tr><td>Our spring sale starts today: <b>20% off</b> everything unti=",
        b"l Sunday.</td></tr>",
        b"    </table>",
        b'    <a href=3D"https://mail.shop.example/u/tok-ann">Unsubscribe</a>',
        b'    <img src=3D"https://mail.shop.example/o/tok-ann.gif" width=3D"1" alt=3D"">',
        b"  </body>",
        b"</html>",
        b"--b1--",
        b"",
    ]
)

PLAIN = [*BASE_HEADERS[:6], b"Content-Type: text/plain; charset=utf-8", *BASE_HEADERS[7:]]


def variants() -> dict[str, bytes]:
    """Messages a relay meets, by name; each has one From and one Date (OpenDKIM insists)."""
    folded = [
        BASE_HEADERS[0],
        b"To: Ann Example\r\n\t<ann@example.org>,\r\n  Bob <bob@example.org>",
        b"Subject: A subject folded\r\n over\r\n\t three lines",
        *BASE_HEADERS[3:7],
        b"List-Unsubscribe:\r\n <https://mail.shop.example/u/tok-ann>,\r\n"
        b" <mailto:unsubscribe@shop.example?subject=tok-ann>",
        b"List-Unsubscribe-Post:   List-Unsubscribe=One-Click   ",
    ]
    odd = [
        b'From:\t"Shop News"   <news@shop.example>  \t',
        b"To:    ann@example.org",
        b"Subject: \t lots\t\tof   \t white  space \t ",
        b"Date:Tue, 04 Mar 2025 10:00:00 +0000",
        *BASE_HEADERS[4:6],
        b"Content-Type: text/plain;\t charset=utf-8",
        *BASE_HEADERS[7:],
    ]
    repeated = [
        *BASE_HEADERS[:2],
        b"Cc: Copy <copy@example.org>",
        b"Reply-To: help@shop.example",
        b"Sender: bulk@shop.example",
        b"In-Reply-To: <a@shop.example>",
        b"References: <a@shop.example> <b@shop.example>",
        b"Received: from a by b; Tue, 04 Mar 2025 10:00:00 +0000",
        b"Received: from c by d; Tue, 04 Mar 2025 10:00:00 +0000",
        *BASE_HEADERS[2:],
    ]
    eight_bit = [
        *BASE_HEADERS[:2],
        "Subject: Frühlingsangebot \u2013 20 % auf alles".encode(),
        *BASE_HEADERS[3:6],
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Transfer-Encoding: 8bit",
        *BASE_HEADERS[7:],
    ]
    return {
        "marketing": build(BASE_HEADERS, MARKETING_BODY),
        "folded-headers": build(folded, MARKETING_BODY),
        "odd-whitespace": build(
            odd,
            b"  leading spaces\r\ntrailing spaces   \r\ntrailing tab\t\r\n"
            b"in\t\tside   runs \t here\r\n \t \r\nafter a blank-looking line\r\n",
        ),
        "empty-body": build(PLAIN, b""),
        "no-body-at-all": build(PLAIN, None),
        "only-blank-lines": build(PLAIN, b"\r\n\r\n\r\n"),
        "only-whitespace-lines": build(PLAIN, b"  \r\n\t\r\n \t \r\n"),
        "trailing-blank-lines": build(PLAIN, b"text\r\n\r\n\r\n  \r\n\t\r\n\r\n"),
        "8-bit": build(eight_bit, "Grüße, Ann! Schöne Tage \u2013 20 %.\r\n€ ✓\r\n".encode()),
        "unterminated-last-line": build(PLAIN, b"first line\r\ntail  \t"),
        "lf-only": build(BASE_HEADERS, MARKETING_BODY.replace(CRLF, b"\n"), b"\n"),
        "mixed-line-ends": build(BASE_HEADERS, b"one\r\ntwo\nthree  \nfour\r\n\n\n"),
        "bare-cr": build(PLAIN, b"a bare\rcarriage return\r\n"),
        "repeated-fields": build(repeated, MARKETING_BODY),
        "long-line": build(PLAIN, b"x" * 5000 + b" " * 3 + b"y" * 1000 + CRLF),
    }


VARIANTS = variants()
# Two To fields: RFC 5322 allows one (OpenDKIM refuses to verify it), but a signer meets it.
TWO_TO = build([*BASE_HEADERS[:2], b"To: Second <second@example.org>", *BASE_HEADERS[2:]], b"x\r\n")


def split_fields(block: bytes) -> list[bytes]:
    """The DKIM-Signature fields in what `sign` returned, each with its CRLF."""
    starts = [m.start() for m in re.finditer(rb"(?m)^DKIM-Signature:", block)]
    return [block[a:b] for a, b in zip(starts, [*starts[1:], len(block)], strict=True)]


def tags(field: bytes) -> dict[str, str]:
    """A DKIM-Signature's tags, unfolded; b= and bh= without whitespace."""
    value = re.sub(rb"\r?\n", b"", field.split(b":", 1)[1]).decode()
    out = {}
    for part in value.split(";"):
        if part.strip():
            name, _, tag_value = part.partition("=")
            name = name.strip()
            squeezed = re.sub(r"\s+", "", tag_value) if name in ("b", "bh") else tag_value.strip()
            out[name] = " ".join(squeezed.split())
    return out


def signed_names(field: bytes) -> list[str]:
    return [name.strip() for name in tags(field)["h"].split(":")]


def add_header(message: bytes, header: bytes, *, at_top: bool) -> bytes:
    """`message` with one more header field, first or last in the header block."""
    if at_top:
        return header + CRLF + message
    end = message.index(b"\r\n\r\n")
    return message[:end] + CRLF + header + message[end:]


# --------------------------------------------------------------------------- the signature field


def test_signature_covers_the_list_headers_over_signed_and_has_no_length(
    signer: DkimSigner,
) -> None:
    block = signer.sign(VARIANTS["marketing"], timestamp=1_741_082_400)
    [field] = split_fields(block)
    found = tags(field)
    names = signed_names(field)

    assert names.count("list-unsubscribe") == 2
    assert names.count("list-unsubscribe-post") == 2
    for name in SIGNED_HEADERS:  # present once: listed twice; absent (cc, cte): listed once
        present = sum(1 for h in BASE_HEADERS if h.split(b":")[0].decode().lower() == name)
        assert names.count(name) == present + 1, name
    for name in SIGNED_IF_PRESENT:
        assert name not in names
    assert "l" not in found
    assert found["t"] == "1741082400"
    assert found["v"] == "1"
    assert found["a"] == "rsa-sha256"
    assert found["c"] == "relaxed/relaxed"
    assert found["d"] == DOMAIN
    assert found["s"] == RSA_SELECTOR


def test_optional_fields_are_signed_once_more_than_present(signer: DkimSigner) -> None:
    [field] = split_fields(signer.sign(VARIANTS["repeated-fields"]))
    names = signed_names(field)
    assert names.count("to") == 2
    assert names.count("cc") == 2
    for name in ("reply-to", "sender", "in-reply-to", "references"):
        assert names.count(name) == 2, name
    assert "received" not in names


def test_every_copy_of_a_repeated_field_is_signed(
    signer: DkimSigner, keys: Keys, dkimpy: Any
) -> None:
    signature = signer.sign(TWO_TO)
    [field] = split_fields(signature)
    assert signed_names(field).count("to") == 3
    assert dkimpy_verifies(dkimpy, keys, signature + TWO_TO)
    swapped = TWO_TO.replace(b"Ann Example <ann@example.org>", b"Second <second@example.org>", 1)
    assert not dkimpy_verifies(dkimpy, keys, signature + swapped)


def test_signature_field_is_folded_into_short_crlf_lines(dual_signer: DkimSigner) -> None:
    block = dual_signer.sign(VARIANTS["repeated-fields"])
    assert block.endswith(CRLF)
    assert b"\n" not in block.replace(CRLF, b"")
    lines = block[:-2].split(CRLF)
    assert all(len(line) <= 78 for line in lines), [len(line) for line in lines]
    for field in split_fields(block):
        field_lines = field[:-2].split(CRLF)
        assert all(line[:1] in (b" ", b"\t") for line in field_lines[1:])
        assert any(line.startswith(b" b=") for line in field_lines)
        assert any(line.startswith(b" bh=") for line in field_lines)


def test_timestamp_defaults_to_now(signer: DkimSigner) -> None:
    before = int(time.time())
    [field] = split_fields(signer.sign(VARIANTS["marketing"]))
    assert before <= int(tags(field)["t"]) <= int(time.time())


# --------------------------------------------------------------------------- dkimpy


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_verifies_with_dkimpy(
    name: str, signer: DkimSigner, keys: Keys, dkimpy: Any
) -> None:
    message = VARIANTS[name]
    assert dkimpy_verifies(dkimpy, keys, wire(signer.sign(message) + message))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_signature_is_the_one_dkimpy_makes(
    name: str, signer: DkimSigner, keys: Keys, dkimpy: Any
) -> None:
    message = VARIANTS[name]
    [ours_now] = split_fields(signer.sign(message))
    names = signed_names(ours_now)
    theirs = dkimpy.sign(
        wire(message),  # dkimpy signs bare CRs and an unterminated last line as they are
        RSA_SELECTOR.encode(),
        DOMAIN.encode(),
        keys.rsa_pem,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[n.encode() for n in names],
    )
    timestamp = int(tags(theirs)["t"])
    [ours] = split_fields(signer.sign(message, timestamp=timestamp))
    assert tags(ours)["bh"] == tags(theirs)["bh"]
    assert tags(ours)["b"] == tags(theirs)["b"]
    assert tags(ours) == tags(theirs)


def test_ed25519_second_signature_verifies_and_matches_dkimpy(
    dual_signer: DkimSigner, keys: Keys, dkimpy: Any, nacl: Any
) -> None:
    message = VARIANTS["marketing"]
    block = dual_signer.sign(message)
    rsa_field, ed_field = split_fields(block)
    assert tags(rsa_field)["a"] == "rsa-sha256"
    assert tags(ed_field)["a"] == "ed25519-sha256"
    assert tags(ed_field)["s"] == ED_SELECTOR
    assert tags(ed_field)["bh"] == tags(rsa_field)["bh"]
    assert tags(ed_field)["t"] == tags(rsa_field)["t"]
    signed = block + message
    assert dkimpy_verifies(dkimpy, keys, signed, index=0)
    assert dkimpy_verifies(dkimpy, keys, signed, index=1)

    theirs = dkimpy.sign(
        message,
        ED_SELECTOR.encode(),
        DOMAIN.encode(),
        keys.ed_seed_b64,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[n.encode() for n in signed_names(ed_field)],
        signature_algorithm=b"ed25519-sha256",
    )
    _, ours = split_fields(dual_signer.sign(message, timestamp=int(tags(theirs)["t"])))
    assert tags(ours) == tags(theirs)


@pytest.mark.parametrize(
    "header",
    [
        b"List-Unsubscribe: <https://evil.example/u>",
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click",
        b"From: someone@evil.example",
        b"Subject: changed",
        b"Cc: added@example.org",
        b"Content-Transfer-Encoding: base64",
    ],
)
@pytest.mark.parametrize("at_top", [True, False], ids=["above", "below"])
def test_adding_a_signed_field_after_signing_fails_dkimpy(
    header: bytes, at_top: bool, signer: DkimSigner, keys: Keys, dkimpy: Any
) -> None:
    message = VARIANTS["marketing"]
    signature = signer.sign(message)
    assert dkimpy_verifies(dkimpy, keys, signature + message)
    tampered = signature + add_header(message, header, at_top=at_top)
    assert not dkimpy_verifies(dkimpy, keys, tampered)


def test_adding_an_unsigned_field_keeps_the_signature(
    signer: DkimSigner, keys: Keys, dkimpy: Any
) -> None:
    message = VARIANTS["marketing"]
    signature = signer.sign(message)
    received = b"Received: from relay by mx; Tue, 04 Mar 2025 10:00:01 +0000"
    assert dkimpy_verifies(dkimpy, keys, received + CRLF + signature + message)


def test_changing_the_body_fails_dkimpy(signer: DkimSigner, keys: Keys, dkimpy: Any) -> None:
    message = VARIANTS["marketing"]
    signature = signer.sign(message)
    tampered = message.replace(b"tok-ann.gif", b"tok-bob.gif")
    assert not dkimpy_verifies(dkimpy, keys, signature + tampered)


def test_whitespace_changes_relaxed_allows_still_verify(
    signer: DkimSigner, keys: Keys, dkimpy: Any
) -> None:
    message = VARIANTS["marketing"]
    signature = signer.sign(message)
    reflowed = message.replace(b"Subject: Spring", b"Subject:   Spring\r\n\t")
    reflowed = reflowed.replace(b"Hello Ann,\r\n", b"Hello   Ann,  \t\r\n") + b"\r\n\r\n"
    assert dkimpy_verifies(dkimpy, keys, signature + reflowed)


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("lf-only", VARIANTS["lf-only"]),
        ("mixed-line-ends", VARIANTS["mixed-line-ends"]),
        ("bare-cr", VARIANTS["bare-cr"]),
        ("unterminated-last-line", VARIANTS["unterminated-last-line"]),
        ("cr-only", VARIANTS["marketing"].replace(CRLF, b"\r")),
    ],
)
def test_message_is_signed_as_smtp_carries_it(name: str, raw: bytes, signer: DkimSigner) -> None:
    """The relay's SMTP client sends every CR, LF or CRLF as CRLF and ends the data with CRLF:
    the signature is over that, so it holds at the receiver (dkimpy would sign "tail  \t"
    without its CRLF and a bare CR as text, and fail there)."""
    assert wire(raw) != raw
    assert signer.sign(raw, timestamp=7) == signer.sign(wire(raw), timestamp=7)


def test_lf_only_message_verifies_with_dkimpy_as_stored(
    signer: DkimSigner, keys: Keys, dkimpy: Any
) -> None:
    lf_only = VARIANTS["lf-only"]
    signature = signer.sign(lf_only).replace(CRLF, b"\n")
    assert dkimpy_verifies(dkimpy, keys, signature + lf_only)


def test_empty_body_hashes_to_the_empty_string(signer: DkimSigner) -> None:
    empty_sha256 = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
    for name in ("empty-body", "no-body-at-all", "only-blank-lines", "only-whitespace-lines"):
        [field] = split_fields(signer.sign(VARIANTS[name]))
        assert tags(field)["bh"] == empty_sha256, name


BODY_PIECES = st.sampled_from(
    [b" ", b"\t", b"  ", b"\r\n", b"\n", b"\r", b"x", b"word", "é".encode(), b"=\r\n", b"\r\n\r\n"]
)
VALUE_PIECES = st.sampled_from([b" ", b"\t", b"x", b"Sale", b"\r\n ", b"\r\n\t", b":", b";"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.lists(BODY_PIECES, max_size=40).map(b"".join),
    subject=st.lists(VALUE_PIECES, max_size=12).map(b"".join),
)
def test_random_whitespace_matches_dkimpy_and_verifies(
    body: bytes, subject: bytes, signer: DkimSigner, keys: Keys, dkimpy: Any
) -> None:
    headers = [*PLAIN[:2], b"Subject:" + subject, *PLAIN[3:]]
    message = build(headers, body)
    [ours_now] = split_fields(signer.sign(message))
    theirs = dkimpy.sign(
        wire(message),
        RSA_SELECTOR.encode(),
        DOMAIN.encode(),
        keys.rsa_pem,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[n.encode() for n in signed_names(ours_now)],
    )
    ours = signer.sign(message, timestamp=int(tags(theirs)["t"]))
    assert tags(ours) == tags(theirs)
    assert dkimpy_verifies(dkimpy, keys, wire(ours + message))


# --------------------------------------------------------------------------- copies of one message

SHARED_HTML = CRLF.join(
    b'<tr><td style=3D"padding:\t8px  12px;">Item %d: a  long line of the campaign  </td></tr>' % i
    for i in range(60)
)


def fan_out_copy(
    recipient: bytes,
    *,
    extra_header: bytes = b"",
    html: bytes = SHARED_HTML,
    blank_end: bool = False,
) -> bytes:
    """One recipient's copy of a campaign, as the relay makes them: the sender's fields, then
    the recipient's List-Unsubscribe; the recipient's URLs in both parts, between long runs
    of lines every copy has (with the whitespace relaxed canonicalisation changes)."""
    token = base64.urlsafe_b64encode(recipient * 3)
    headers = [
        *BASE_HEADERS[:6],
        b'Content-Type: multipart/alternative;\r\n\tboundary="b1"',
        *([extra_header] if extra_header else []),
        b"List-Id: Spring <spring.shop.example>",
        b"List-Unsubscribe: <https://mail.shop.example/u/%s>" % token,
        BASE_HEADERS[8],
    ]
    body = CRLF.join(
        [
            b"--b1",
            b"Content-Type: text/plain; charset=utf-8",
            b"",
            b"Hello,  \t",
            b"Our spring sale starts today.\t\t" * 8,
            b"Unsubscribe: https://mail.shop.example/u/%s" % token,
            b"--b1",
            b"Content-Type: text/html; charset=utf-8",
            b"Content-Transfer-Encoding: quoted-printable",
            b"",
            html,
            b'<a href=3D"https://mail.shop.example/u/%s">Unsubscribe</a>   ' % token,
            b"  " + SHARED_HTML[:400],
            b'<img src=3D"https://mail.shop.example/o/%s.gif">' % token,
            b"--b1--",
            b"",
        ]
    )
    # Some copies end in blank lines (which the canonical body drops), some do not.
    return build(headers, body + (b"\r\n \r\n\r\n" if blank_end else b""))


def test_copies_signed_with_one_memo_verify_and_match_signing_each_alone(
    signer: DkimSigner, keys: Keys, dkimpy: Any
) -> None:
    memo = SigningMemo()
    copies = [fan_out_copy(b"reader%d@example.org" % i, blank_end=i % 3 == 2) for i in range(10)]
    # Copies that share less than the first two did: their own field among the shared
    # ones, a changed line inside a shared run, a header field folded across the cut.
    copies.append(fan_out_copy(b"odd@example.org", extra_header=b"X-Extra: 1"))
    copies.append(
        fan_out_copy(b"odd2@example.org", html=SHARED_HTML.replace(b"Item 30", b"Item 3"))
    )
    copies.append(
        fan_out_copy(b"folded@example.org").replace(
            b"\r\nList-Unsubscribe:", b"\r\n\tfolded\r\nList-Unsubscribe:"
        )
    )
    # A shared run of lines found in the middle of a line (its spaces join the line's).
    copies.append(
        fan_out_copy(b"joined@example.org").replace(
            b"Unsubscribe</a>   \r\n  ", b"Unsubscribe</a>     "
        )
    )
    # Bare line breaks among a recipient's bytes, after the last shared run and before one.
    copies.append(fan_out_copy(b"lf@example.org").replace(b'.gif">', b'.gif">\n'))
    copies.append(fan_out_copy(b"cr@example.org").replace(b"</a>   \r\n", b"</a>\r\r\n"))
    for copy in copies:
        sent = memo.smtp_lines(copy)
        assert sent == smtp_lines(copy)
        with_memo = signer.sign(sent, timestamp=1_700_000_000, smtp_form=True, memo=memo)
        alone = signer.sign(copy, timestamp=1_700_000_000)
        assert with_memo == alone
        assert dkimpy_verifies(dkimpy, keys, with_memo + sent)
    # and the memo is no licence to sign a copy's bytes other than its own
    forged = copies[5].replace(b"Item 7:", b"Item 8:")
    assert not dkimpy_verifies(dkimpy, keys, signer.sign(copies[5], memo=memo) + forged)


def test_copies_learnt_from_two_of_different_line_counts_sign_as_each_alone(
    signer: DkimSigner, keys: Keys, dkimpy: Any
) -> None:
    """The second copy's recipient bytes take a line more in each place they go: the shared
    runs are found line for line by difflib instead."""
    memo = SigningMemo()
    for i in range(6):
        extra = b"\r\nsecond line" if i == 1 else b""
        copy = fan_out_copy(b"r%d@example.org%s" % (i, extra), blank_end=i == 4)
        signed = signer.sign(copy, timestamp=1_700_000_000, memo=memo)
        assert signed == signer.sign(copy, timestamp=1_700_000_000)
        assert dkimpy_verifies(dkimpy, keys, signed + copy)


PERSONAL = b"<personal>"
LINE = st.lists(st.sampled_from([b" ", b"\t", b"  ", b"x", b"word", b".", b"="]), max_size=6).map(
    b"".join
)
FILLED = st.one_of(LINE, LINE.map(lambda line: b"shared line " * 30 + line), st.just(PERSONAL))
VALUES = st.sampled_from(
    [b"a", b"bb", b"", b"  ", b" \t", b"\r\n", b"c \r\n\r\n", b"\r\n\r\n", b"\n", b"\r", b"d\r"]
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(FILLED, max_size=24),
    values=st.lists(VALUES, min_size=4, max_size=4),
    ending=st.sampled_from([CRLF, b""]),
)
def test_memo_signatures_are_those_of_each_copy_alone(
    lines: list[bytes], values: list[bytes], ending: bytes, signer: DkimSigner
) -> None:
    memo = SigningMemo()
    # The memo learns from the first two copies; the others have all sorts of values.
    for value in [b"a", b"bb", *values]:
        headers = [*PLAIN[:2], b"X-Value: " + value.strip(b"\r\n"), *PLAIN[2:]]
        copy = build(headers, CRLF.join(lines).replace(PERSONAL, value) + ending)
        # The copy put in SMTP form looking only at what the copies before did not share
        # (bare CRs and LFs among the recipient's bytes included), then signed so.
        lines_sent = memo.smtp_lines(copy)
        assert lines_sent == smtp_lines(copy)
        signed = signer.sign(lines_sent, timestamp=1, smtp_form=True, memo=memo)
        assert signed == signer.sign(copy, timestamp=1)


# --------------------------------------------------------------------------- OpenDKIM


def only_field(block: bytes, index: int) -> bytes:
    return split_fields(block)[index]


def test_opendkim_verifies_every_variant(
    opendkim: OpenDkim, signer: DkimSigner, dual_signer: DkimSigner, keys: Keys, tmp_path: Path
) -> None:
    cases: dict[str, bytes] = {}
    for name, message in VARIANTS.items():
        cases[name] = signer.sign(message) + message
    for name in ("marketing", "8-bit", "folded-headers"):
        message = VARIANTS[name]
        block = dual_signer.sign(message)
        cases[f"{name}, rsa of two"] = only_field(block, 0) + message
        cases[f"{name}, ed25519 of two"] = only_field(block, 1) + message
        cases[f"{name}, both"] = block + message
    on_the_wire = [wire(message) for message in cases.values()]
    verdicts = opendkim.verify(on_the_wire, keys.records, tmp_path)
    failed = {n: v for n, v in zip(cases, verdicts, strict=True) if not v.passed}
    assert not failed


def test_opendkim_rejects_added_list_headers_and_changed_bodies(
    opendkim: OpenDkim, signer: DkimSigner, dual_signer: DkimSigner, keys: Keys, tmp_path: Path
) -> None:
    message = VARIANTS["marketing"]
    signature = signer.sign(message)
    ed25519_only = only_field(dual_signer.sign(message), 1)
    cases = {
        "untouched": signature + message,
        "ed25519, untouched": ed25519_only + message,
        "ed25519, second List-Unsubscribe": ed25519_only
        + add_header(message, b"List-Unsubscribe: <https://evil.example/u>", at_top=False),
        "second List-Unsubscribe above": signature
        + add_header(message, b"List-Unsubscribe: <https://evil.example/u>", at_top=True),
        "second List-Unsubscribe below": signature
        + add_header(message, b"List-Unsubscribe: <https://evil.example/u>", at_top=False),
        "second List-Unsubscribe-Post": signature
        + add_header(message, b"List-Unsubscribe-Post: List-Unsubscribe=One-Click", at_top=False),
        "changed body": signature + message.replace(b"tok-ann.gif", b"tok-bob.gif"),
    }
    verdicts = dict(
        zip(cases, opendkim.verify(list(cases.values()), keys.records, tmp_path), strict=True)
    )
    assert verdicts.pop("untouched").passed
    assert verdicts.pop("ed25519, untouched").passed
    for name, verdict in verdicts.items():
        assert not verdict.passed, name
        assert "Bad signature" in verdict.stderr, (name, verdict)


# --------------------------------------------------------------------------- signer errors


def test_message_without_from_is_refused(signer: DkimSigner) -> None:
    with pytest.raises(DkimMessageError, match="no From"):
        signer.sign(build(BASE_HEADERS[1:], b"body\r\n"))


@pytest.mark.parametrize(
    "message",
    [
        b" continuation first\r\nFrom: a@shop.example\r\n\r\nbody\r\n",
        b"From: a@shop.example\r\nthis is not a field\r\n\r\nbody\r\n",
        b"From: a@shop.example\r\n: no name\r\n\r\nbody\r\n",
    ],
)
def test_malformed_header_block_is_refused(message: bytes, signer: DkimSigner) -> None:
    with pytest.raises(DkimMessageError, match=r"header line [12] "):
        signer.sign(message)


def test_mbox_separator_line_is_ignored(signer: DkimSigner) -> None:
    message = VARIANTS["marketing"]
    mbox = b"From news@shop.example Tue Mar  4 10:00:00 2025\r\n" + message
    assert signer.sign(mbox, timestamp=5) == signer.sign(message, timestamp=5)


def test_bad_signer_settings_are_refused(keys: Keys) -> None:
    key = load_private_key(keys.rsa_path)
    with pytest.raises(DkimError, match="not a valid domain"):
        DkimSigner("bad domain", RSA_SELECTOR, key)
    with pytest.raises(DkimError, match="selector"):
        DkimSigner(DOMAIN, "s 1", key)
    with pytest.raises(DkimError, match="From"):
        DkimSigner(DOMAIN, RSA_SELECTOR, key, signed_headers=["to", "subject"])
    with pytest.raises(DkimError, match="must not be signed"):
        DkimSigner(DOMAIN, RSA_SELECTOR, key, signed_headers=["from", "Received"])
    with pytest.raises(DkimError, match="different selectors"):
        DkimSigner(DOMAIN, RSA_SELECTOR, key, second=(RSA_SELECTOR, key))
    with pytest.raises(DkimError, match="both a selector and a key file"):
        load_signer(DOMAIN, RSA_SELECTOR, keys.rsa_path, second_selector=ED_SELECTOR)
    with pytest.raises(DkimError, match="1970"):
        DkimSigner(DOMAIN, RSA_SELECTOR, key).sign(VARIANTS["marketing"], timestamp=-1)


def test_unicode_domain_is_signed_as_its_a_label(keys: Keys) -> None:
    key = load_private_key(keys.rsa_path)
    signer = DkimSigner("Bücher.Example.", RSA_SELECTOR, key)
    [field] = split_fields(signer.sign(VARIANTS["marketing"]))
    assert tags(field)["d"] == "xn--bcher-kva.example"
    assert tags(field)["i"] == "@xn--bcher-kva.example"


def test_signing_domains_lists_existing_signatures(signer: DkimSigner) -> None:
    message = VARIANTS["marketing"]
    assert signing_domains(message) == []
    foreign = b"DKIM-Signature: v=1; a=rsa-sha256;\r\n d=ESP.example; s=x; b=abc\r\n"
    signed = signer.sign(message) + foreign + message
    assert signing_domains(signed) == [DOMAIN, "esp.example"]
    assert signing_domains(signed.replace(CRLF, b"\n")) == [DOMAIN, "esp.example"]


# --------------------------------------------------------------------------- key store


def test_generated_rsa_key_is_owner_only_and_published_in_split_strings(keys: Keys) -> None:
    assert keys.rsa_path.name == f"{DOMAIN}.{RSA_SELECTOR}.pem"
    assert stat.S_IMODE(keys.rsa_path.stat().st_mode) == 0o600
    record = keys.rsa_record
    assert record.name == f"{RSA_SELECTOR}._domainkey.{DOMAIN}"
    assert record.text.startswith("v=DKIM1; k=rsa; p=MII")
    assert len(record.strings) == 2
    assert all(len(s) <= 255 for s in record.strings)
    assert "".join(record.strings) == record.text
    assert str(record) == (f'{record.name}. IN TXT ( "{record.strings[0]}" "{record.strings[1]}" )')
    public = load_private_key(keys.rsa_path).public_key()
    der = base64.b64decode(record.text.split("p=")[1])
    assert serialization.load_der_public_key(der).public_numbers() == public.public_numbers()  # type: ignore[union-attr]


def test_generated_ed25519_key_record(keys: Keys) -> None:
    assert stat.S_IMODE(keys.ed_path.stat().st_mode) == 0o600
    record = keys.ed_record
    assert record.text.startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(record.text.split("p=")[1])) == 32
    assert record.strings == (record.text,)


def test_large_rsa_key_record_splits_into_more_strings(tmp_path: Path) -> None:
    _, record = generate_key(DOMAIN, "big", tmp_path, bits=3072)
    assert len(record.strings) == 3
    assert all(len(s) <= 255 for s in record.strings)
    assert "".join(record.strings) == record.text


@pytest.fixture
def open_umask() -> Iterator[None]:
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_key_file_is_owner_only_even_with_an_open_umask(tmp_path: Path, open_umask: None) -> None:
    path, _ = generate_key(DOMAIN, "s1", tmp_path / "new" / "keys", "ed25519")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_existing_key_file_is_never_overwritten(tmp_path: Path) -> None:
    path, _ = generate_key(DOMAIN, "s1", tmp_path, "ed25519")
    before = path.read_bytes()
    with pytest.raises(DkimKeyError, match="already exists"):
        generate_key(DOMAIN, "s1", tmp_path, "ed25519")
    assert path.read_bytes() == before


def test_symlink_at_key_path_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    (tmp_path / f"{DOMAIN}.s1.pem").symlink_to(target)
    with pytest.raises(DkimKeyError, match="already exists"):
        generate_key(DOMAIN, "s1", tmp_path, "ed25519")
    assert target.read_bytes() == b"keep"


def test_generate_refuses_weak_or_unknown_keys(tmp_path: Path) -> None:
    with pytest.raises(DkimKeyError, match="2048"):
        generate_key(DOMAIN, "s1", tmp_path, bits=1024)
    with pytest.raises(DkimKeyError, match="unknown DKIM key algorithm"):
        generate_key(DOMAIN, "s1", tmp_path, "dsa")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_key_readable_by_others_is_refused(mode: int, keys: Keys, tmp_path: Path) -> None:
    path = tmp_path / "open.pem"
    path.write_bytes(keys.rsa_pem)
    path.chmod(mode)
    with pytest.raises(DkimKeyError) as raised:
        load_private_key(path)
    message = str(raised.value)
    assert f"chmod 600 {path}" in message
    assert f"{mode:04o}" in message
    assert_no_key_material(message, keys.rsa_pem)


def test_owner_read_only_key_loads(keys: Keys, tmp_path: Path) -> None:
    path = tmp_path / "ro.pem"
    path.write_bytes(keys.rsa_pem)
    path.chmod(0o400)
    assert isinstance(load_private_key(path), rsa.RSAPrivateKey)


def test_pkcs1_rsa_key_loads(keys: Keys, tmp_path: Path) -> None:
    key = load_private_key(keys.rsa_path)
    assert isinstance(key, rsa.RSAPrivateKey)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    path = tmp_path / "pkcs1.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
    loaded = load_private_key(path)
    assert isinstance(loaded, rsa.RSAPrivateKey)
    assert loaded.private_numbers() == key.private_numbers()


def assert_no_key_material(text: str, pem: bytes) -> None:
    assert "PRIVATE KEY" not in text
    for line in pem.decode().splitlines():
        if not line.startswith("-----"):
            assert line[:16] not in text


def owner_only_file(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    return path


def test_unusable_key_files_get_clear_errors(keys: Keys, tmp_path: Path) -> None:
    pem = keys.rsa_pem
    corrupt = pem.replace(pem.splitlines()[3], b"A" * 64)
    encrypted = load_private_key(keys.rsa_path).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cases = {
        "corrupt.pem": (corrupt, "is not a PEM private key"),
        "garbage.pem": (b"hello\n", "is not a PEM private key"),
        "encrypted.pem": (encrypted, "is encrypted"),
        "ec.pem": (ec_key, "DKIM cannot use"),
    }
    for name, (data, expected) in cases.items():
        path = owner_only_file(tmp_path, name, data)
        with pytest.raises(DkimKeyError, match=expected) as raised:
            load_private_key(path)
        assert str(path) in str(raised.value)
        assert_no_key_material(str(raised.value), data)
    with pytest.raises(DkimKeyError, match="does not exist"):
        load_private_key(tmp_path / "missing.pem")
    os.chmod(tmp_path, 0o700)
    with pytest.raises(DkimKeyError, match="not a regular file"):
        load_private_key(tmp_path)


def test_parse_private_key_takes_pem_bytes(keys: Keys) -> None:
    assert isinstance(parse_private_key(keys.rsa_pem), rsa.RSAPrivateKey)
    ed_pem = keys.ed_path.read_bytes()
    assert isinstance(parse_private_key(ed_pem), ed25519.Ed25519PrivateKey)
    with pytest.raises(DkimKeyError, match=r"^the key is not a PEM private key"):
        parse_private_key(b"nope")


def test_signer_repr_shows_no_key(signer: DkimSigner) -> None:
    assert repr(signer) == f"DkimSigner(domain='{DOMAIN}', selectors=('{RSA_SELECTOR}',))"
