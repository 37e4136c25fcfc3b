"""Authenticated submission (RFC 6409): never an open relay, TLS before AUTH, own domains only."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

import pytest

from relay.accounts import Account, hash_password, verify_password
from relay.app import Relay
from relay.smtpd import AuthThrottle
from tests.helpers import (
    PASSWORD,
    ROOT,
    SIGNING_KEYS,
    CaptureServer,
    StartRelay,
    client_context,
    free_ports,
    newsletter,
    run_cli,
    self_signed_files,
    session,
    untrusted,
    wait_for,
    wait_until_listening,
)

HASH = hash_password(PASSWORD)
MAUTIC = Account("mautic", HASH, ("shop.example",), topic="news", track_opens=False)
RCPT = "quinn@example.org"


@pytest.fixture
async def relay(tmp_path: Path, downstream: CaptureServer, start_relay: StartRelay) -> Relay:
    """A relay that trusts no client: the mautic account submits, over TLS."""
    return await start_relay(untrusted(tmp_path, downstream.port, (MAUTIC,)))


def mail_from(client: smtplib.SMTP, sender: str) -> tuple[int, bytes]:
    return client.docmd(f"MAIL FROM:<{sender}>")


async def test_without_tls_and_auth_nobody_submits(relay: Relay) -> None:
    port = relay.addresses.smtp[1]

    def attempt() -> list[tuple[int, bytes]]:
        with session(port, tls=False) as client:
            return [mail_from(client, "news@shop.example"), client.docmd("AUTH PLAIN AGFiYw==")]

    no_auth, auth_before_tls = await asyncio.to_thread(attempt)
    assert no_auth[0] == 530 and no_auth[1].startswith(b"5.7.0")
    assert auth_before_tls[0] == 538 and auth_before_tls[1].startswith(b"5.7.11")

    def tls_only() -> tuple[int, bytes]:
        with session(port) as client:
            return mail_from(client, "news@shop.example")

    code, text = await asyncio.to_thread(tls_only)
    assert code == 530 and text.startswith(b"5.7.0")


async def test_a_wrong_password_cannot_log_in(relay: Relay) -> None:
    def attempt() -> int:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            session(relay.addresses.smtp[1], login="mautic", password="guess")
        return refused.value.smtp_code

    assert await asyncio.to_thread(attempt) == 535


async def test_own_domain_goes_through_with_the_account_defaults(
    relay: Relay, downstream: CaptureServer
) -> None:
    def send() -> None:
        with session(relay.addresses.smtp[1], login="mautic") as client:
            client.send_message(newsletter([RCPT]), "news@shop.example", [RCPT])

    await asyncio.to_thread(send)
    await wait_for(lambda: len(downstream.handler.messages) == 1, what="delivery")
    copy = downstream.handler.messages[0].content
    assert b"/o/" not in copy  # the account turned open tracking off
    token = copy.split(b"List-Unsubscribe: <")[1].split(b">")[0].rsplit(b"/", 1)[1]
    from tracking import Signer, TrackingUrls

    ref = TrackingUrls("https://x", Signer(SIGNING_KEYS)).read_unsubscribe(token.decode())
    assert ref.scope == "topic:news"  # the account's default topic


async def test_foreign_domains_are_refused(relay: Relay) -> None:
    port = relay.addresses.smtp[1]

    def envelope() -> tuple[int, bytes]:
        with session(port, login="mautic") as client:
            return mail_from(client, "ceo@bank.example")

    code, text = await asyncio.to_thread(envelope)
    assert code == 550 and text.startswith(b"5.7.1")

    def header() -> tuple[int, bytes]:
        message = newsletter([RCPT], sender="ceo@bank.example")
        with session(port, login="mautic") as client:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.send_message(message, "news@shop.example", [RCPT])
            return refused.value.smtp_code, refused.value.smtp_error

    code, text = await asyncio.to_thread(header)
    assert code == 550 and text.startswith(b"5.7.1")
    assert relay.spool.waiting == 0


@pytest.mark.parametrize(
    ("from_header", "expected"),
    [
        (None, b"5.7.1 Message has no From address this account may send as"),
        ("undisclosed", b"5.7.1 Message has no From address this account may send as"),
        (
            "Shop <news@>",
            b"5.7.1 From header cannot be read unambiguously: From field is malformed"
            b" (invalid address in address-list)",
        ),
    ],
    ids=["no From", "no address", "no domain"],
)
async def test_an_account_cannot_send_without_a_from_it_may_use(
    relay: Relay, from_header: str | None, expected: bytes
) -> None:
    message = newsletter([RCPT])
    del message["From"]
    if from_header is not None:
        message["From"] = from_header

    def send() -> tuple[int, bytes]:
        with session(relay.addresses.smtp[1], login="mautic") as client:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("news@shop.example", [RCPT], message.as_bytes())
            return refused.value.smtp_code, refused.value.smtp_error

    code, text = await asyncio.to_thread(send)
    assert (code, text) == (550, expected)
    assert relay.spool.waiting == 0


async def test_implicit_tls_listener(relay: Relay, downstream: CaptureServer) -> None:
    assert relay.addresses.smtps is not None

    def send() -> None:
        with smtplib.SMTP_SSL(
            "127.0.0.1", relay.addresses.smtps[1], context=client_context(), timeout=30
        ) as client:
            client.login("mautic", PASSWORD)
            client.send_message(newsletter([RCPT]), "news@shop.example", [RCPT])

    await asyncio.to_thread(send)
    await wait_for(lambda: len(downstream.handler.messages) == 1, what="delivery")


async def test_repeated_failures_are_slowed_then_refused(relay: Relay) -> None:
    port = relay.addresses.smtp[1]

    def hammer() -> list[int]:
        codes = []
        with session(port) as client:
            for _ in range(7):
                code, _text = client.docmd("AUTH PLAIN", "AG1hdXRpYwB3cm9uZw==")  # mautic/wrong
                codes.append(code)
        return codes

    codes = await asyncio.to_thread(hammer)
    assert codes[:6] == [535] * 6  # the last three answered a second late
    assert codes[6] == 454  # then locked out for a while, whatever the password


async def test_connections_per_client_are_limited(relay: Relay) -> None:
    port = relay.addresses.smtp[1]

    def connect_many() -> list[int]:
        clients, codes = [], []
        try:
            for _ in range(4):
                client = smtplib.SMTP(timeout=10)
                code, _ = client.connect("127.0.0.1", port)
                clients.append(client)
                codes.append(code)
        finally:
            for client in clients:
                client.close()
        return codes

    assert await asyncio.to_thread(connect_many) == [220, 220, 220, 421]


def test_throttle_counts_per_network_and_forgets() -> None:
    throttle = AuthThrottle(slow_after=2, lock_after=3, window=60, delay=1.5)
    assert [throttle.begin("198.51.100.7", now=moment) for moment in (0, 1)] == [0.0, 0.0]
    assert throttle.begin("198.51.100.99", now=2) == 1.5  # the same /24
    assert throttle.begin("203.0.113.9", now=2) == 0.0
    assert throttle.begin("198.51.100.7", now=4) is None  # locked
    assert throttle.begin("198.51.100.7", now=100) == 0.0  # the window passed


def test_password_hashes() -> None:
    assert verify_password(PASSWORD.encode(), HASH)
    assert not verify_password(b"correct horse battery stapler", HASH)
    assert hash_password(PASSWORD) != HASH  # salted


def test_hash_password_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "relay", "account", "hash-password"],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert verify_password(PASSWORD.encode(), result.stdout.strip())
    short = run_cli("account", "hash-password", cwd=tmp_path)
    assert short.returncode == 2


def test_accounts_need_tls_in_the_config(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[storage]\ndir = "{tmp_path}"\n[[accounts]]\nusername = "a"\n'
        f'password_hash = "{HASH}"\nfrom_domains = ["shop.example"]\n'
    )
    result = run_cli("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "accounts: AUTH is only offered over TLS" in result.stderr


def test_sighup_reloads_the_certificate(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from cryptography import x509

    def common_name() -> str:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.starttls(context=client_context())
            der = client.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        name = x509.load_der_x509_certificate(der).subject.rfc4514_string()
        return name.removeprefix("CN=")

    cert, key = self_signed_files(tmp_path, "first")
    port, http_port = free_ports(2)
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[storage]\ndir = "{tmp_path / "data"}"\n'
        f'[smtp]\nlisten = "127.0.0.1:{port}"\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
        f'[http]\nlisten = "127.0.0.1:{http_port}"\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", str(config)],
        cwd=tmp_path,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        wait_until_listening(port, process)
        assert common_name() == "first.test"
        renewed_cert, renewed_key = self_signed_files(tmp_path, "renewed")
        renewed_cert.replace(cert)
        renewed_key.replace(key)
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while common_name() != "renewed.test":
            assert time.monotonic() < deadline, "certificate not reloaded"
            time.sleep(0.05)
        assert process.poll() is None  # SIGHUP reloads, it does not stop the relay
    finally:
        process.terminate()
        process.wait()


async def test_start_warns_about_account_domains_without_a_dkim_key(
    tmp_path: Path,
    downstream: CaptureServer,
    start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="optout.serve"):
        relay = await start_relay(untrusted(tmp_path, downstream.port, (MAUTIC,)))
        await relay.stop()
    assert "DKIM: no key for shop.example (account mautic): its mail leaves unsigned" in (
        caplog.text
    )


async def test_starttls_sessions_do_not_use_up_connection_slots(relay: Relay) -> None:
    port = relay.addresses.smtp[1]

    def sessions() -> list[int]:
        for _ in range(5):  # each STARTTLS re-makes the connection inside aiosmtpd
            with session(port):
                pass
        clients, codes = [], []
        try:
            for _ in range(3):  # the per-client limit
                client = smtplib.SMTP(timeout=10)
                codes.append(client.connect("127.0.0.1", port)[0])
                clients.append(client)
        finally:
            for client in clients:
                client.close()
        return codes

    assert await asyncio.to_thread(sessions) == [220, 220, 220]


def test_a_success_does_not_buy_more_guesses() -> None:
    throttle = AuthThrottle(slow_after=2, lock_after=3, window=60)
    for moment in range(2):
        throttle.begin("198.51.100.7", now=moment)  # two failures
    throttle.begin("198.51.100.7", now=2)
    throttle.succeeded("198.51.100.7", now=2)  # logging in to one's own account between
    throttle.begin("198.51.100.7", now=3)  # a third failure
    assert throttle.begin("198.51.100.7", now=4) is None
