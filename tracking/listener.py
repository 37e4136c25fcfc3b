"""The HTTP listener: an accept loop of our own in front of aiohttp's protocol, so that

- connections are capped in total (past the cap the listener stops accepting: clients wait
  in the kernel's queue, no descriptor is spent on them) and per client address (an IPv6
  /64; past it a connection gets a plain 503 and is closed at once). Trusted proxies carry
  many clients' connections and count only towards the total;
- a connection must deliver its first request's headers within `header_timeout` of being
  accepted, or it gets a 408 and is closed (a slow client sending a byte at a time holds a
  descriptor for that long at most). Later requests on a kept-alive connection are held to
  the same time by aiohttp's keep-alive timeout, which the caller sets to it;
- running out of descriptors (or memory) while accepting is logged once when it starts and
  once when it ends, with the number of attempts in between, never once per attempt.

asyncio's own server logs a traceback for every failed accept, retried without pause up to
its backlog per turn of the loop: at the descriptor limit that was hundreds of thousands of
lines a minute, and neither listener answered. aiohttp has no header timeout of its own that
holds on every supported version.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .network import Ranges, limiter_key, networks, parse_ip

log = logging.getLogger("optout.http")

DEFAULT_HEADER_TIMEOUT = 30.0
ACCEPT_BATCH = 32  # connections taken per turn of the loop, so other work goes on meanwhile
RETRY_AFTER_FAILURE = 1.0  # seconds before accepting again after the system said no
BACKLOG = 128
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 10\r\nContent-Length: 0\r\n"
    b"Connection: close\r\n\r\n"
)
# What getaddrinfo gives: family, type, protocol, name, and an address of the family's form.
_AddressInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]
_TOO_SLOW = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@dataclass(frozen=True, slots=True)
class ConnectionCaps:
    """`total` connections open at once, `per_client` of them from one client address
    (trusted proxies, `exempt`, are held to the total only)."""

    total: int
    per_client: int
    exempt: tuple[str, ...] = ()
    header_timeout: float = DEFAULT_HEADER_TIMEOUT

    def __post_init__(self) -> None:
        if self.total < 1 or self.per_client < 1 or self.header_timeout <= 0:
            raise ValueError("connection caps and the header timeout must be positive")


@dataclass(slots=True)
class ListenerStats:
    """What the listener counted, read by /metrics."""

    open: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # by reason
    header_timeouts: int = 0
    accept_failures: int = 0


class ClientCounts:
    """Connections open per client address, held by whichever process opened them: one
    instance in the main HTTP process counts for every HTTP process of the relay
    (tracking.hub), and a process that dies takes its holdings with it (`forget`)."""

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self._open: Counter[str] = Counter()
        self._held: dict[int, Counter[str]] = {}

    def admit(self, key: str, holder: int = 0) -> bool:
        """Count one more connection of `key`'s client, unless it has its share open."""
        if self._open[key] >= self.per_client:
            return False
        self._open[key] += 1
        self._held.setdefault(holder, Counter())[key] += 1
        return True

    def release(self, key: str, holder: int = 0) -> None:
        held = self._held.get(holder)
        if held is None or held[key] <= 0:
            return  # not ours to release (a holder forgotten meanwhile)
        held[key] -= 1
        if not held[key]:
            del held[key]
        self._drop(key, 1)

    def forget(self, holder: int) -> None:
        """Release everything `holder` had open (its process is gone)."""
        for key, count in self._held.pop(holder, Counter()).items():
            self._drop(key, count)

    def _drop(self, key: str, count: int) -> None:
        self._open[key] -= count
        if self._open[key] <= 0:
            del self._open[key]


class Admission(Protocol):
    """Where a listener asks whether a client may open one more connection."""

    async def admit(self, key: str) -> bool: ...

    def release(self, key: str) -> None: ...


class LocalAdmission:
    """Admission by `ClientCounts` in this process."""

    __slots__ = ("counts",)

    def __init__(self, counts: ClientCounts) -> None:
        self.counts = counts

    async def admit(self, key: str) -> bool:
        return self.counts.admit(key)

    def release(self, key: str) -> None:
        self.counts.release(key)


class AcceptFailures:
    """Failed accepts on one listener, logged when they start and when they stop, with how
    many there were in between: the state, not each attempt."""

    def __init__(self, name: str, logger: logging.Logger = log) -> None:
        self.name = name
        self._log = logger
        self._since: float | None = None
        self._attempts = 0

    @property
    def failing(self) -> bool:
        return self._since is not None

    def failed(self, error: OSError, hint: str = "") -> None:
        self._attempts += 1
        if self._since is None:
            self._since = time.monotonic()
            self._log.error(
                "%s: cannot accept connections: %s%s; retrying every %.0f s",
                self.name,
                error.strerror or error,
                hint,
                RETRY_AFTER_FAILURE,
            )

    def succeeded(self) -> None:
        if self._since is None:
            return
        self._log.warning(
            "%s: accepting connections again after %d failed attempts in %.0f s",
            self.name,
            self._attempts,
            time.monotonic() - self._since,
        )
        self._since, self._attempts = None, 0


def _claimed(info: _AddressInfo) -> Any:
    """`info`'s address once a plain bind shows it free (OSError if it is not), with the
    port the system chose for port 0."""
    family, kind, proto, _, address = info
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind(address)
        return (address[0], probe.getsockname()[1], *address[2:])


def descriptor_hint() -> str:
    """What the process has open against its limit, for an out-of-descriptors message."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        return f" ({len(os.listdir('/proc/self/fd'))} descriptors open, limit {limit})"
    except OSError:  # no /proc, or no descriptor left to read it with
        return f" (limit {limit} descriptors)"


class HttpListener:
    """Accepts connections for `protocol_factory` (aiohttp's `web.Server`, for one) within
    `caps`; see the module's doc."""

    def __init__(
        self,
        protocol_factory: Callable[[], asyncio.Protocol],
        caps: ConnectionCaps,
        *,
        name: str = "http",
        admission: Admission | None = None,
    ) -> None:
        """`admission`: who counts connections per client (default: this listener alone,
        against `caps.per_client`)."""
        self._factory = protocol_factory
        self.caps = caps
        self.name = name
        self.stats = ListenerStats()
        self._exempt: Ranges = networks(caps.exempt)
        self.admission = admission or LocalAdmission(ClientCounts(caps.per_client))
        self._mine: Counter[str] = Counter()  # this listener's, open or being admitted
        self._sockets: list[socket.socket] = []
        self._reading = False
        self._closed = False
        self._full_since: float | None = None
        self._failures = AcceptFailures(name)
        self._retry: asyncio.TimerHandle | None = None
        self._connecting: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [sock.getsockname()[:2] for sock in self._sockets]

    async def start(
        self, host: str, port: int, *, reuse_port: bool = False
    ) -> list[tuple[str, int]]:
        """Listen on every address `host` resolves to (OSError if it cannot); the addresses
        bound. `reuse_port`: other processes may listen on them too (SO_REUSEPORT), and the
        kernel spreads new connections over all of them."""
        self._loop = loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        if reuse_port:
            # SO_REUSEPORT would let a second relay of the same user listen here too and
            # take a share of the requests in silence: first the port must be free.
            infos = [(*info[:4], _claimed(info)) for info in infos]
        self._bind(dict.fromkeys(infos), reuse_port)
        return self.addresses

    async def start_on(self, addresses: list[tuple[str, int]]) -> None:
        """Listen beside another process on the addresses its `start(reuse_port=True)`
        bound."""
        self._loop = loop = asyncio.get_running_loop()
        infos = []
        for host, port in addresses:
            infos += await loop.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST
            )
        self._bind(dict.fromkeys(infos), reuse_port=True)

    def _bind(self, infos: Iterable[_AddressInfo], reuse_port: bool) -> None:
        try:
            for family, kind, proto, _, address in infos:
                sock = socket.socket(family, kind, proto)
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(BACKLOG)
                sock.setblocking(False)
        except BaseException:
            self._close_sockets()
            raise
        self._resume()

    def close(self) -> None:
        """Stop accepting; open connections are left to their protocol (aiohttp closes them
        on its cleanup)."""
        self._closed = True
        self._pause()
        if self._retry is not None:
            self._retry.cancel()
        for task in self._connecting:
            task.cancel()
        self._close_sockets()

    # --- accepting -----------------------------------------------------------------------

    def _resume(self) -> None:
        self._retry = None
        if self._reading or self._closed or self._loop is None:
            return
        self._reading = True
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _pause(self) -> None:
        if not self._reading or self._loop is None:
            return
        self._reading = False
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            if self.stats.open >= self.caps.total:
                self._full()
                return
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._failed(exc)
                return
            self._failures.succeeded()
            self._admit(conn, peer)

    def _failed(self, exc: OSError) -> None:
        self.stats.accept_failures += 1
        hint = descriptor_hint() if exc.errno in (errno.EMFILE, errno.ENFILE) else ""
        self._failures.failed(exc, hint)
        if exc.errno not in _OUT_OF_RESOURCES:
            log.debug("accept failed", exc_info=exc)
        # The socket stays readable: wait before trying again instead of spinning on it.
        self._pause()
        assert self._loop is not None
        self._retry = self._loop.call_later(RETRY_AFTER_FAILURE, self._resume)

    def _full(self) -> None:
        """At the total cap: stop accepting until a connection closes (`released`)."""
        self._pause()
        if self._full_since is None:
            self._full_since = time.monotonic()
            log.warning(
                "%s: %d connections open, the most allowed (http.max_connections):"
                " new ones wait until one closes",
                self.name,
                self.stats.open,
            )

    def _admit(self, conn: socket.socket, peer: object) -> None:
        address = parse_ip(peer[0]) if isinstance(peer, tuple) else None
        key = None if address in self._exempt else limiter_key(address)
        if key is not None:
            if self._mine[key] >= self.caps.per_client:
                # Its share is open (or being admitted) here alone: no need to ask.
                self._refuse(conn)
                return
            self._mine[key] += 1
        self.stats.open += 1
        assert self._loop is not None
        task = self._loop.create_task(self._connect(conn, key))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect(self, conn: socket.socket, key: str | None) -> None:
        assert self._loop is not None
        try:
            admitted = key is None or await self.admission.admit(key)
        except BaseException as exc:
            conn.close()
            self._gone(key)
            if not isinstance(exc, Exception):
                raise  # cancelled: the listener is closing
            log.debug("cannot admit a connection", exc_info=exc)  # the main process is gone
            return
        if not admitted:
            self._refuse(conn)
            self._gone(key)
            return
        guards: list[_Guarded] = []

        def guarded() -> _Guarded:
            guards.append(_Guarded(self, key, self._factory()))
            return guards[0]

        try:
            conn.setblocking(False)
            await self._loop.connect_accepted_socket(guarded, conn)
        except BaseException as exc:
            conn.close()
            # Once its guard saw the connection made, the guard releases it when it is lost.
            if not (guards and guards[0].made):
                self.released(key)
            if not isinstance(exc, Exception):
                raise  # cancelled: the listener is closing
            log.debug("a connection failed as it was set up", exc_info=exc)

    def _refuse(self, conn: socket.socket) -> None:
        """A client over its share: a plain 503, and the connection closed at once."""
        self.stats.refused["per-client"] += 1
        with contextlib.suppress(OSError):
            conn.setblocking(False)
            conn.send(_BUSY)
        conn.close()

    def released(self, key: str | None) -> None:
        """An admitted connection closed (its guard tells)."""
        if key is not None:
            self.admission.release(key)
        self._gone(key)

    def _gone(self, key: str | None) -> None:
        """A connection this listener counted is closed."""
        if key is not None:
            self._mine[key] -= 1
            if self._mine[key] <= 0:
                del self._mine[key]
        self.stats.open -= 1
        if self._full_since is not None and self.stats.open < self.caps.total:
            log.info(
                "%s: accepting connections again after %.0f s at the limit",
                self.name,
                time.monotonic() - self._full_since,
            )
            self._full_since = None
            if self._retry is None:
                self._resume()

    def timed_out(self) -> None:
        """A connection was closed for sending its headers too slowly (its guard tells)."""
        self.stats.header_timeouts += 1

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the first request's header deadline and
    the listener's count of open connections around it."""

    __slots__ = ("_deadline", "_inner", "_key", "_listener", "_tail", "_transport", "made")

    def __init__(self, listener: HttpListener, key: str | None, inner: asyncio.Protocol) -> None:
        self._listener = listener
        self._key = key
        self._inner = inner
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""
        self._transport: asyncio.BaseTransport | None = None
        self.made = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        self._transport = transport
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._listener.caps.header_timeout, self._too_slow)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._deadline is not None:
            seen = self._tail + data
            if b"\r\n\r\n" in seen or b"\n\n" in seen:  # the end of the header block
                self._deadline.cancel()
                self._deadline = None
                self._tail = b""
            else:
                self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._listener.released(self._key)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _too_slow(self) -> None:
        self._deadline = None
        self._listener.timed_out()
        transport = self._transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(_TOO_SLOW)
            transport.close()
