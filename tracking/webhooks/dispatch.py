"""POSTing the outbox: signed, bounded, retried with back-off, never followed elsewhere.

One task on the relay's event loop, with at most `concurrency` POSTs in flight and each
bounded by `timeout`: an endpoint that hangs or is down costs a few idle sockets and
nothing else; mail and the pixel never wait for it. A webhook is tried until a 2xx, or
until it has been retried for `give_up_after`; a try cut short by a crash is made again
after the restart (at least once, the same webhook-id every time).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp

from suppression import format_time

from .endpoints import TEST_TYPE, WebhookDelivery, WebhookEndpoint
from .outbox import FAILED, Attempt, OutboxRow, WebhookOutbox, iso_time

log = logging.getLogger("optout.webhooks")

POLL_EVERY = 0.5  # other processes' triggers add webhooks: looked for this often
SWEEP_EVERY = 3600.0
KEEP_DELIVERED = 7 * 24 * 3600.0
KEEP_FAILED = 30 * 24 * 3600.0
FAILING_TOO_LONG = 3600.0  # then logged, and shown on /healthz and the dashboard
USER_AGENT = "optout-relay-webhooks"


def client_session(delivery: WebhookDelivery) -> aiohttp.ClientSession:
    """No proxies from the environment, no cookies kept between POSTs."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=delivery.timeout),
        connector=aiohttp.TCPConnector(limit=delivery.concurrency),
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": USER_AGENT},
    )


async def post(
    session: aiohttp.ClientSession,
    endpoint: WebhookEndpoint,
    webhook_id: str,
    body: bytes,
    clock: Callable[[], float] = time.time,
) -> Attempt:
    """One signed POST; never raises for what the network or the endpoint does."""
    now = clock()
    headers = endpoint.headers(webhook_id, int(now), body)
    try:
        async with session.post(
            endpoint.url, data=body, headers=headers, allow_redirects=False
        ) as response:
            status = response.status
    except TimeoutError:
        return Attempt(False, "timeout", now)
    except aiohttp.ClientConnectorError as exc:
        return Attempt(False, f"cannot connect: {exc.os_error.strerror or exc}", now)
    except aiohttp.ClientError as exc:
        return Attempt(False, f"{type(exc).__name__}: {exc}", now)
    if 200 <= status < 300:
        return Attempt(True, f"HTTP {status}", now)
    if 300 <= status < 400:
        return Attempt(False, f"HTTP {status} (redirect not followed)", now)
    return Attempt(False, f"HTTP {status}", now)


async def send_test(
    endpoint: WebhookEndpoint, delivery: WebhookDelivery, clock: Callable[[], float] = time.time
) -> Attempt:
    """A signed `webhook.test` POST, now, outside the outbox (`optout-relay webhooks test`)."""
    now = clock()
    webhook_id = f"msg_test_{secrets.token_hex(12)}"
    document = {
        "type": TEST_TYPE,
        "timestamp": format_time(datetime.fromtimestamp(now, UTC)),
        "data": {"message": "a test from optout-relay"},
    }
    body = json.dumps(document, separators=(",", ":")).encode()
    async with client_session(delivery) as session:
        return await post(session, endpoint, webhook_id, body, clock)


@dataclass(slots=True)
class _Health:
    failing_since: float | None = None
    last_status: str | None = None
    warned: bool = False


class Dispatcher:
    """Runs until cancelled (`run`); `health_lines` for /healthz."""

    def __init__(
        self,
        outbox: WebhookOutbox,
        endpoints: Sequence[WebhookEndpoint],
        delivery: WebhookDelivery,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._outbox = outbox
        self._endpoints = {endpoint.url: endpoint for endpoint in endpoints}
        self._delivery = delivery
        self._clock = clock
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        self._health = {url: _Health() for url in self._endpoints}
        self._next_sweep = 0.0

    async def run(self) -> None:
        await self._load_health()
        async with client_session(self._delivery) as session:
            try:
                while True:
                    try:
                        await self._round(session)
                    except Exception:  # a bug here must not end webhooks until a restart
                        log.exception("webhook dispatch failed; going on")
                        await asyncio.sleep(POLL_EVERY)
            finally:
                for task in self._in_flight.values():
                    task.cancel()
                await asyncio.gather(*self._in_flight.values(), return_exceptions=True)

    async def _round(self, session: aiohttp.ClientSession) -> None:
        if not await self._outbox.leading():
            # Another node drains the shared outbox (what is in flight here still ends).
            if self._in_flight:
                await asyncio.wait(self._in_flight.values(), timeout=POLL_EVERY)
            else:
                await asyncio.sleep(POLL_EVERY)
            return
        now = self._clock()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_EVERY
            try:
                await self._outbox.sweep(now, KEEP_DELIVERED, KEEP_FAILED)
            except Exception:
                log.exception("webhook outbox sweep failed")
        free = self._delivery.concurrency - len(self._in_flight)
        if free > 0:
            try:
                rows = await self._outbox.due(
                    now, free, list(self._endpoints), skip=list(self._in_flight)
                )
            except Exception:
                log.exception("cannot read the webhook outbox")
                rows = []
            for row in rows:
                self._in_flight[row.id] = asyncio.create_task(
                    self._attempt(session, row), name=f"webhook-{row.webhook_id}"
                )
        if self._in_flight:
            await asyncio.wait(
                self._in_flight.values(), timeout=POLL_EVERY, return_when=asyncio.FIRST_COMPLETED
            )
        else:
            await asyncio.sleep(POLL_EVERY)

    async def _attempt(self, session: aiohttp.ClientSession, row: OutboxRow) -> None:
        try:
            endpoint = self._endpoints[row.url]
            attempt = await post(session, endpoint, row.webhook_id, row.body(), self._clock)
            retry_at = None
            if not attempt.ok:
                wait = self._delivery.delay(row.attempts + 1)
                if attempt.at + wait < row.expires_at:
                    retry_at = attempt.at + wait
            state = await self._outbox.record(row, attempt, retry_at)
            self._note(endpoint, row, attempt, state)
        except Exception:
            log.exception("webhook %s: recording the attempt failed", row.webhook_id)
        finally:
            self._in_flight.pop(row.id, None)

    def _note(
        self, endpoint: WebhookEndpoint, row: OutboxRow, attempt: Attempt, state: str
    ) -> None:
        health = self._health[endpoint.url]
        if attempt.ok:
            if health.failing_since is not None:
                log.info("webhook endpoint %s answers again", endpoint.label)
            self._health[endpoint.url] = _Health()
            return
        if health.failing_since is None:
            health.failing_since = attempt.at
        health.last_status = attempt.status
        fields = {
            "webhook_id": row.webhook_id,
            "endpoint": endpoint.label,
            "attempt": row.attempts + 1,
            "status": attempt.status,
        }
        if state == FAILED:
            log.error(
                "webhook %s (%s) to %s failed for good after %d tries: %s",
                row.webhook_id,
                row.type,
                endpoint.label,
                row.attempts + 1,
                attempt.status,
                extra={"fields": fields},
            )
        else:
            log.info(
                "webhook %s (%s) to %s: %s; will retry",
                row.webhook_id,
                row.type,
                endpoint.label,
                attempt.status,
                extra={"fields": fields},
            )
        if not health.warned and attempt.at - health.failing_since >= FAILING_TOO_LONG:
            health.warned = True
            log.warning(
                "webhook endpoint %s has been failing since %s: %s",
                endpoint.label,
                iso_time(health.failing_since),
                attempt.status,
            )

    async def _load_health(self) -> None:
        with contextlib.suppress(Exception):
            for saved in await self._outbox.health():
                if saved.url in self._health and saved.failing_since is not None:
                    self._health[saved.url] = _Health(saved.failing_since, saved.last_status)

    def failing(self, now: float | None = None) -> list[tuple[WebhookEndpoint, float, str | None]]:
        """Endpoints failing for an hour or more: (endpoint, since, last status)."""
        moment = self._clock() if now is None else now
        return [
            (self._endpoints[url], health.failing_since, health.last_status)
            for url, health in self._health.items()
            if health.failing_since is not None
            and moment - health.failing_since >= FAILING_TOO_LONG
        ]

    def health_lines(self) -> list[str]:
        """For /healthz: one line per endpoint failing for an hour or more."""
        return [
            f"webhook {endpoint.label} failing since {iso_time(since)}"
            for endpoint, since, _status in self.failing()
        ]


__all__ = ["Dispatcher", "client_session", "post", "send_test"]
