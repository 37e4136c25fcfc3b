"""Reading the DATA of a message: whole chunks into one buffer, not one object per line.

aiosmtpd reads DATA a line at a time and keeps every line as its own bytearray before it
joins them: several times the message's size in memory, and one trip through the event
loop per line. This reader asks the stream for everything up to the next `.<CRLF>` (the
end marker of RFC 5321 §4.1.1.4 is `<CRLF>.<CRLF>`), appends it to one bytearray, and does
the checks aiosmtpd does on the whole buffer at the end: the size limit, the line length
limit of RFC 5321 §4.5.3.1.6, and dot-unstuffing (§4.5.2). The verdicts and replies are
aiosmtpd's; only the cost differs.
"""

from __future__ import annotations

import asyncio
import enum
import re
from dataclasses import dataclass

# aiosmtpd's limit: a line of more than 1001 octets with its CRLF is refused.
MAX_LINE = 1001
_END = b"\r\n.\r\n"
_MARK = b".\r\n"
# A line (after the LF that ends the previous one) running past the limit.
_LONG_LINE = re.compile(rb"\n[^\n]{%d}" % MAX_LINE)


class DataProblem(enum.Enum):
    TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
    TOO_MUCH = "552 Error: Too much mail data"


@dataclass(frozen=True, slots=True)
class DataResult:
    content: bytes
    problem: DataProblem | None


async def read_data(reader: asyncio.StreamReader, size_limit: int | None) -> DataResult:
    """The message up to the end marker, unstuffed; or the problem, once all was read.
    A `size_limit` of None or 0 means no limit, as in aiosmtpd.

    Past `size_limit` the data is read to the end and dropped, so the reply comes in turn
    (RFC 5321 §4.2.5) and memory stays bounded. Raises IncompleteReadError if the client
    goes away before the end marker.
    """
    # The CRLF that ended the DATA command: an empty message is just `.<CRLF>`.
    buffer = bytearray(b"\r\n")
    received = 0  # the client's octets, the end marker's included
    while True:
        try:
            chunk = await reader.readuntil(_MARK)
        except asyncio.LimitOverrunError as overrun:
            # No marker within the stream's buffer limit: take what surely precedes it.
            chunk = await reader.readexactly(overrun.consumed)
        received += len(chunk)
        if size_limit and received - len(_MARK) > size_limit:
            # Too much, whatever follows: keep only what can still end the message.
            buffer = (buffer[-len(_END) :] + chunk)[-len(_END) :]
        else:
            buffer += chunk
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
