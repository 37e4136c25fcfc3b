"""RSA signatures made by a helper process, beside a delivery process's event loop.

An RSA-2048 signature is the costliest step of a personalised copy: about 0.27 ms, a third
of what a fan-out copy costs its delivery process. A thread cannot take it off the loop:
the GIL's hand-offs cost more than they save (measured: 0.87 -> 1.2-1.4 ms of CPU per
copy). A process can, where the machine has a core to spare: the loop sends the bytes a
signature covers (a copy's signed header fields, about 1 KB) over a socket pair and reads
256 bytes back, while it goes on with other copies.

The helper is a convenience, never a dependency: a copy whose signature the helper does not
give (it died, stopped answering, or was never started) is signed in the delivery process,
as before. RSA PKCS#1 v1.5 signatures are deterministic, so either way the bytes are the
same. The keys reach the helper over the socket pair, never through a file or its command
line.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .signer import PrivateKey, UnsignedField, UnsignedFields

log = logging.getLogger("optout.delivery")

#: A request the helper has not answered in this long: it is stuck; it is ended.
ANSWER_TIMEOUT = 10.0
#: After the helper is lost, copies are signed in the delivery process this long at least.
RESTART_AFTER = 30.0
STOP_TIMEOUT = 5.0

_REQUEST = struct.Struct(">IHI")  # request id, key index, length of the data
_ANSWER = struct.Struct(">IBI")  # request id, 1 if signed (0: failed), length of the signature
_LENGTH = struct.Struct(">I")


@dataclass(slots=True)
class _Link:
    """One running helper: its process, its end of the socket pair, the requests it owes."""

    process: subprocess.Popen[bytes]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pending: dict[int, tuple[asyncio.Future[bytes], float]]
    reading: asyncio.Task[None] | None = None


class SigningHelper:
    """RSA signatures for a delivery process, made in a process of its own.

    Build with the signers' keys (`SigningHelper(keys)`); `start` runs the helper, `finish`
    gives what `UnsignedFields.finish` gives, `close` ends it. Ed25519 signatures are cheap
    and are made in the caller's process."""

    def __init__(self, keys: Iterable[PrivateKey]) -> None:
        self._keys = [key for key in keys if isinstance(key, rsa.RSAPrivateKey)]
        self._index = {id(key): index for index, key in enumerate(self._keys)}
        self._link: _Link | None = None
        self._ids = itertools.count()
        self._retry_at = 0.0
        self._starting: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[None] | None = None
        self._closed = False
        #: RSA signatures made in the caller's process, the helper being away.
        self.fallbacks = 0
        self._unreaped: list[subprocess.Popen[bytes]] = []  # ended, not yet reaped

    @property
    def useful(self) -> bool:
        return bool(self._keys)

    @property
    def pid(self) -> int | None:
        """The helper's process id while it runs."""
        return None if self._link is None else self._link.process.pid

    async def start(self) -> None:
        """Run the helper (a failure to is logged; copies are then signed here)."""
        if not self._keys or self._closed:
            return
        try:
            # In one thread, so that nothing closes the helper's end before it is forked.
            process, ours = await asyncio.to_thread(_spawn)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            self._retry_at = time.monotonic() + RESTART_AFTER
            log.warning("DKIM signing helper did not start (%s); signing in this process", exc)
            return
        if self._closed:  # closed while it started
            ours.close()
            await self._reap(process)
            return
        reader, writer = await asyncio.open_connection(sock=ours)
        writer.write(_keys_frame(self._keys))
        link = self._link = _Link(process, reader, writer, {})
        link.reading = asyncio.create_task(self._read(link), name="dkim-helper")
        if self._watching is None:
            self._watching = asyncio.create_task(self._watch(), name="dkim-helper-watch")

    async def finish(self, fields: UnsignedFields) -> bytes:
        signatures = [await self._signature(field) for field in fields.fields]
        return fields.signed_with(signatures)

    async def close(self) -> None:
        self._closed = True
        if self._starting is not None:
            await asyncio.shield(self._starting)  # a helper it starts now is ended at once
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
        if self._link is not None:
            await self._end(self._link, None)
        for process in list(self._unreaped):
            await self._reap(process)

    # ---- requests ----

    async def _signature(self, field: UnsignedField) -> bytes:
        index = self._index.get(id(field.key))
        link = self._link
        if index is None or link is None:
            if index is not None:
                self.fallbacks += 1
                self._restart_when_due()
            return field.signature()
        request_id = next(self._ids) & 0xFFFFFFFF
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        link.pending[request_id] = (future, time.monotonic())
        link.writer.write(_REQUEST.pack(request_id, index, len(field.data)) + field.data)
        try:
            return await future
        except _Lost:
            self.fallbacks += 1
            return field.signature()

    async def _read(self, link: _Link) -> None:
        reader = link.reader
        why = "it closed its end"
        try:
            while True:
                request_id, signed, length = _ANSWER.unpack(await reader.readexactly(_ANSWER.size))
                signature = await reader.readexactly(length)
                future, _ = link.pending.pop(request_id, (None, 0.0))
                if future is None or future.done():
                    continue
                if signed:
                    future.set_result(signature)
                else:
                    future.set_exception(_Lost())
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            why = f"it closed its end ({type(exc).__name__})"
        finally:
            if self._link is link:  # not ended already (a stop, a stuck helper)
                await self._end(link, why)

    async def _watch(self) -> None:
        """A helper that stops answering (stopped, swapping) is ended: copies are never
        held up for it longer than ANSWER_TIMEOUT."""
        while True:
            await asyncio.sleep(1)
            self._unreaped = [process for process in self._unreaped if process.poll() is None]
            link = self._link
            if link is None or not link.pending:
                continue
            _, sent = next(iter(link.pending.values()))
            if time.monotonic() - sent > ANSWER_TIMEOUT:
                try:
                    await self._end(link, f"no answer in {ANSWER_TIMEOUT:g} s")
                except Exception:  # this watch must outlive any one helper
                    log.exception("DKIM signing helper: ending it failed")

    def _restart_when_due(self) -> None:
        if self._closed or self._starting is not None or time.monotonic() < self._retry_at:
            return
        self._starting = asyncio.create_task(self._restart(), name="dkim-helper-start")

    async def _restart(self) -> None:
        try:
            await self.start()
            if self._link is not None:
                log.info("DKIM signing helper running again")
        finally:
            self._starting = None

    # ---- the process ----

    async def _end(self, link: _Link, why: str | None) -> None:
        """`why`: the helper failed (logged; copies are signed here a while); None: a stop."""
        if self._link is link:
            self._link = None
        if why is not None:
            self._retry_at = time.monotonic() + RESTART_AFTER
            log.warning(
                "DKIM signing helper lost (%s); signing in this process for %g s at least",
                why,
                RESTART_AFTER,
            )
        for future, _ in link.pending.values():
            if not future.done():
                future.set_exception(_Lost())
        link.pending.clear()
        link.writer.close()
        if link.reading is not None and link.reading is not asyncio.current_task():
            link.reading.cancel()
        await self._reap(link.process)

    async def _reap(self, process: subprocess.Popen[bytes]) -> None:
        """Kill and wait. Listed until reaped, so that one whose wait is cut short (a stop
        meanwhile, a process slow to die) is reaped later, by the watch or `close`."""
        if process not in self._unreaped:
            self._unreaped.append(process)
        if await asyncio.to_thread(_stop, process) and process in self._unreaped:
            self._unreaped.remove(process)


def _spawn() -> tuple[subprocess.Popen[bytes], socket.socket]:
    """The helper process and our end of its socket pair (blocking: run in a thread)."""
    ours, theirs = socket.socketpair()
    try:
        process = subprocess.Popen(  # noqa: S603 - our interpreter, our module, no input
            # -P: the working directory stays out of its imports.
            [sys.executable, "-P", "-m", "relay.dkim.helper", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=_same_code(),
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return process, ours


def _stop(process: subprocess.Popen[bytes]) -> bool:
    """Kill and reap (blocking: run in a thread); False if it is not gone in STOP_TIMEOUT
    (a process in uninterruptible sleep)."""
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        log.warning("DKIM signing helper %d did not end in %g s", process.pid, STOP_TIMEOUT)
        return False
    return True


def _same_code() -> dict[str, str]:
    """The environment, with the helper's imports resolved as its parent's are: its path
    is the parent's `sys.path`, as multiprocessing's spawn gives its children."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(entry for entry in sys.path if entry)}


class _Lost(Exception):
    """The helper did not give this signature."""


def _keys_frame(keys: list[rsa.RSAPrivateKey]) -> bytes:
    frame = [struct.pack(">H", len(keys))]
    for key in keys:
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        frame += [_LENGTH.pack(len(der)), der]
    return b"".join(frame)


# ---- the helper's side ----


def _exactly(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return data


def serve(channel: socket.socket) -> None:
    """Read the keys, then sign what is asked until the other end closes."""
    stream = channel.makefile("rb")
    keys = []
    for _ in range(struct.unpack(">H", _exactly(stream, 2))[0]):
        der = _exactly(stream, _LENGTH.unpack(_exactly(stream, _LENGTH.size))[0])
        key = serialization.load_der_private_key(der, password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        keys.append(key)
    pkcs1, sha256 = padding.PKCS1v15(), hashes.SHA256()
    while True:
        request_id, index, length = _REQUEST.unpack(_exactly(stream, _REQUEST.size))
        data = _exactly(stream, length)
        try:
            signature, signed = keys[index].sign(data, pkcs1, sha256), 1
        except Exception:  # an answer all the same: the caller then signs it itself
            signature, signed = b"", 0
        channel.sendall(_ANSWER.pack(request_id, signed, len(signature)) + signature)


def main() -> None:
    # Its life is its parent's: it ends when the socket pair closes, however the parent
    # ends. Signals sent to the whole process group (Ctrl-C in a terminal, a service
    # manager's stop) are for the parent to act on; taken here they would only make the
    # parent log a lost helper while it stops.
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    with (
        contextlib.suppress(EOFError, ConnectionError),
        socket.socket(fileno=int(sys.argv[1])) as channel,
    ):
        serve(channel)


if __name__ == "__main__":
    main()
