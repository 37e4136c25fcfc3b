"""Telling machine fetches (mail-privacy proxies, link scanners) from people."""

from __future__ import annotations

# Substrings of User-Agent headers sent by image proxies and security scanners, not people.
_MACHINE_AGENTS = (
    "googleimageproxy",
    "yahoomailproxy",
    "ggpht.com",
    "barracuda",
    "mimecast",
    "proofpoint",
    "symantec",
    "forcepoint",
    "bot",
    "crawler",
    "spider",
    "python-",
    "curl/",
    "wget/",
)


def is_machine(user_agent: str | None) -> bool:
    """True when the request came from a proxy or scanner rather than a person's client."""
    if not user_agent:
        return True
    agent = user_agent.lower()
    return any(marker in agent for marker in _MACHINE_AGENTS)
