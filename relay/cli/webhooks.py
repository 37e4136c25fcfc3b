"""`optout-relay webhooks ...`: the webhook outbox as an operator sees it, like `queue`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import click

from tracking.webhooks import (
    DELIVERED,
    FAILED,
    PENDING,
    EndpointHealth,
    OutboxRow,
    describe_health,
    iso_time,
)

from ..stores import Stores
from .common import PROG, config_option, settings_from, with_stores


def _describe(row: OutboxRow) -> list[str]:
    when = {
        PENDING: f"next try {iso_time(row.next_attempt_at)}",
        DELIVERED: f"delivered {iso_time(row.delivered_at or row.last_attempt_at or 0)}",
        FAILED: "given up",
    }[row.state]
    lines = [f"{row.webhook_id}  {row.state:<9}  {row.type:<19}  {row.at}  {row.url}"]
    detail = f"    tries {row.attempts}, {when}"
    if row.last_status:
        detail += f", last: {row.last_status}"
    lines.append(detail)
    return lines


@click.group()
def webhooks() -> None:
    """Inspect, retry and test the signed webhooks of [[webhooks]]."""


@webhooks.command("list")
@config_option
@click.option("--all", "show_all", is_flag=True, help="Delivered webhooks too (kept 7 days).")
def webhooks_list(config_path: Path | None, show_all: bool) -> None:
    """Webhooks waiting or given up, oldest first, and each endpoint's health."""
    states = (PENDING, FAILED, DELIVERED) if show_all else (PENDING, FAILED)

    async def read(stores: Stores) -> tuple[list[OutboxRow], list[EndpointHealth]]:
        return await stores.webhooks.rows(states), await stores.webhooks.health()

    rows, health = with_stores(settings_from(config_path), read)
    now = time.time()
    for endpoint in health:
        click.echo(f"endpoint {endpoint.url}: {describe_health(endpoint, now)}")
    if not rows:
        click.echo("No webhooks waiting" if not show_all else "No webhooks")
        return
    for row in rows:
        click.echo("\n".join(_describe(row)))
    waiting = sum(row.state == PENDING for row in rows)
    failed = sum(row.state == FAILED for row in rows)
    click.echo(f"-- {waiting} waiting, {failed} given up")


@webhooks.command("retry")
@config_option
@click.argument("webhook_id", required=False)
def webhooks_retry(config_path: Path | None, webhook_id: str | None) -> int:
    """Make WEBHOOK_ID (or every waiting or given-up webhook) due now; the running relay
    sends it within a second, with the same webhook-id."""
    settings = settings_from(config_path)
    give_up_after = settings.webhook_delivery.give_up_after
    changed = with_stores(
        settings, lambda stores: stores.webhooks.retry(webhook_id, time.time(), give_up_after)
    )
    click.echo(f"{changed} webhooks due now")
    return 0 if changed or webhook_id is None else 1


@webhooks.command("test")
@config_option
@click.argument("url", required=False)
def webhooks_test(config_path: Path | None, url: str | None) -> int:
    """POST a signed `webhook.test` to every endpoint (or the one at URL) now, and say what
    each answered. Exits 1 unless every one answered 2xx."""
    from tracking.webhooks.dispatch import send_test

    settings = settings_from(config_path)
    endpoints = [e for e in settings.webhooks if url is None or e.url == url]
    if not endpoints:
        where = f" with url {url}" if url else ""
        click.echo(f"{PROG}: error: no [[webhooks]] endpoint configured{where}", err=True)
        return 2

    async def run() -> bool:
        attempts = await asyncio.gather(
            *(send_test(endpoint, settings.webhook_delivery) for endpoint in endpoints)
        )
        for endpoint, attempt in zip(endpoints, attempts, strict=True):
            click.echo(f"{endpoint.url}: {'ok' if attempt.ok else 'FAILED'} ({attempt.status})")
        return all(attempt.ok for attempt in attempts)

    return 0 if asyncio.run(run()) else 1
