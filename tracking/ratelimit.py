"""Per-client token buckets for the routes that change state, in memory.

In memory is enough: the limit protects the database from floods, not a quota that must
survive a restart. The table is bounded, so a flood of distinct addresses cannot grow it
without end.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

MAX_CLIENTS = 100_000  # buckets kept; past that, the refilled and then the oldest go


@dataclass(frozen=True, slots=True)
class RateLimit:
    """`burst` requests at once, refilled at `per_minute`."""

    per_minute: float = 60.0
    burst: int = 20

    def __post_init__(self) -> None:
        if self.per_minute <= 0 or self.burst < 1:
            raise ValueError("a rate limit needs per_minute > 0 and burst >= 1")


class RateLimiter:
    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self._rate = limit.per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str) -> float:
        """0 when the request may go ahead; else the seconds until it may (Retry-After)."""
        now = time.monotonic()
        tokens, at = self._buckets.pop(key, (float(self.limit.burst), now))
        tokens = min(float(self.limit.burst), tokens + (now - at) * self._rate)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) / self._rate
        if len(self._buckets) >= MAX_CLIENTS:
            self._evict(now)
        self._buckets[key] = (tokens, now)  # re-inserted: the dict's order is recency
        return wait

    @staticmethod
    def retry_after(wait: float) -> str:
        return str(max(1, math.ceil(wait)))

    def _evict(self, now: float) -> None:
        """Forget clients whose bucket has refilled (they lose nothing), else the oldest half."""
        full = [
            key
            for key, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self._rate >= self.limit.burst
        ]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= MAX_CLIENTS:
            for key in list(self._buckets)[: len(self._buckets) // 2]:
                del self._buckets[key]
