"""How a message's copies are measured, decided by the pipeline: the relay's and the account's
modes, the per-message narrowing, the sender's consent header (believed from whom), and the
aggregate URLs (one per message, whatever the copy or the attempt, naming nobody). And the
config keys that set the modes, old spellings included."""

from __future__ import annotations

import base64
import json
import re
import zlib
from email.message import EmailMessage

import pytest

from relay.accounts import Account, hash_password
from relay.config import parse_settings
from relay.errors import ConfigError
from relay.pipeline import Arrival, Pipeline, PreparedMessage
from suppression import NO_WORD, AddressHasher, Consent, Purpose
from tests.helpers import PASSWORD
from tracking import Signer, TrackingUrls
from tracking.modes import Mode, Modes

URLS = TrackingUrls("https://mail.shop.example", Signer(("pipeline-modes-key-0123456789",)))
HASHER = AddressHasher(b"k" * 32)
ANN, BOB = "ann@example.org", "bob@example.org"
HASH = hash_password(PASSWORD)


def message(**headers: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Shop <news@shop.example>"
    msg["To"] = ANN
    msg["Subject"] = "Sale"
    msg["X-Optout-Campaign"] = "spring"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("Sale\n")
    msg.add_alternative(
        '<html><body><img src="https://shop.example/logo.png" alt="">'
        '<a href="https://shop.example/sale">Sale</a></body></html>',
        subtype="html",
    )
    return msg.as_bytes()


def urls_of(prepared: PreparedMessage, recipient: str, consent: Consent = NO_WORD) -> list[str]:
    copy = prepared.personalise(recipient, URLS, HASHER, modes=prepared.modes_for(consent)).decode()
    return re.findall(r"https://mail\.shop\.example/[opc]/[^\s\"<>]+", copy.replace("=\n", ""))


def payload(url: str) -> object:
    """What a token says, decoded as anyone could (no key needed to read it)."""
    token = url.rsplit("/", 1)[1].removesuffix(".gif").replace("=3D", "=")
    part = token.split(".")[0] or token.split(".")[1]
    data = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    if token.startswith("."):
        data = zlib.decompress(data)
    return json.loads(data)


def test_aggregate_urls_are_the_messages_own_and_name_nobody() -> None:
    pipeline = Pipeline(opens=Mode.AGGREGATE, clicks=Mode.AGGREGATE)
    arrival = Arrival(at=1_800_000_000.0)
    first = pipeline.prepare("QUEUE0000001", "news@shop.example", message(), arrival=arrival)
    retry = pipeline.prepare("QUEUE0000001", "news@shop.example", message(), arrival=arrival)
    ann, bob = urls_of(first, ANN), urls_of(retry, BOB)
    beacons = [u for u in ann if "/o/" in u or "/c/" in u]
    assert beacons == [u for u in bob if "/o/" in u or "/c/" in u]  # one URL per message
    assert len(beacons) == 2
    for url in beacons:
        said = json.dumps(payload(url))
        assert "spring" in said and "shop.example" in said
        for name in (ANN, HASHER.hash(ANN), "QUEUE0000001"):
            assert name not in said
    assert not any("/p/" in url for url in ann)  # nobody to withdraw: no preference link


def test_individual_copies_withdrawn_or_narrowed_per_message() -> None:
    pipeline = Pipeline(opens=Mode.INDIVIDUAL, clicks=Mode.INDIVIDUAL)
    prepared = pipeline.prepare("QUEUE0000002", "news@shop.example", message())
    ann = urls_of(prepared, ANN)
    bob = urls_of(prepared, BOB)
    assert len(set(ann) & set(bob)) == 0  # every URL of a copy is its own
    assert any("/p/" in url for url in ann)
    withdrawn = Consent(withdrawn=frozenset({Purpose.OPENS}))
    assert prepared.modes_for(withdrawn) == Modes(Mode.AGGREGATE, Mode.INDIVIDUAL)
    narrowed = pipeline.prepare(
        "QUEUE0000003", "news@shop.example", message(X_Optout_Track="aggregate")
    )
    assert narrowed.meta.modes == Modes(Mode.AGGREGATE, Mode.AGGREGATE)
    off = pipeline.prepare("QUEUE0000004", "news@shop.example", message(X_Optout_Track="off"))
    assert off.meta.modes == Modes(Mode.OFF, Mode.OFF)
    assert not any("/o/" in u or "/c/" in u for u in urls_of(off, ANN))
    widen = Pipeline(opens=Mode.AGGREGATE).prepare(
        "QUEUE0000005", "news@shop.example", message(X_Optout_Track="individual")
    )
    assert widen.meta.modes.opens is Mode.AGGREGATE  # a message never widens its mode
    assert any("ignored X-Optout-Track" in d for d in widen.meta.decisions)


def test_the_consent_header_is_believed_only_from_whom_it_may_come() -> None:
    tool = Account("crm", HASH, ("shop.example",), consent_header=True)
    other = Account("mautic", HASH, ("shop.example",), opens=Mode.CONSENTED)
    pipeline = Pipeline(opens=Mode.CONSENTED, accounts={"crm": tool, "mautic": other})
    raw = message(X_Optout_Consent="opens, telepathy")
    trusted = pipeline.prepare("QUEUE0000006", "news@shop.example", raw)
    assert trusted.meta.header_consent == {Purpose.OPENS}
    assert trusted.modes_for() == Modes(Mode.INDIVIDUAL, Mode.OFF)
    assert any("ignored: telepathy" in d for d in trusted.meta.decisions)
    vouched = pipeline.prepare("QUEUE0000007", "news@shop.example", raw, "crm")
    assert vouched.modes_for().opens is Mode.INDIVIDUAL
    refused = pipeline.prepare("QUEUE0000008", "news@shop.example", raw, "mautic")
    assert refused.modes_for().opens is Mode.AGGREGATE
    assert any("mautic may not vouch" in d for d in refused.meta.decisions)
    withdrew = Consent(withdrawn=frozenset({Purpose.OPENS}))
    assert vouched.modes_for(withdrew).opens is Mode.AGGREGATE  # the recipient's word wins


def test_an_account_sets_its_own_modes() -> None:
    quiet = Account("quiet", HASH, ("shop.example",), track_opens=False)
    lawful = Account("lawful", HASH, ("shop.example",), opens=Mode.AGGREGATE)
    pipeline = Pipeline(
        opens=Mode.INDIVIDUAL, clicks=True, accounts={"quiet": quiet, "lawful": lawful}
    )
    assert pipeline.prepare("Q1", "n@shop.example", message(), "quiet").meta.modes == Modes(
        Mode.OFF, Mode.OFF
    )
    assert pipeline.prepare("Q2", "n@shop.example", message(), "lawful").meta.modes == Modes(
        Mode.AGGREGATE, Mode.INDIVIDUAL
    )


def test_config_keys_old_and_new() -> None:
    old = parse_settings({"tracking": {"clicks": True}})
    assert (old.tracking.opens, old.tracking.click_mode) == (Mode.INDIVIDUAL, Mode.INDIVIDUAL)
    new = parse_settings(
        {"tracking": {"opens": "consented", "clicks": "aggregate", "keep_last_open_only": True}}
    )
    assert (new.tracking.opens, new.tracking.click_mode) == (Mode.CONSENTED, Mode.AGGREGATE)
    assert new.tracking.keep_last_open_only


@pytest.mark.parametrize(
    ("document", "message_"),
    [
        ({"tracking": {"opens": "sometimes"}}, "tracking.opens: must be one of individual,"),
        ({"tracking": {"clicks": "maybe"}}, "tracking.clicks: must be false, true or one of"),
        ({"tracking": {"opens": True}}, "tracking.opens: must be one of"),
    ],
)
def test_bad_modes_are_one_line_naming_the_key(document: dict[str, object], message_: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(document)
    assert str(caught.value).startswith(message_), str(caught.value)


def test_an_account_cannot_both_turn_tracking_off_and_set_a_mode() -> None:
    account = {
        "username": "a",
        "password_hash": HASH,
        "from_domains": ["shop.example"],
        "tracking": False,
        "opens": "aggregate",
    }
    with pytest.raises(ConfigError) as caught:
        parse_settings({"accounts": [account]})
    assert str(caught.value) == "accounts[0].opens: conflicts with tracking = false"
