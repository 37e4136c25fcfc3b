"""Real parts for tests: a capture SMTP server as the downstream MTA, message builders, polling."""

from __future__ import annotations

import asyncio
import datetime
import smtplib
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


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
