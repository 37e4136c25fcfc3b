"""Client addresses: who really asked (behind trusted proxies), truncated for storage, matched
against address ranges quickly."""

from __future__ import annotations

import bisect
import functools
import ipaddress
from collections.abc import Iterable, Mapping, Sequence

from multidict import MultiMapping, istr

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
LOOPBACK = ("127.0.0.0/8", "::1/128")
FORWARDED_FOR = istr("X-Forwarded-For")


@functools.lru_cache(maxsize=8192)
def parse_ip(text: str | None) -> IPAddress | None:
    """An address from a peer or X-Forwarded-For entry; None if it is none. Cached: the same
    proxies and clients come back, and parsing is the costly part of a pixel request."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "192.0.2.1:443"
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class Ranges:
    """Sorted, merged address ranges with a label each; a lookup is one bisection."""

    def __init__(self, labelled: Mapping[str, Iterable[str]]) -> None:
        spans: dict[int, list[tuple[int, int, str]]] = {4: [], 6: []}
        for label, networks in labelled.items():
            for text in networks:
                net = ipaddress.ip_network(text, strict=False)
                spans[net.version].append(
                    (int(net.network_address), int(net.broadcast_address), label)
                )
        self._spans = {version: sorted(items) for version, items in spans.items()}
        self._starts = {version: [s[0] for s in items] for version, items in self._spans.items()}
        # The furthest end among ranges 0..i: where to stop walking back over nested ranges.
        self._reach: dict[int, list[int]] = {}
        for version, items in self._spans.items():
            reach, furthest = [], -1
            for _, end, _ in items:
                furthest = max(furthest, end)
                reach.append(furthest)
            self._reach[version] = reach

    def label(self, address: IPAddress | None) -> str | None:
        if address is None:
            return None
        version = address.version
        value = int(address)
        spans, reach = self._spans[version], self._reach[version]
        index = bisect.bisect_right(self._starts[version], value) - 1
        while index >= 0 and reach[index] >= value:
            _, end, label = spans[index]
            if end >= value:
                return label
            index -= 1
        return None

    def __contains__(self, address: IPAddress | None) -> bool:
        return self.label(address) is not None


def networks(texts: Sequence[str], label: str = "listed") -> Ranges:
    return Ranges({label: texts})


def forwarded_for(headers: MultiMapping[str]) -> str | None:
    """Every X-Forwarded-For line of a request, joined in order as one list of hops. A proxy
    may add a line of its own instead of extending the client's, so reading only the first
    line would let the client name itself."""
    lines = headers.getall(FORWARDED_FOR, None)
    if lines is None:
        return None
    return lines[0] if len(lines) == 1 else ",".join(lines)


def client_address(
    peer: str | None, forwarded_for: str | None, trusted: Ranges
) -> IPAddress | None:
    """The client's address: the peer's, unless the peer is a trusted proxy; then the rightmost
    hop in X-Forwarded-For (all its lines, `forwarded_for`) that is not itself a trusted proxy
    (anything to its left is whatever the client chose to send, so it is never believed).

    A hop that is no address (garbage, "unknown", an empty entry) ends the walk with None: the
    client is then unknown, and untrusted. It is never taken to be the proxy that passed the
    request on, which would open the operator's routes (/metrics) to anyone behind it.
    """
    address = parse_ip(peer)
    if address is None or forwarded_for is None or address not in trusted:
        return address
    for hop in reversed(forwarded_for.split(",")):
        candidate = parse_ip(hop)
        if candidate is None or candidate not in trusted:
            return candidate
        address = candidate
    return address


def truncated(address: IPAddress) -> str:
    """What is stored when IPs may be kept at all: the /24 (IPv4) or /48 (IPv6) network."""
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def limiter_key(address: IPAddress | None) -> str:
    """One client for rate limiting: an IPv4 address, or an IPv6 /64 (one host's share)."""
    if address is None:
        return "unknown"
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)
