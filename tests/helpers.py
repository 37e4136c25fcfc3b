"""Real parts for tests: relay settings, a capture SMTP server as the downstream MTA, message
builders and readers, the CLI as a process, the spool read as a restarted relay would, polling.

Fixtures live in conftest.py; everything a test imports lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email
import email.policy
import ipaddress
import os
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from email.message import EmailMessage, Message
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.settings import (
    DeliverySettings,
    Downstream,
    HttpSettings,
    Listen,
    RewriteSettings,
    Settings,
    SigningSettings,
    SmtpSettings,
    StorageSettings,
)
from relay.spool import Spool
from relay.stores import SPOOL_FILE

if TYPE_CHECKING:
    from relay.accounts import Account
    from relay.app import Relay

ROOT = Path(__file__).resolve().parent.parent
SIGNING_KEYS = ("test-signing-key-newest-0123456789", "test-signing-key-older-0123456789")
# The conftest fixtures `start_relay` and `start_downstream`, for annotations.
StartRelay = Callable[[Settings], Awaitable["Relay"]]
StartDownstream = Callable[..., Awaitable["CaptureServer"]]
# The password of the test accounts (tests hash it into their `Account`s).
PASSWORD = "correct horse battery staple"


# --------------------------------------------------------------------------- settings


def relay_settings(data_dir: Path, downstream_port: int | None) -> Settings:
    """Settings for a relay on free loopback ports, quick to retry."""
    return Settings(
        # A small disk reserve: tests make many data dirs, and some small filesystems.
        storage=StorageSettings(dir=data_dir, reserve=1024 * 1024),
        smtp=SmtpSettings(listen=Listen("127.0.0.1", 0), hostname="relay.test"),
        # One HTTP process, for the same reason as one delivery process below; several are
        # tested in test_http_workers.py.
        http=HttpSettings(
            listen=Listen("127.0.0.1", 0), public_url="https://mail.shop.example", processes=1
        ),
        delivery=DeliverySettings(
            downstream=None
            if downstream_port is None
            else Downstream("127.0.0.1", downstream_port),
            retry_initial_delay=0.2,
            retry_max_delay=1.0,
            timeout=10.0,
            # One, not one per core: tests start many relays, and spawning costs a second
            # each; several processes are tested where they matter (test_spool.py).
            processes=1,
        ),
        signing=SigningSettings(secret_keys=SIGNING_KEYS),
        # The test newsletters are short HTML, which by default gets no open pixel (spam
        # filters score an image in short HTML); tests of opens want one. The default is
        # tested in test_spamassassin.py and test_footer.py.
        rewrite=RewriteSettings(pixel_min_html=0),
    )


def with_smtp(settings: Settings, **changes: object) -> Settings:
    return replace(settings, smtp=replace(settings.smtp, **changes))


def with_delivery(settings: Settings, **changes: object) -> Settings:
    return replace(settings, delivery=replace(settings.delivery, **changes))


def untrusted(tmp_path: Path, downstream_port: int, accounts: tuple[Account, ...] = ()) -> Settings:
    """A relay that trusts no loopback client: submission needs AUTH, over TLS (STARTTLS on
    the SMTP port, or the implicit-TLS port), at most 3 connections per client."""
    cert, key = self_signed_files(tmp_path, "relay")
    settings = with_smtp(
        relay_settings(tmp_path / "data", downstream_port),
        trusted_networks=(ipaddress.ip_network("192.0.2.0/24"),),  # loopback is not trusted
        tls_cert=cert,
        tls_key=key,
        implicit_tls_listen=Listen("127.0.0.1", 0),
        max_connections_per_client=3,
    )
    return replace(settings, accounts=accounts)


class Clock:
    """A tracking app's clock (create_app(clock=...)): an hour after the copies were made,
    so that opens are a person's; tests move it."""

    def __init__(self) -> None:
        self.now = time.time() + 3600

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- ports, processes


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports: all held at once while asking, so the OS
    cannot hand out the same one twice."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def free_port() -> int:
    return free_ports(1)[0]


def poll_until(condition: Callable[[], bool], what: str, within: float = 20.0) -> None:
    """wait_for for code outside the event loop: poll `condition`; fail after `within` s."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_until_listening(port: int, process: subprocess.Popen[bytes], within: float = 20) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"relay exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port}")


def run_cli(
    *args: str, cwd: Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**(os.environ if env is None else env), "PYTHONPATH": str(ROOT)},
        check=False,
    )


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A command against the config file `config`, run where it lies."""
    return run_cli(*args, "--config", str(config), cwd=config.parent)


# --------------------------------------------------------------------------- the spool


async def spool_depth(data_dir: Path) -> tuple[int, int]:
    """(messages, deliveries) waiting in the spool of `data_dir`, read through a spool of
    its own, as another process (a restarted relay, the CLI) would."""
    spool = await Spool.open(data_dir / SPOOL_FILE)
    try:
        return await spool.depth()
    finally:
        await spool.close()


async def spooled_contents(data_dir: Path) -> list[bytes]:
    """The content of every message waiting in the spool of `data_dir`, oldest first, read
    through a spool of its own."""
    spool = await Spool.open(data_dir / SPOOL_FILE)
    try:
        contents = [await spool.content(entry.queue_id) for entry in await spool.entries()]
    finally:
        await spool.close()
    return [content for content in contents if content is not None]


# --------------------------------------------------------------------------- the downstream


@dataclass
class Captured:
    mail_from: str
    recipients: list[str]
    content: bytes
    encrypted: bool = False


@dataclass
class CaptureHandler:
    """A downstream MTA that keeps what it is given; replies can be scripted per recipient."""

    messages: list[Captured] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    # Offered as MTAs do (aiosmtpd reads pipelined commands in turn but does not say so).
    pipelining: bool = True

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply:
            return self.data_reply
        self.messages.append(
            Captured(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                encrypted=session.ssl is not None,
            )
        )
        self.arrived.set()
        return "250 2.0.0 Ok: captured"

    def for_recipient(self, address: str) -> list[Captured]:
        return [m for m in self.messages if address in m.recipients]


class CaptureServer:
    def __init__(self, handler: CaptureHandler, server: asyncio.Server) -> None:
        self.handler = handler
        self.server = server
        self.port: int = server.sockets[0].getsockname()[1]

    @classmethod
    async def start(
        cls,
        port: int = 0,
        tls: ssl.SSLContext | None = None,
        eight_bit: bool = True,
        pipelining: bool = True,
    ) -> CaptureServer:
        """`eight_bit=False`: an old MTA without 8BITMIME that refuses 8-bit data."""
        handler = CaptureHandler(pipelining=pipelining)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(
                handler,
                hostname="capture.test",
                tls_context=tls,
                require_starttls=bool(tls),
                decode_data=not eight_bit,
            ),
            "127.0.0.1",
            port,
        )
        return cls(handler, server)

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


# --------------------------------------------------------------------------- polling


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]], within: float = 10.0, what: str = ""
) -> None:
    """Poll until `condition` holds; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- messages


def newsletter(
    to: list[str],
    *,
    sender: str = "news@shop.example",
    subject: str = "Spring sale",
    headers: dict[str, str] | None = None,
) -> EmailMessage:
    """A multipart/alternative marketing message, as a marketing tool sends it."""
    message = EmailMessage()
    message["From"] = f"Shop <{sender}>"
    message["To"] = ", ".join(to)
    message["Subject"] = subject
    message["Message-ID"] = "<spring-2026@shop.example>"
    for name, value in (headers or {}).items():
        message[name] = value
    message.set_content("Our spring sale starts today.\nEverything 20% off.\n")
    message.add_alternative(
        "<!doctype html><html><head><title>Sale</title></head>"
        "<body><h1>Spring sale</h1><p>Everything 20% off.</p></body></html>",
        subtype="html",
    )
    return message


def parse(content: bytes) -> Message:
    return email.message_from_bytes(content, policy=email.policy.compat32)


def body_of(message: Message, subtype: str) -> str:
    for part in message.walk():
        if part.get_content_type() == f"text/{subtype}":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload.decode(part.get_content_charset() or "ascii")
    raise AssertionError(f"no text/{subtype} part")


def local_url(relay: Relay, public_url: str) -> str:
    """The public URL as served by this relay's HTTP listener (what a reverse proxy does)."""
    host, port = relay.addresses.http
    path = urlsplit(public_url).path
    return f"http://{host}:{port}{path}"


async def events_of(relay: Relay, kind: str) -> list[dict[str, Any]]:
    """The relay's events of one type, oldest first."""
    return [e async for e in relay.stores.events.export() if e["type"] == kind]


# --------------------------------------------------------------------------- submission


@dataclass
class Submission:
    refused: dict[str, tuple[int, bytes]]
    reply: tuple[int, bytes] | None = None
    error: Exception | None = None


def submit(
    port: int, message: EmailMessage | bytes, sender: str, recipients: list[str]
) -> Submission:
    """Submit with the stdlib client, as a marketing tool would; report what the server said."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        try:
            if isinstance(message, bytes):
                refused = client.sendmail(sender, recipients, message)
            else:
                refused = client.send_message(message, sender, recipients)
        except smtplib.SMTPRecipientsRefused as exc:
            return Submission(dict(exc.recipients), error=exc)
        except smtplib.SMTPResponseException as exc:
            return Submission({}, (exc.smtp_code, exc.smtp_error), exc)
        return Submission(dict(refused), (250, b""))


async def asubmit(*args: Any) -> Submission:
    return await asyncio.to_thread(submit, *args)


def client_context() -> ssl.SSLContext:
    """A client TLS context that takes the relay's self-signed test certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the test certificate is self-signed
    return context


def session(
    port: int, *, tls: bool = True, login: str | None = None, password: str = PASSWORD
) -> smtplib.SMTP:
    """An SMTP session as a marketing tool opens it: EHLO, STARTTLS, AUTH if `login`."""
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    try:
        client.ehlo("tool.test")
        if tls:
            client.starttls(context=client_context())
            client.ehlo("tool.test")
        if login:
            client.login(login, password)
    except BaseException:
        client.close()
        raise
    return client


# --------------------------------------------------------------------------- TLS


def self_signed_context(directory: Path) -> ssl.SSLContext:
    """A server TLS context with a fresh self-signed certificate, as a local MTA often has."""
    cert_file, key_file = self_signed_files(directory)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


def self_signed_files(directory: Path, name: str = "mta") -> tuple[Path, Path]:
    """A fresh self-signed certificate and its key, as PEM files (certificate, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name}.test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return cert_file, key_file
