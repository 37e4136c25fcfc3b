"""aiosmtpd's server as the relay needs it: enhanced status codes, connection limits, DATA
read in chunks (spilled to a file when big), and AUTH checked off the event loop.

It overrides a few of aiosmtpd's private methods, each for one reason its docstring gives;
everything else is aiosmtpd's."""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AnyStr

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session, syntax

from ..spool import Spilled
from .auth import AuthPolicy
from .data import SPILL_THRESHOLD, DataProblem, DataResult, discard, read_data

log = logging.getLogger("optout.smtp")

# aiosmtpd's own wording for limits it enforces, mapped to the replies of our contract.
_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
_REPLIES = {
    "552 Error: message size exceeds fixed maximum message size": _TOO_BIG,
    "552 Error: Too much mail data": _TOO_BIG,
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)",
    "503 Already authenticated": "503 5.5.1 Already authenticated",
    "503 Error: need MAIL command": "503 5.5.1 Error: need MAIL command",
    "503 Error: need RCPT command": "503 5.5.1 Error: need RCPT command",
    "503 Error: nested MAIL command": "503 5.5.1 Error: nested MAIL command",
}
# <local@domain> with a dot-atom local part (RFC 5321 §4.1.2) and a plain ASCII domain: what
# nearly every MAIL and RCPT carries. Anything else goes to aiosmtpd's full parser.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PATH = re.compile(rf"\s*<({_ATEXT}(?:\.{_ATEXT})*)@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
# C0 controls and DEL are in no part of RFC 5321's MAIL and RCPT syntax; a NUL passed on
# cuts the address short in the C code of the MTAs downstream.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
BAD_SENDER = "501 5.1.7 Bad sender address syntax"
BAD_RECIPIENT = "501 5.1.3 Bad recipient address syntax"
TLS_ALREADY_ACTIVE = "554 5.5.1 Error: TLS already active"  # Postfix's words


@dataclass(slots=True)
class ConnectionLimits:
    total: int
    per_client: int
    open: Counter[str] = field(default_factory=Counter)

    def admit(self, client: str) -> bool:
        if sum(self.open.values()) >= self.total or self.open[client] >= self.per_client:
            return False
        self.open[client] += 1
        return True

    def release(self, client: str) -> None:
        self.open[client] -= 1
        if self.open[client] <= 0:
            del self.open[client]


@dataclass(slots=True)
class _Pending:
    """Credentials parsed by aiosmtpd's PLAIN/LOGIN code, waiting for our async check."""

    credentials: LoginPassword


class RelaySession(Session):
    """aiosmtpd's session without its deprecated `login_data` property, which logs a
    warning on every successful AUTH as aiosmtpd itself sets it. The relay reads the
    account from `auth_data` only; `login_data` is a plain attribute here, never read."""

    login_data: Any = None


class RelayEnvelope(Envelope):
    """aiosmtpd's envelope, and where a message too big for memory went: for such a message
    `content` and `original_content` hold only its first octets, `spilled` all of it."""

    def __init__(self) -> None:
        super().__init__()
        self.spilled: Spilled | None = None
        # Set by the handler at MAIL: header lines of the relay's own that go before the
        # message as it is read (control headers the pipeline reads and removes).
        self.prefix = b""
        self.transactional = False  # the handler's verdict on this transaction's mail


def is_localhost(hostname: str) -> bool:
    """Whether `hostname` is a name of the loopback host (what socket.getfqdn() gives on a
    machine whose name resolves to 127.0.0.1): no name to greet clients and to write in
    the relay's Received field, which receivers read."""
    name = hostname.lower().rstrip(".")
    return name in ("localhost", "localhost6", "ip6-localhost", "ip6-loopback") or (
        name.startswith("localhost.") or name.endswith(".localhost")
    )


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context; `reload_certificate` swaps the files in for new connections."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def reload_certificate(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    context.load_cert_chain(cert, key)


class RelaySMTP(SMTP):
    """One SMTP session. `implicit_tls`: the listener wrapped the socket in TLS already.
    `spill_dir`: where messages bigger than `spill_threshold` go as they arrive (the
    spool's incoming/, which it sweeps at start); None keeps every message in memory."""

    # aiosmtpd sizes its StreamReader's buffer from this, and uses it for nothing else we
    # keep: DATA is read by `read_data`, which applies RFC 5321's line limit itself. A
    # bigger buffer lets a message arrive in a few large reads instead of ~1 KB ones; the
    # reader holds up to twice this before it pauses the socket, per session.
    line_length_limit = 32 * 1024
    # What one read from a plain TCP socket may take (asyncio's default is 256 KiB, on top
    # of the above): with a hundred clients sending big messages at once, these buffers
    # were a quarter of the front door's memory.
    receive_size = 32 * 1024
    # Messages bigger than this are spilled to a file as they arrive (see smtp_DATA).
    spill_threshold = SPILL_THRESHOLD

    def __init__(
        self,
        handler: Any,
        *,
        limits: ConnectionLimits,
        auth: AuthPolicy,
        spill_dir: Path | None = None,
        implicit_tls: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._limits = limits
        self._auth = auth
        self._spill_dir = spill_dir
        self.implicit_tls = implicit_tls
        self._admitted: str | None = None

    def _create_session(self) -> Session:
        """aiosmtpd's session factory (called per connection, and again after STARTTLS)."""
        return RelaySession(self.loop)

    def _create_envelope(self) -> Envelope:
        """aiosmtpd's envelope factory (called at each new transaction), overridden so the
        envelope has room for a spilled message."""
        return RelayEnvelope()

    def _client_ip(self) -> str:
        peer = self.session.peer if self.session is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else "?"

    @property
    def encrypted(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # CPython's socket transports read `max_size` octets at a time (a class attribute,
        # "buffer size passed to recv()"); TLS transports have no such knob and keep
        # their own reads.
        if isinstance(getattr(transport, "max_size", None), int):
            setattr(transport, "max_size", self.receive_size)  # noqa: B010
        if self._admitted is not None:
            return  # STARTTLS: the same connection, now over TLS, is made again
        peer = transport.get_extra_info("peername")  # the session may not exist yet
        client = str(peer[0]) if isinstance(peer, tuple) else "?"
        if self._limits.admit(client):
            self._admitted = client

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted is not None:
            self._limits.release(self._admitted)
            self._admitted = None
        super().connection_lost(exc)

    async def _handle_client(self) -> None:
        """aiosmtpd's session, which begins with the greeting: overridden so a connection
        over the limits gets a 421 instead (`connection_made` cannot reply yet)."""
        if self._admitted is None:
            await self._refuse_connection()
            return
        await super()._handle_client()

    async def _refuse_connection(self) -> None:
        log.warning("reject: connection from %s: too many connections", self._client_ip())
        await super().push(TOO_MANY_CONNECTIONS)
        if self.transport is not None:
            self.transport.close()

    async def push(self, status: AnyStr) -> None:
        """Every reply goes out here: aiosmtpd's own wording for the limits it enforces is
        replaced by our contract's, with enhanced status codes."""
        if isinstance(status, str):
            await super().push(_REPLIES.get(status, status))
        else:
            await super().push(status)

    # The commands below override aiosmtpd's; each keeps its @syntax, which HELP reads.

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """aiosmtpd's STARTTLS, but never under TLS (RFC 3207 §4.2: a client must not
        start TLS twice). aiosmtpd would begin a second handshake inside the first, or on
        the implicit-TLS listener say that TLS is not available."""
        if self.encrypted:
            await self.push(TLS_ALREADY_ACTIVE)
            return
        await super().smtp_STARTTLS(arg)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        """aiosmtpd's MAIL, after a check its address parser does not make."""
        if not await self._control_characters("MAIL", arg, BAD_SENDER):
            await super().smtp_MAIL(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        """aiosmtpd's RCPT, after a check its address parser does not make."""
        if not await self._control_characters("RCPT", arg, BAD_RECIPIENT):
            await super().smtp_RCPT(arg)

    async def _control_characters(self, command: str, arg: str | None, reply: str) -> bool:
        """Whether `arg` has a control character, and was refused with `reply` for it."""
        if arg is None or not _CONTROL.search(arg):
            return False
        log.info(
            "NOQUEUE: reject: %s from unknown[%s]: %s; control character in %s",
            command,
            self._client_ip(),
            reply,
            ascii(arg),  # escaped: the log gets no control characters either
        )
        await self.push(reply)
        return True

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA command with a reader that holds a message once, not per line,
        and spills a big one to `spill_dir`."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        data = await self._read_message()
        if data is None:
            return
        if data.problem is not None:
            await self._refuse_data(data.problem)
        else:
            await self._hand_over(data)

    async def _read_message(self) -> DataResult | None:
        """The message up to its end marker; None once the client has gone away."""
        try:
            envelope = self.envelope
            return await read_data(
                self._reader,
                self.data_size_limit,
                spill_to=self._spill_dir,
                threshold=self.spill_threshold,
                prefix=envelope.prefix if isinstance(envelope, RelayEnvelope) else b"",
            )
        except (asyncio.CancelledError, asyncio.IncompleteReadError) as lost:
            log.info("connection lost during DATA from %s", self._client_ip())
            self._writer.close()
            if isinstance(lost, asyncio.CancelledError):
                raise
            return None

    async def _refuse_data(self, problem: DataProblem) -> None:
        if problem is DataProblem.CANNOT_STORE:
            log.error("NOQUEUE: reject: DATA from %s: %s", self._client_ip(), problem.value)
        await self.push(problem.value)
        self.envelope = self._create_envelope()  # aiosmtpd's post-DATA state

    async def _hand_over(self, data: DataResult) -> None:
        """The handler's DATA hook answers for the message, as in aiosmtpd."""
        envelope = self.envelope
        assert isinstance(envelope, RelayEnvelope)
        envelope.content = envelope.original_content = data.content
        envelope.spilled = data.spilled
        try:
            status = await self._call_handler_hook("DATA")
            self.envelope = self._create_envelope()
            await self.push("250 OK" if status is MISSING else status)
        finally:
            # Spooled, refused or failed: the file has served (a crash leaves it to the
            # sweep at the next start). Before the next command is read, so a client that
            # has its reply to QUIT sees it gone.
            if data.spilled is not None:
                await discard(data.spilled.file)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parsing, with a fast path for plain addresses: its parser
        (the email package's, plus a class it defines on every call) cost a fifth of the
        front door's CPU per message."""
        plain = _PLAIN_PATH.match(arg)
        # As the email parser, the white space after ">" is not part of the rest.
        rest = arg[plain.end() :].lstrip(" \t") if plain else ""
        if plain is None or rest.startswith("("):  # a comment: the full parser's job
            address: tuple[str | None, str | None] = super()._getaddr(arg)
            return address
        local, domain = plain.groups()
        if self.local_part_limit and len(local) > self.local_part_limit:
            return None, None
        return f"{local}@{domain}", rest

    # ---- AUTH: aiosmtpd parses PLAIN and LOGIN; the password check runs in a thread ----

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        """aiosmtpd's password check, called synchronously by its auth_PLAIN and auth_LOGIN
        with the credentials they parsed: overridden only to collect them, since scrypt
        would block the event loop; `_checked` makes the check in a thread."""
        return AuthResult(success=False, handled=False, auth_data=_Pending(auth_data))

    async def auth_PLAIN(self, server: Any, args: list[str]) -> AuthResult:
        return await self._checked(await super().auth_PLAIN(server, args))

    async def auth_LOGIN(self, server: Any, args: list[str]) -> AuthResult:
        return await self._checked(await super().auth_LOGIN(server, args))

    async def _checked(self, parsed: AuthResult) -> AuthResult:
        if not isinstance(parsed.auth_data, _Pending):
            return parsed  # aiosmtpd already answered (bad base64, client gave up)
        return await self._auth.check(self._client_ip(), parsed.auth_data.credentials)
