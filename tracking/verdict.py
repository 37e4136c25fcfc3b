"""Telling machine fetches (mail-privacy proxies, link scanners) from people.

Every open and click gets a verdict with a reason, so a marketer can count people, and can
still decide differently about one kind of machine (a Gmail proxy fetch, say, usually means
the message was shown to someone).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .machines import AGENT_MARKERS, APPLE_MPP_AGENT, BOT_WORD, NETWORKS
from .network import IPAddress, Ranges

# Mail is not read within seconds of delivery by people; scanners and prefetchers are that fast.
DEFAULT_FAST_SECONDS = 10.0
_AGENT_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Verdict:
    machine: bool
    reason: str


HUMAN = Verdict(False, "human")


class Judge:
    """Decides one request's verdict from its user agent, address, method and timing."""

    def __init__(
        self,
        *,
        fast_seconds: float = DEFAULT_FAST_SECONDS,
        agents: Mapping[str, str] | None = None,
        networks: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.fast_seconds = fast_seconds
        markers = {**AGENT_MARKERS, **{k.lower(): v for k, v in (agents or {}).items()}}
        # One alternation, longest first, so the most specific marker names the reason.
        alternatives = sorted(markers, key=len, reverse=True)
        self._agent_pattern = re.compile(
            "|".join([*(f"({re.escape(m)})" for m in alternatives), f"({BOT_WORD})"])
        )
        self._groups = [*(markers[m] for m in alternatives), "bot"]
        merged: dict[str, list[str]] = {k: list(v) for k, v in NETWORKS.items()}
        for label, extra in (networks or {}).items():
            merged.setdefault(label, []).extend(extra)
        self._ranges = Ranges(merged)
        self._agent_cache: dict[str, str | None] = {}

    def judge(
        self,
        user_agent: str | None,
        address: IPAddress | None,
        seconds_since_delivery: float,
        *,
        head: bool = False,
        prefetch: bool = False,
    ) -> Verdict:
        if head:
            return Verdict(True, "head-request")  # no browser or mail client shows a HEAD
        if prefetch:
            return Verdict(True, "prefetch")
        if not user_agent:
            return Verdict(True, "no-user-agent")
        reason = self.agent_reason(user_agent)
        if reason is None:
            reason = self._ranges.label(address)
        if reason is not None:
            return Verdict(True, reason)
        if seconds_since_delivery < self.fast_seconds:
            return Verdict(True, "too-fast")
        return HUMAN

    def network_reason(self, address: IPAddress | None) -> str | None:
        """The label of the proxy or scanner network `address` is in, or None."""
        return self._ranges.label(address)

    def agent_reason(self, user_agent: str) -> str | None:
        """Why this user agent is a machine's, or None. Agents repeat: answers are cached."""
        try:
            return self._agent_cache[user_agent]
        except KeyError:
            pass
        agent = user_agent.strip().lower()
        reason: str | None = None
        if agent == APPLE_MPP_AGENT:
            reason = "apple-mpp"
        else:
            found = self._agent_pattern.search(agent)
            if found is not None and found.lastindex is not None:
                reason = self._groups[found.lastindex - 1]
        if len(self._agent_cache) >= _AGENT_CACHE_SIZE:
            self._agent_cache.clear()
        self._agent_cache[user_agent] = reason
        return reason


_DEFAULT = Judge()


def is_machine(user_agent: str | None) -> bool:
    """True when the user agent alone says a proxy or scanner, not a person's client."""
    return not user_agent or _DEFAULT.agent_reason(user_agent) is not None
