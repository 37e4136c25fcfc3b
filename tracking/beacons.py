"""What an open or click request brought, and the rules that turn it into an event (token
check, verdict, detail): in the app's process or in the event process (`event_process.py`),
which therefore needs none of the HTTP app's imports."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from multidict import istr

from .aggregate import AggregateHit, Counting, day_of, repeat_digest
from .errors import BadToken
from .events import Event, EventType
from .metrics import Tally
from .network import (
    IPAddress,
    Ranges,
    client_address,
    forwarded_for,
    limiter_key,
    networks,
    truncated,
)
from .ratelimit import RateLimit, RateLimiter
from .tokens import AggregateReading, Reading, TrackingUrls
from .verdict import Judge, Verdict

if TYPE_CHECKING:
    from aiohttp import web

MAX_STORED_AGENT = 256
# Fetches of one copy's pixel (or of one of its links) within this long of the first are one
# event with a count: a replayed URL adds no rows.
DEFAULT_REPEAT_WINDOW = timedelta(hours=1)
# Opens and clicks recorded per client address (an IPv6 /64), beyond which a fetch is still
# answered (the image, the redirect) but not recorded. Generous: many readers may share one
# address (an office's NAT); known image proxies and scanners are not limited at all.
DEFAULT_FETCH_LIMIT = RateLimit(per_minute=600.0, burst=300)
# Header names as multidict keys made once: a lookup by a plain str folds its case each time.
_USER_AGENT = istr("User-Agent")
_SEC_PURPOSE = istr("Sec-Purpose")
_PURPOSE = istr("Purpose")
_X_PURPOSE = istr("X-Purpose")
_X_MOZ = istr("X-Moz")

# A `Fetch` as the pixel hands it over: a plain tuple of its fields in order. Made without a
# Python-level constructor call per request, and pickled by C code on its way to the event
# process; `resolve_fetch` names the fields when it takes it up, off the request's path.
RawFetch = tuple[str, str | None, str | None, str | None, str | None, bool, float]


@dataclass(frozen=True, slots=True)
class Beacons:
    """What turns a beacon request into an event: the token check, the verdict's rules and
    what of the client may be stored."""

    urls: TrackingUrls
    judge: Judge
    trusted_proxies: Ranges
    store_ip: bool
    store_user_agent: bool
    repeat_window: timedelta = DEFAULT_REPEAT_WINDOW
    limiter: RateLimiter | None = None  # None: every fetch recorded
    # A recipient's opens of a campaign are one event with the day of the last one.
    keep_last_open_only: bool = False
    # How fetches are sorted when written: aggregate counts, the event log (made per process).
    counting: Counting = field(init=False, compare=False)

    def __post_init__(self) -> None:
        counting = Counting(self.repeat_window, self.keep_last_open_only)
        object.__setattr__(self, "counting", counting)

    def admits(self, address: IPAddress | None) -> bool:
        """Whether a fetch from `address` may be recorded: within its rate limit, or from a
        known proxy or scanner network (which fetches for many people at once)."""
        limiter = self.limiter
        if limiter is None:
            return True
        if address is not None and self.judge.network_reason(address) is not None:
            return True
        return limiter.take(limiter_key(address)) == 0.0


@dataclass(frozen=True, slots=True)
class BeaconSpec:
    """`Beacons` as plain values, so that it can cross to the event process (pickled), where
    `build` makes the same rules as in the app."""

    urls: TrackingUrls = field(repr=False)  # pickles as its public URL and signing keys
    trusted_proxies: tuple[str, ...]
    store_ip: bool
    store_user_agent: bool
    machine_seconds: float
    machine_agents: tuple[tuple[str, str], ...] = ()
    machine_networks: tuple[tuple[str, tuple[str, ...]], ...] = ()
    repeat_window: timedelta = DEFAULT_REPEAT_WINDOW
    fetch_limit: RateLimit | None = DEFAULT_FETCH_LIMIT
    keep_last_open_only: bool = False

    @classmethod
    def of(
        cls,
        urls: TrackingUrls,
        *,
        trusted_proxies: Sequence[str],
        store_ip: bool,
        store_user_agent: bool,
        machine_seconds: float,
        machine_agents: Mapping[str, str] | None,
        machine_networks: Mapping[str, Sequence[str]] | None,
        repeat_window: timedelta = DEFAULT_REPEAT_WINDOW,
        fetch_limit: RateLimit | None = DEFAULT_FETCH_LIMIT,
        keep_last_open_only: bool = False,
    ) -> BeaconSpec:
        return cls(
            urls,
            tuple(trusted_proxies),
            store_ip,
            store_user_agent,
            machine_seconds,
            tuple((machine_agents or {}).items()),
            tuple((label, tuple(nets)) for label, nets in (machine_networks or {}).items()),
            repeat_window,
            fetch_limit,
            keep_last_open_only,
        )

    def build(self) -> Beacons:
        judge = Judge(
            fast_seconds=self.machine_seconds,
            agents=dict(self.machine_agents),
            networks=dict(self.machine_networks),
        )
        return Beacons(
            self.urls,
            judge,
            networks(self.trusted_proxies),
            self.store_ip,
            self.store_user_agent,
            self.repeat_window,
            None if self.fetch_limit is None else RateLimiter(self.fetch_limit),
            self.keep_last_open_only,
        )


class Fetch(NamedTuple):
    """What a beacon request brought: all the handler keeps before it answers (a few
    strings and the time, not the request). For the pixel, the token is checked and the
    verdict given later, in the recorder's batch (`resolve_fetch`), maybe in another process:
    so `at` is the app's clock at the request, and everything here can be pickled."""

    token: str
    user_agent: str | None
    forwarded_for: str | None
    purpose: str | None  # a prefetch says so in Sec-Purpose or one of its older names
    remote: str | None
    head: bool
    at: float

    @classmethod
    def of(cls, request: web.Request, token: str, at: float) -> Fetch:
        return cls._make(raw_fetch(request, token, at))


def raw_fetch(request: web.Request, token: str, at: float) -> RawFetch:
    """What a beacon request brought, as a plain tuple (`RawFetch`): its cheapest form."""
    headers = request.headers
    return (
        token,
        headers.get(_USER_AGENT),
        forwarded_for(headers),
        headers.get(_SEC_PURPOSE)
        or headers.get(_PURPOSE)
        or headers.get(_X_PURPOSE)
        or headers.get(_X_MOZ),
        request.remote,
        request.method == "HEAD",
        at,
    )


def resolve_fetch(
    beacons: Beacons, tally: Tally, raw: Fetch | RawFetch
) -> Event | AggregateHit | None:
    """The open event of a pixel fetch (an aggregate hit for an aggregate pixel), or None
    for a token that is not genuine or a client past its rate limit (its pixel was
    answered all the same)."""
    fetch = raw if isinstance(raw, Fetch) else Fetch._make(raw)
    address = client_of_fetch(beacons, fetch)
    if not beacons.admits(address):
        tally.limited("pixel")
        return None
    try:
        reading = beacons.urls.check_beacon(fetch.token)
    except BadToken:
        tally.bad_token("pixel")
        return None
    verdict = judge(beacons, reading, fetch, address)
    tally.open(verdict.machine, verdict.reason)
    if isinstance(reading, AggregateReading):
        return aggregate_hit(EventType.OPEN, reading, verdict, fetch, address)
    return beacon_event(beacons, EventType.OPEN, reading, verdict, fetch, address)


def aggregate_hit(
    kind: EventType,
    reading: AggregateReading,
    verdict: Verdict,
    fetch: Fetch,
    address: IPAddress | None,
    url: str = "",
) -> AggregateHit:
    """The count of an aggregate pixel or link. A repeat is this URL fetched again by the
    same client (its network and agent) with the same verdict (tracking.aggregate)."""
    repeat = repeat_digest(
        kind, fetch.token, url, limiter_key(address), fetch.user_agent, verdict.reason
    )
    ref = reading.ref
    return AggregateHit(str(kind), ref.campaign, ref.domain, verdict.machine, fetch.at, repeat)


def client_of_fetch(beacons: Beacons, fetch: Fetch) -> IPAddress | None:
    return client_address(fetch.remote, fetch.forwarded_for, beacons.trusted_proxies)


def judge(
    beacons: Beacons,
    reading: Reading | AggregateReading,
    fetch: Fetch,
    address: IPAddress | None,
) -> Verdict:
    """The verdict, as of the request, given on the client's address."""
    return beacons.judge.judge(
        fetch.user_agent,
        address,
        fetch.at - reading.signed_at,
        head=fetch.head,
        prefetch=fetch.purpose is not None and "prefetch" in fetch.purpose.lower(),
    )


def beacon_event(
    beacons: Beacons,
    kind: EventType,
    reading: Reading,
    verdict: Verdict,
    fetch: Fetch,
    address: IPAddress | None,
    **extra: Any,
) -> Event:
    """The event, with the verdict's reason; an address or agent only if configured."""
    detail: dict[str, Any] = {"reason": verdict.reason, **extra}
    if beacons.store_ip and address is not None:
        detail["ip"] = truncated(address)
    if beacons.store_user_agent and fetch.user_agent:
        detail["user_agent"] = fetch.user_agent[:MAX_STORED_AGENT]
    ref = reading.ref
    at = event_time(fetch.at)
    if kind is EventType.OPEN and beacons.keep_last_open_only:
        # Only the day is kept, and one event per recipient and campaign and day.
        at = day_of(at)
        key = repeat_key(kind, ref.address_hash, ref.campaign, verdict.machine)
    else:
        key = repeat_key(kind, ref.address_hash, ref.queue_id, verdict.reason, *extra.values())
    return Event(
        kind,
        ref.address_hash,
        ref.campaign,
        ref.queue_id,
        verdict.machine,
        detail,
        at,
        repeat_key=key,
    )


def repeat_key(*parts: object) -> str:
    """What makes two fetches the same event: the kind, the copy (recipient and message),
    the verdict's reason (a scanner's fetch never hides a person's, nor one proxy's another's;
    there are a few dozen reasons, so a copy still has a bounded number of rows per window)
    and, for a click, the link."""
    text = "\x1f".join("" if part is None else str(part) for part in parts)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


class _EventClock:
    """A time in the events' format (`suppression.utc_now`), at a fraction of its cost: the
    date and time of a second are formatted once, not per open."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, moment: float) -> str:
        second = int(moment)
        if second != self._second:
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._text}.{int((moment - second) * 1000):03d}Z"


event_time = _EventClock()
