"""Every copy the relay emits carries a DKIM signature that verifies after all its changes."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from email.utils import formatdate
from pathlib import Path

import pytest

from relay.dkim import dns_record, load_private_key
from relay.settings import DkimKey, DkimSettings, Settings
from tests.helpers import (
    CaptureServer,
    StartRelay,
    asubmit,
    newsletter,
    relay_settings,
    run_cli,
    wait_for,
)
from tests.opendkim import OpenDkim

dkim = pytest.importorskip("dkim", reason="dkimpy (test extra) verifies the signatures")

# Four: copies after the first two are signed with what the first two share (SigningMemo).
RECIPIENTS = ["olga@example.org", "paul@example.org", "quinn@example.org", "rosa@example.org"]


def keygen(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("dkim", "keygen", *args, "--config", str(config), cwd=config.parent)


def txt_of(zone_line: str) -> bytes:
    """The TXT value of a zone-file line, its strings joined as resolvers do."""
    inside = zone_line[zone_line.index("(") + 1 : zone_line.rindex(")")]
    return "".join(part for part in inside.split('"')[1::2]).encode()


async def relayed_copies(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> tuple[list[bytes], bytes]:
    """The personalised copies the relay signed, and the TXT record keygen printed."""
    config = tmp_path / "relay.toml"
    config.write_text(f'[storage]\ndir = "{tmp_path / "data"}"\n')
    made = keygen(config, "shop.example", "s2026")
    assert made.returncode == 0, made.stderr
    record = txt_of(made.stdout.strip())
    assert made.stdout.startswith("s2026._domainkey.shop.example. IN TXT")
    key_file = tmp_path / "data" / "dkim" / "shop.example.s2026.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600

    settings: Settings = relay_settings(tmp_path / "data", downstream.port)
    settings = replace(
        settings,
        dkim=DkimSettings((DkimKey("shop.example", "s2026", Path("dkim/shop.example.s2026.pem")),)),
    )
    relay = await start_relay(settings)
    message = newsletter(RECIPIENTS, headers={"Date": formatdate(localtime=True)})
    result = await asubmit(relay.addresses.smtp[1], message, "news@shop.example", RECIPIENTS)
    assert result.refused == {}
    await wait_for(
        lambda: len(downstream.handler.messages) == len(RECIPIENTS), what="every signed copy"
    )
    return [m.content for m in downstream.handler.messages], record


async def test_copies_are_signed_over_the_list_headers(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    copies, record = await relayed_copies(tmp_path, downstream, start_relay)

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"s2026._domainkey.shop.example."
        return record

    for content in copies:
        assert content.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
        signature = content.split(b"\r\n\r\n", 1)[0].split(b"\r\nFrom:")[0]
        tags = b"".join(signature.split())
        assert b"l=" not in tags.replace(b"; ", b";").split(b"h=")[0]
        signed = tags.split(b"h=")[1].split(b";")[0].lower().split(b":")
        assert signed.count(b"list-unsubscribe") == 2  # present once, over-signed once
        assert signed.count(b"list-unsubscribe-post") == 2
        assert dkim.verify(content, dnsfunc=dns)
        forged = content.replace(
            b"\r\n\r\n", b"\r\nList-Unsubscribe: <https://evil.example/u>\r\n\r\n", 1
        )
        assert not dkim.verify(forged, dnsfunc=dns)


async def test_copies_verify_with_opendkim(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay, opendkim: OpenDkim
) -> None:
    copies, _ = await relayed_copies(tmp_path, downstream, start_relay)
    key = load_private_key(tmp_path / "data" / "dkim" / "shop.example.s2026.pem")
    record = dns_record("shop.example", "s2026", key)
    forged = [
        c.replace(b"\r\n\r\n", b"\r\nList-Unsubscribe: <https://evil.example/u>\r\n\r\n", 1)
        for c in copies
    ]
    checks = opendkim.verify([*copies, *forged], [record], tmp_path)
    assert [v.passed for v in checks] == [True] * len(copies) + [False] * len(forged), checks


def test_a_missing_key_file_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[storage]\ndir = "{tmp_path / "data"}"\n'
        '[[dkim.keys]]\ndomain = "shop.example"\nselector = "s1"\nkey_file = "nope.pem"\n'
    )
    result = run_cli("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("optout-relay: error: config: dkim.keys[0]: ")
    )


async def test_a_sender_signature_the_rewrite_breaks_is_a_warning_event(
    tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay
) -> None:
    relay = await start_relay(relay_settings(tmp_path / "data", downstream.port))
    message = newsletter(["rita@example.org"])
    message["DKIM-Signature"] = (
        "v=1; a=rsa-sha256; c=relaxed/relaxed; d=shop.example; s=old; h=from:subject;"
        " bh=AAAA; b=BBBB"
    )
    await asubmit(relay.addresses.smtp[1], message, "news@shop.example", ["rita@example.org"])
    await wait_for(lambda: len(downstream.handler.messages) == 1, what="the copy")
    warnings = [e async for e in relay.stores.events.export() if e["type"] == "warning"]
    assert len(warnings) == 1
    assert "d=shop.example" in warnings[0]["detail"]["warning"]
    assert warnings[0]["recipient"] is None
