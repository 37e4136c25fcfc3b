"""Every message of tests/corpus/, rewritten: the issue's invariants hold (see corpus/check.py)."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest

from relay.rewrite import Decorations, Hole, build_template, list_unsubscribe_headers
from tests.corpus.check import (
    MAILTO,
    PIXEL,
    UNSUB,
    VALUES,
    check_rewrite,
    decoded_text,
    entities,
)

CORPUS = Path(__file__).parent / "corpus"
MESSAGES = sorted(CORPUS.glob("*.eml"))


def rewrite(raw: bytes, **render: bool) -> tuple[bytes, list[str]]:
    template = build_template(raw, Decorations())
    out = template.render(VALUES, list_unsubscribe_headers(UNSUB, MAILTO), **render)
    return out, template.notes


def test_the_corpus_is_large_and_indexed() -> None:
    assert len(MESSAGES) >= 60
    index = (CORPUS / "README.md").read_text()
    for path in MESSAGES:
        assert f"`{path.name}`" in index, f"{path.name} has no line in corpus/README.md"


@pytest.mark.parametrize("path", MESSAGES, ids=[p.stem for p in MESSAGES])
def test_rewrite_keeps_every_invariant(path: Path) -> None:
    raw = path.read_bytes()
    out, notes = rewrite(raw)
    failed = path.stem.startswith("broken-")
    assert any(n.startswith("rewrite_failed") for n in notes) == failed, notes
    check_rewrite(raw, out, failed=failed)


@pytest.mark.parametrize("path", MESSAGES, ids=[p.stem for p in MESSAGES])
def test_without_8bitmime_only_7bit_leaves_unless_sealed(path: Path) -> None:
    raw = path.read_bytes()
    out, notes = rewrite(raw, eight_bit_ok=False)
    body = out.split(b"\n\n" if b"\r\n\r\n" not in out else b"\r\n\r\n", 1)[-1]
    undowngradable = any("cannot be downgraded" in n for n in notes)
    failed = any(n.startswith("rewrite_failed") for n in notes)
    if not (undowngradable or failed):
        assert body.isascii(), notes
    # What the 7-bit copy says is what the 8-bit copy says.
    if not failed:
        normal = email.message_from_bytes(rewrite(raw)[0], policy=email.policy.compat32)
        seven = email.message_from_bytes(out, policy=email.policy.compat32)
        for a, b in zip(normal.walk(), seven.walk(), strict=True):
            if not a.is_multipart():
                assert a.get_payload(decode=True) == b.get_payload(decode=True)


def test_pixel_and_link_land_before_the_body_end_of_framework_templates() -> None:
    for name in ("framework-mjml", "framework-cerberus", "framework-foundation"):
        out, _ = rewrite((CORPUS / f"{name}.eml").read_bytes())
        html = decoded_text(next(e for e in entities(out) if e.ctype == "text/html"))
        body_end = html.lower().rindex("</body>")
        content_end = html.lower().rindex("</table>")
        assert content_end < html.index(UNSUB) < html.index(PIXEL) < body_end


def test_placeholder_parts_get_no_footer() -> None:
    out, _ = rewrite((CORPUS / "framework-mailchimp-placeholder.eml").read_bytes())
    message = email.message_from_bytes(out, policy=email.policy.compat32)
    for part in message.walk():
        if part.get_content_maintype() == "text":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            assert payload.count(UNSUB.encode()) == 1
            assert b">Unsubscribe</a>" not in payload and b"\n-- " not in payload


def test_signed_and_encrypted_messages_get_headers_only() -> None:
    for name in ("client-pgp-mime-signed", "client-smime-signed", "client-smime-opaque"):
        raw = (CORPUS / f"{name}.eml").read_bytes()
        out, notes = rewrite(raw)
        assert out.endswith(raw.split(b"\r\n\r\n", 1)[1])
        assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in out
        assert not any(n.startswith("rewrite_failed") for n in notes)


def test_holes_are_reported() -> None:
    raw = (CORPUS / "framework-mjml.eml").read_bytes()
    assert build_template(raw, Decorations()).holes == {Hole.UNSUBSCRIBE_URL, Hole.PIXEL_URL}
    signed = (CORPUS / "client-smime-signed.eml").read_bytes()
    assert build_template(signed, Decorations()).holes == frozenset()
