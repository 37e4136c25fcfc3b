"""Messages between the processes of one relay: a 4-byte length, then a pickle.

Only the relay's own processes hold either end of these sockets (socket pairs made at
spawn), so a pickle read from one is the relay's own: nothing from the network is ever
unpickled.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Iterator
from typing import Any

LENGTH = struct.Struct(">I")


def frame(message: object) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return LENGTH.pack(len(data)) + data


class Frames:
    """The messages in a byte stream, as its chunks arrive."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[Any]:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= LENGTH.size:
            end = LENGTH.size + LENGTH.unpack_from(buffer)[0]
            if len(buffer) < end:
                return
            message = pickle.loads(buffer[LENGTH.size : end])  # noqa: S301 - see the module's doc
            del buffer[:end]
            yield message
