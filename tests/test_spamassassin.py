"""The rewrite adds no SpamAssassin points (issue 14, item 4).

Short and long messages, each scored by Debian's SpamAssassin offline (`spamassassin -t -L`)
as the sender wrote it and as the relay sends it (footer, List-* fields, Received, Date,
pixel where it keeps one, DKIM). No rule with a score may fire on the copy that did not fire on
the original, apart from those that depend on DNS and on the receiving host: DKIM_* (no key
in DNS here) and ALL_TRUSTED (the relay's Received field from a trusted network). Rules that
come in length buckets (HTML_IMAGE_ONLY_04..32) count as one: the footer makes the HTML
longer, which may move a sender's own image-only HTML to the next bucket, never into it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest

from relay.dkim import generate_key, load_signer
from relay.pipeline import Arrival, Pipeline, PreparedMessage
from relay.rewrite import ReceivedClient
from suppression import AddressHasher
from tracking import TrackingUrls
from tracking.signing import Signer

SPAMASSASSIN = shutil.which("spamassassin")
pytestmark = pytest.mark.skipif(
    SPAMASSASSIN is None, reason="Debian's spamassassin is not installed (.ci/run installs it)"
)
# Depend on DNS and the receiving host, not on the message: compared away.
IGNORED = re.compile(r"DKIM_|ALL_TRUSTED$")
_BUCKET = re.compile(r"^(HTML_IMAGE_ONLY|HTML_IMAGE_RATIO)_\d+$")
_RULE = re.compile(r"^\s*(-?\d+\.\d+)\s+([A-Z0-9_]+)\s", re.MULTILINE)

PARAGRAPH = (
    "<p>Our spring collection is here: linen shirts, light jackets and canvas shoes, "
    "made to last and easy to repair. Order before Sunday and delivery is free.</p>\n"
)


@dataclass(frozen=True)
class Scored:
    total: float
    rules: dict[str, float]


def score(path: Path) -> Scored:
    assert SPAMASSASSIN is not None
    with path.open("rb") as message:
        done = subprocess.run(
            [SPAMASSASSIN, "-t", "-L"], stdin=message, capture_output=True, timeout=120
        )
    report = done.stdout.decode(errors="replace")
    assert "Content analysis details" in report, done.stderr.decode(errors="replace")
    details = report.split("Content analysis details:", 1)[1]
    total = float(re.search(r"\((-?\d+\.\d+) points", details).group(1))  # type: ignore[union-attr]
    return Scored(total, {name: float(points) for points, name in _RULE.findall(details)})


def newsletter(html_body: str, *, campaign: str | None = "Spring 2026") -> bytes:
    message = EmailMessage()
    message["From"] = "Shop <news@shop.example>"
    message["To"] = "ann@example.org"
    message["Subject"] = "The spring collection"
    message["Date"] = "Tue, 10 Mar 2026 09:14:01 +0000"
    message["Message-ID"] = "<spring-2026-1@shop.example>"
    if campaign:
        message["X-Optout-Campaign"] = campaign
    message.set_content("Our spring collection is here. Delivery is free until Sunday.\n")
    message.add_alternative(
        f"<!doctype html><html><head><title>Spring</title></head><body>{html_body}</body></html>",
        subtype="html",
    )
    return message.as_bytes().replace(b"\n", b"\r\n")


MESSAGES = {
    "short": newsletter(PARAGRAPH),
    "short-no-campaign": newsletter(PARAGRAPH, campaign=None),
    "medium-2k": newsletter(PARAGRAPH * 12),
    "just-over-3200": newsletter(PARAGRAPH * 18),
    "long-8k": newsletter(PARAGRAPH * 45),
    "short-with-its-own-image": newsletter(
        PARAGRAPH + '<img src="https://shop.example/spring.jpg" width="600" height="300" alt="">'
    ),
}


@pytest.fixture(scope="module")
def relayed(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Path, Path, PreparedMessage]]:
    """Each message as written and as the relay's pipeline sends it to one recipient."""
    folder = tmp_path_factory.mktemp("spamassassin")
    key_file, _ = generate_key("shop.example", "s1", folder / "dkim")
    pipeline = Pipeline(
        signers={"shop.example": load_signer("shop.example", "s1", key_file)},
        hostname="relay.shop.example",
        received_client=ReceivedClient.OMITTED,
        pixel_min_html=3200,  # the default of rewrite.pixel_min_html
    )
    urls = TrackingUrls("https://mail.shop.example", Signer(["a-signing-key-of-16-chars-or-more"]))
    hasher = AddressHasher(b"an-address-hash-key-0123456789ab")
    out = {}
    for name, raw in MESSAGES.items():
        prepared = pipeline.prepare(
            "0123456789AB",
            "news@shop.example",
            raw,
            arrival=Arrival("app.shop.example[192.0.2.10]", 1773134041.0),
        )
        copy = prepared.personalise("ann@example.org", urls, hasher)
        original, rewritten = folder / f"{name}.eml", folder / f"{name}.copy.eml"
        original.write_bytes(raw)
        rewritten.write_bytes(copy)
        out[name] = (original, rewritten, prepared)
    return out


@pytest.mark.parametrize("name", MESSAGES)
def test_the_copy_scores_no_rule_the_original_did_not(
    name: str, relayed: dict[str, tuple[Path, Path, PreparedMessage]]
) -> None:
    original, rewritten, prepared = relayed[name]
    before, after = score(original), score(rewritten)
    had = {_BUCKET.sub(r"\1", rule) for rule in before.rules}
    added = {
        rule: points
        for rule, points in after.rules.items()
        if points != 0 and _BUCKET.sub(r"\1", rule) not in had and not IGNORED.match(rule)
    }
    print(f"{name}: original {before.total} {before.rules}; copy {after.total} {after.rules}")
    assert added == {}, (name, prepared.meta.decisions)
    ignored = sum(p for rule, p in after.rules.items() if IGNORED.match(rule))
    assert after.total - ignored <= before.total, (name, before, after)
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in rewritten.read_bytes()


def test_short_html_without_images_goes_without_a_pixel_and_says_so(
    relayed: dict[str, tuple[Path, Path, PreparedMessage]],
) -> None:
    for name in ("short", "medium-2k"):
        _, rewritten, prepared = relayed[name]
        assert b"https://mail.shop.example/o/" not in rewritten.read_bytes(), name
        assert any("pixel left out" in d for d in prepared.meta.decisions), name
    for name in ("just-over-3200", "long-8k", "short-with-its-own-image"):
        _, rewritten, prepared = relayed[name]
        assert b"https://mail.shop.example/o/" in rewritten.read_bytes(), name
        assert not any("pixel left out" in d for d in prepared.meta.decisions), name
