"""A campaign sent as one message per recipient repeats one body: its rewrite is kept.

Rewriting a body (walking its MIME tree, tokenizing its HTML, compiling each changed part)
is most of the work of preparing a message, and a campaign submitted one recipient per
message brings the same body again and again, under headers that differ (To, Message-ID,
Date). The pieces built for a body are kept by what decides them: the body's bytes (by
SHA-256), the message's own Content-* and MIME-Version fields, its line break, the
decorations and the limits on work. Rendering never changes a piece, so every message with
that key shares them.

Only a rewrite confined to the body is kept (a single-part message whose own Content-
Transfer-Encoding field changes is built each time), and only a rewrite that went through
(a failure is worked out again, with its notes).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

from ..mime import HeaderField, MimeLimits
from ._parts import Hole, Piece

# Enough for the campaigns in flight at once; a body past MAX_BODY is not worth holding.
ENTRIES = 16
MAX_BODY = 512 * 1024

BodyKey = tuple[bytes, tuple[bytes, ...], bytes, object, MimeLimits]


@dataclass(frozen=True, slots=True)
class BuiltBody:
    pieces: tuple[Piece, ...]
    holes: frozenset[Hole]
    links: tuple[str, ...]
    notes: tuple[str, ...]


class BodyCache:
    """The last few bodies rewritten, least recently used first out. Thread-safe: a big
    message is prepared on a worker thread."""

    def __init__(self, entries: int = ENTRIES, max_body: int = MAX_BODY) -> None:
        self._entries = entries
        self._max_body = max_body
        self._built: OrderedDict[BodyKey, BuiltBody] = OrderedDict()
        self._lock = threading.Lock()

    def key(
        self,
        raw: bytes,
        head_end: int,
        fields: list[HeaderField],
        nl: bytes,
        decorations: object,
        limits: MimeLimits,
    ) -> BodyKey | None:
        """What decides the rewrite of raw[head_end:]; None for a body not kept."""
        size = len(raw) - head_end
        if size <= 0 or size > self._max_body:
            return None
        structure = tuple(
            f.raw for f in fields if f.lname.startswith("content-") or f.lname == "mime-version"
        )
        digest = hashlib.sha256(memoryview(raw)[head_end:]).digest()
        return (digest, structure, nl, decorations, limits)

    def get(self, key: BodyKey) -> BuiltBody | None:
        with self._lock:
            built = self._built.get(key)
            if built is not None:
                self._built.move_to_end(key)
            return built

    def put(self, key: BodyKey, built: BuiltBody) -> None:
        with self._lock:
            self._built[key] = built
            self._built.move_to_end(key)
            while len(self._built) > self._entries:
                self._built.popitem(last=False)
