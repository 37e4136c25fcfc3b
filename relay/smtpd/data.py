"""Reading the DATA of a message: whole chunks into one buffer, not one object per line.

aiosmtpd reads DATA a line at a time and keeps every line as its own bytearray before it
joins them: several times the message's size in memory, and one trip through the event
loop per line. This reader asks the stream for everything up to the next `.<CRLF>` (the
end marker of RFC 5321 §4.1.1.4 is `<CRLF>.<CRLF>`), appends it to one bytearray, and does
the checks aiosmtpd does on the whole buffer at the end: the size limit, the line length
limit of RFC 5321 §4.5.3.1.6, and dot-unstuffing (§4.5.2). The verdicts and replies are
aiosmtpd's; only the cost differs.

A message bigger than a threshold is spilled to a file as it arrives, as Postfix does, so a
session holds a bounded amount of memory whatever the message's size: past the threshold
the same checks are made chunk by chunk (with what they need of the previous chunk carried
over), and the unstuffed message goes to a file of the spool's `incoming/` directory,
written in a thread in large batches.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ..spool import Spilled, SpillFile

log = logging.getLogger("optout.smtp")

# aiosmtpd's limit: a line of more than 1001 octets with its CRLF is refused.
MAX_LINE = 1001
_END = b"\r\n.\r\n"
_MARK = b".\r\n"
# A line (after the LF that ends the previous one) running past the limit.
_LONG_LINE = re.compile(rb"\n[^\n]{%d}" % MAX_LINE)
_STUFFED = b"\r\n."

# Messages up to this size are read into memory; bigger ones are spilled to a file. Above
# the benchmarks' 20 KB and 100 KB messages, so that common mail never touches a file, and
# small enough that a hundred sessions reading at once hold little (Postfix's queue files
# take any message; we keep the common ones in memory, where they cost nothing extra).
SPILL_THRESHOLD = 128 * 1024
# What a spilled message keeps in memory: its first octets, where the headers are.
HEAD = 32 * 1024
# The most read from the stream at a time when no end marker is in sight.
MAX_CHUNK = 32 * 1024
# Spilled octets are written once this many are waiting: large writes, few thread hops.
WRITE_BATCH = 64 * 1024


class DataProblem(enum.Enum):
    TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
    TOO_MUCH = "552 Error: Too much mail data"
    # Our contract's reply when a message cannot be persisted (the spill file here).
    CANNOT_STORE = "451 4.3.0 Requested action aborted: cannot store the message, try again later"


@dataclass(frozen=True, slots=True)
class DataResult:
    content: bytes  # the message; when spilled, only its first HEAD octets
    problem: DataProblem | None
    spilled: Spilled | None = None

    @property
    def message(self) -> bytes | Spilled:
        """The whole message, as Spool.accept takes it."""
        return self.content if self.spilled is None else self.spilled


async def discard(file: SpillFile) -> None:
    """Remove a spill file in a thread. The removal runs to its end even if the caller is
    cancelled meanwhile (aiosmtpd cancels a session twice when its client goes away)."""
    loop = asyncio.get_running_loop()
    await asyncio.shield(loop.run_in_executor(None, file.discard))


async def _next_chunk(reader: asyncio.StreamReader, most: int | None = None) -> bytes:
    """The stream up to the next `.<CRLF>`, or as much of it as surely precedes one (at
    most `most` octets, if given)."""
    try:
        return await reader.readuntil(_MARK)
    except asyncio.LimitOverrunError as overrun:
        # No marker within the stream's buffer limit: take what surely precedes it.
        return await reader.readexactly(
            overrun.consumed if most is None else min(overrun.consumed, most)
        )


async def read_data(
    reader: asyncio.StreamReader,
    size_limit: int | None,
    *,
    spill_to: Path | None = None,
    threshold: int = SPILL_THRESHOLD,
    prefix: bytes = b"",
) -> DataResult:
    """The message up to the end marker, unstuffed; or the problem, once all was read.
    A `size_limit` of None or 0 means no limit, as in aiosmtpd. `prefix` (CRLF-ended
    header lines of the relay's own) goes before the message; the client's limits do not
    count it.

    Past `size_limit` the data is read to the end and dropped, so the reply comes in turn
    (RFC 5321 §4.2.5) and memory stays bounded. Past `threshold` octets the message goes
    on into a file in `spill_to` (if given), which the caller must `discard` when done with
    the result; on any problem or exception the file is already gone. Raises
    IncompleteReadError if the client goes away before the end marker.
    """
    # The CRLF that ended the DATA command: an empty message is just `.<CRLF>`. After the
    # prefix's own CRLF a dot that begins the message is still seen as stuffed.
    buffer = bytearray(b"\r\n" + prefix)
    received = 0  # the client's octets, the end marker's included
    while True:
        chunk = await _next_chunk(reader)
        received += len(chunk)
        if size_limit and received - len(_MARK) > size_limit:
            # Too much, whatever follows: keep only what can still end the message.
            buffer = (buffer[-len(_END) :] + chunk)[-len(_END) :]
        else:
            buffer += chunk
            if spill_to is not None and len(buffer) > threshold and not buffer.endswith(_END):
                spiller = _Spiller(spill_to, size_limit, received, buffer)
                del buffer, chunk  # the spiller's now: this frame must not keep them alive
                return await spiller.read(reader)
        if buffer.endswith(_END):
            break
    if size_limit and received - len(_MARK) > size_limit:
        return DataResult(b"", DataProblem.TOO_MUCH)
    del buffer[-len(_MARK) :]
    if _LONG_LINE.search(buffer):
        return DataResult(b"", DataProblem.TOO_LONG)
    if b"\r\n." in buffer:
        buffer = buffer.replace(b"\r\n.", b"\r\n")
    del buffer[:2]
    return DataResult(bytes(buffer), None)


class _Spiller:
    """The rest of a message read into a file, with the checks `read_data` makes on its
    whole buffer made chunk by chunk, to the same verdicts:

    - the line limit: the octets since the last LF are carried from chunk to chunk;
    - dot-unstuffing: a `<CRLF>.` across two chunks is seen from the previous chunk's last
      two octets (the pattern cannot overlap itself, so the matches within each chunk and
      across the boundaries are exactly those of the whole);
    - the size limit: the same count of the client's octets.
    """

    def __init__(
        self, directory: Path, size_limit: int | None, received: int, start: bytearray
    ) -> None:
        self.start: bytearray | None = start  # what read_data read so far, CRLF first
        self.file = SpillFile(directory)
        self.size_limit = size_limit
        self.received = received
        self.tail = b""  # the stream's last octets, to see the end marker
        self.line = 0  # octets since the last LF: the line being read
        self.head = bytearray()
        self.pending: list[bytes | bytearray] = []
        self.pending_size = 0
        self.too_much = False
        self.too_long = False
        self.keeping = True  # False once the message will be refused or cannot be stored
        self.cannot_store = False

    async def read(self, reader: asyncio.StreamReader) -> DataResult:
        try:
            result = await self._read(reader)
        except BaseException:
            await discard(self.file)
            raise
        if result.spilled is None:
            await discard(self.file)
        return result

    async def _read(self, reader: asyncio.StreamReader) -> DataResult:
        buffer, self.start = self.start, None
        assert buffer is not None
        self.tail = bytes(buffer[-len(_END) :])
        if _LONG_LINE.search(buffer):
            self.too_long = True
            self.keeping = False
        else:
            self.line = len(buffer) - buffer.rfind(b"\n") - 1
            if _STUFFED in buffer:
                buffer = buffer.replace(_STUFFED, b"\r\n")
            del buffer[:2]  # the CRLF of the DATA command, which is not the message's
            await self._keep(buffer)
        del buffer
        while True:
            previous = self.tail
            # Small chunks: what is made of each (copies, batches) stays small too.
            chunk = await _next_chunk(reader, MAX_CHUNK)
            self.received += len(chunk)
            self.tail = (
                chunk[-len(_END) :] if len(chunk) >= len(_END) else (previous + chunk)[-len(_END) :]
            )
            ended = self.tail == _END
            if (
                not self.too_much
                and self.size_limit
                and self.received - len(_MARK) > self.size_limit
            ):
                self.too_much = True
                await self._drop()
            if not (self.too_much or self.too_long):
                if self._long_line(chunk):
                    self.too_long = True
                    await self._drop()
                elif self.keeping:
                    await self._keep(self._unstuffed(previous, chunk, ended))
            if ended:
                break
        if self.too_much:
            return DataResult(b"", DataProblem.TOO_MUCH)
        if self.too_long:
            return DataResult(b"", DataProblem.TOO_LONG)
        await self._flush()
        if self.cannot_store:
            return DataResult(b"", DataProblem.CANNOT_STORE)
        head = bytes(self.head)
        return DataResult(head, None, Spilled(head, self.file, self.file.size))

    def _long_line(self, chunk: bytes) -> bool:
        """Whether a line runs past the limit, with this chunk (as `_LONG_LINE` would)."""
        first = chunk.find(b"\n")
        if first < 0:
            self.line += len(chunk)
            return self.line >= MAX_LINE
        if self.line + first >= MAX_LINE or _LONG_LINE.search(chunk, first):
            return True
        self.line = len(chunk) - chunk.rfind(b"\n") - 1
        return False

    @staticmethod
    def _unstuffed(previous: bytes, chunk: bytes, ended: bool) -> bytes:
        """`chunk` with its stuffed dots removed; `previous`: the stream's octets before it."""
        if ended:
            chunk = chunk[: -len(_MARK)]  # the end marker's `.<CRLF>`; its CRLF stays
        # A `<CRLF>.` begun in the previous chunk.
        if chunk[:1] == b"." and previous.endswith(b"\r\n"):
            chunk = chunk[1:]
        elif chunk[:2] == b"\n." and previous.endswith(b"\r"):
            chunk = chunk[:1] + chunk[2:]
        if _STUFFED in chunk:
            chunk = chunk.replace(_STUFFED, b"\r\n")
        return chunk

    async def _keep(self, data: bytes | bytearray) -> None:
        if not self.keeping or not data:
            return
        if len(self.head) < HEAD:
            self.head += data[: HEAD - len(self.head)]
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size >= WRITE_BATCH:
            await self._flush()

    async def _flush(self) -> None:
        """Write what is waiting, in a thread (the first write creates the file)."""
        if not self.keeping:
            return
        pending, self.pending, self.pending_size = self.pending, [], 0
        try:
            await asyncio.to_thread(self.file.write, pending)
        except OSError as exc:
            # Read on to the end all the same: the reply comes in turn (RFC 5321 §4.2.5).
            log.error("cannot write a message to %s: %s", self.file.path.parent, exc)
            self.cannot_store = True
            await self._drop()

    async def _drop(self) -> None:
        """The message will be refused: nothing more is kept, and the file goes now."""
        self.pending, self.pending_size = [], 0
        self.keeping = False
        await discard(self.file)
