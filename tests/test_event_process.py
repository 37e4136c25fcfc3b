"""Opens and clicks resolved and written by the event process: real HTTP (aiohttp test
client), a real child process, real SQLite. One spawn per test (a restart is the second)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from relay.app import tracking_app
from relay.config import parse_settings
from relay.errors import ConfigError
from relay.settings import Settings, SigningSettings, StorageSettings
from relay.stores import STORE_FILE, Stores
from suppression import EngineSpec
from tracking import PIXEL_GIF, RecipientRef, Signer, TrackingUrls, create_app
from tracking.beacons import BeaconSpec
from tracking.errors import EventProcessError
from tracking.event_process import EventProcess, EventProcessSpec
from tracking.metrics import Metrics
from tracking.recorder import EventRecorder
from tracking.state import TRACKING

KEYS = ("event-process-key-0123456789abcdef",)
PUBLIC = "https://mail.shop.example"
ADDRESS = "dana@example.org"
HUMAN_AGENT = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Thunderbird/128.0"
PROXY_AGENT = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
)
AN_HOUR_LATER: Callable[[], float] = lambda: time.time() + 3600  # noqa: E731

Client = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(storage=StorageSettings(tmp_path), signing=SigningSettings(KEYS))


@pytest.fixture
async def stores(settings: Settings) -> AsyncIterator[Stores]:
    async with Stores(settings) as opened:
        await opened.suppressions.remember([ADDRESS])
        yield opened


@pytest.fixture
def urls() -> TrackingUrls:
    return TrackingUrls(PUBLIC, Signer(KEYS))


@pytest.fixture
def make_client(aiohttp_client: Any, stores: Stores, urls: TrackingUrls) -> Client:
    async def make(**options: Any) -> TestClient[Any, Any]:
        app = create_app(stores.suppressions, stores.events, urls, event_process=True, **options)
        client: TestClient[Any, Any] = await aiohttp_client(app)
        return client

    return make


def pixel(stores: Stores, urls: TrackingUrls, queue_id: str = "Q1") -> str:
    ref = RecipientRef(stores.suppressions.hasher.hash(ADDRESS), "global", "spring", queue_id)
    return urls.pixel_url(ref).removeprefix(PUBLIC)


def unsubscribe_token_as_pixel(stores: Stores, urls: TrackingUrls) -> str:
    ref = RecipientRef(stores.suppressions.hasher.hash(ADDRESS), "global", "spring", "Q1")
    return urls.unsubscribe_url(ref).removeprefix(PUBLIC).replace("/u/", "/o/") + ".gif"


def recorder(client: TestClient[Any, Any]) -> EventProcess:
    found = client.app[TRACKING].recorder
    assert isinstance(found, EventProcess)
    return found


def open_rows(tmp_path: Path) -> list[tuple[Any, ...]]:
    """The opens committed, as another connection to the file sees them."""
    with sqlite3.connect(tmp_path / STORE_FILE) as db:
        return db.execute(
            "SELECT queue_id, machine, detail FROM events WHERE type = 'open' ORDER BY id"
        ).fetchall()


async def health_becomes(client: TestClient[Any, Any], status: int, seconds: float = 15) -> None:
    """Poll /healthz until it answers `status`."""
    deadline = time.monotonic() + seconds
    while (await client.get("/healthz")).status != status:
        assert time.monotonic() < deadline, f"/healthz never answered {status}"
        await asyncio.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_opens_are_judged_and_written_by_the_child_and_counted_in_metrics(
    make_client: Client, stores: Stores, urls: TrackingUrls, tmp_path: Path
) -> None:
    client = await make_client(clock=AN_HOUR_LATER)
    assert recorder(client).pid not in (None, os.getpid())
    for url, agent in [
        (pixel(stores, urls), HUMAN_AGENT),
        (pixel(stores, urls), PROXY_AGENT),
        ("/o/forged.gif", HUMAN_AGENT),
        (unsubscribe_token_as_pixel(stores, urls), HUMAN_AGENT),  # genuine, another kind
    ]:
        response = await client.get(url, headers={"User-Agent": agent})
        assert response.status == 200 and await response.read() == PIXEL_GIF
    await recorder(client).flush()
    assert open_rows(tmp_path) == [
        ("Q1", 0, '{"reason":"human"}'),
        ("Q1", 1, '{"reason":"google-image-proxy"}'),
    ]
    [first, _] = [e async for e in stores.events.export()]
    assert (first["recipient"], first["campaign"]) == (ADDRESS, "spring")
    text = await (await client.get("/metrics")).text()
    for line in [
        'optout_opens_total{machine="false",reason="human"} 1.0',
        'optout_opens_total{machine="true",reason="google-image-proxy"} 1.0',
        'optout_bad_tokens_total{route="pixel"} 2.0',
        "optout_events_written_total 2.0",
        "optout_events_buffered 0.0",
    ]:
        assert line in text, line
    assert (await client.get("/healthz")).status == 200


async def test_the_verdict_is_given_as_of_the_request(
    make_client: Client, stores: Stores, urls: TrackingUrls, tmp_path: Path
) -> None:
    """The app's clock says the pixel was fetched seconds after the copy was made: a
    machine, however late the child gets to it."""
    client = await make_client(clock=time.time)
    await client.get(pixel(stores, urls), headers={"User-Agent": HUMAN_AGENT})
    await recorder(client).flush()
    assert open_rows(tmp_path) == [("Q1", 1, '{"reason":"too-fast"}')]


async def test_durable_mode_answers_only_once_the_row_exists(
    make_client: Client, stores: Stores, urls: TrackingUrls, tmp_path: Path
) -> None:
    client = await make_client(durable_events=True, clock=AN_HOUR_LATER)
    for number in range(3):
        await client.get(pixel(stores, urls, f"Q{number}"), headers={"User-Agent": HUMAN_AGENT})
        assert [row[0] for row in open_rows(tmp_path)] == [f"Q{n}" for n in range(number + 1)]


async def test_a_killed_child_is_restarted_and_gets_the_unacknowledged_opens(
    make_client: Client, stores: Stores, urls: TrackingUrls, tmp_path: Path
) -> None:
    client = await make_client(clock=AN_HOUR_LATER)
    first = recorder(client).pid
    assert first is not None
    with contextlib.closing(sqlite3.connect(tmp_path / STORE_FILE, isolation_level=None)) as lock:
        lock.execute("BEGIN IMMEDIATE")  # the child's commit waits: nothing gets acknowledged
        for number in range(20):
            await client.get(pixel(stores, urls, f"Q{number}"), headers={"User-Agent": HUMAN_AGENT})
        os.kill(first, signal.SIGKILL)
        await health_becomes(client, 503)  # down, and /healthz says so
        lock.execute("ROLLBACK")
    await health_becomes(client, 200)
    assert recorder(client).pid not in (None, first)
    await recorder(client).flush()
    assert sorted(row[0] for row in open_rows(tmp_path)) == sorted(f"Q{n}" for n in range(20))
    assert "optout_events_dropped_total 0.0" in await (await client.get("/metrics")).text()


async def test_a_clean_stop_writes_every_answered_open(
    make_client: Client, stores: Stores, urls: TrackingUrls, tmp_path: Path
) -> None:
    client = await make_client(clock=AN_HOUR_LATER)
    child = recorder(client).pid
    assert child is not None
    answers = await asyncio.gather(*(client.get(pixel(stores, urls, f"Q{n}")) for n in range(200)))
    assert {response.status for response in answers} == {200}
    await client.close()  # the app's cleanup: everything written, then the child leaves
    assert len(open_rows(tmp_path)) == 200
    assert not alive(child)


async def test_healthz_fails_while_the_child_cannot_write(
    make_client: Client, stores: Stores, urls: TrackingUrls, tmp_path: Path
) -> None:
    client = await make_client(clock=AN_HOUR_LATER)
    with sqlite3.connect(tmp_path / STORE_FILE) as db:  # the table goes away under the child
        db.execute("ALTER TABLE events RENAME TO events_away")
    response = await client.get(pixel(stores, urls))
    assert response.status == 200 and await response.read() == PIXEL_GIF
    await recorder(client).flush()
    assert (await client.get("/healthz")).status == 503
    metrics = await (await client.get("/metrics")).text()
    assert 'optout_errors_total{where="event-write"} 1.0' in metrics
    assert "optout_events_dropped_total 1.0" in metrics
    with sqlite3.connect(tmp_path / STORE_FILE) as db:
        db.execute("ALTER TABLE events_away RENAME TO events")
    await client.get(pixel(stores, urls, "Q2"))
    await recorder(client).flush()
    assert (await client.get("/healthz")).status == 200
    assert [row[0] for row in open_rows(tmp_path)] == ["Q2"]


async def test_clicks_are_written_by_the_child(
    make_client: Client, stores: Stores, urls: TrackingUrls, tmp_path: Path
) -> None:
    client = await make_client(clock=AN_HOUR_LATER)
    ref = RecipientRef(stores.suppressions.hasher.hash(ADDRESS), "global", "spring", "Q1")
    url = urls.click_url(ref, "https://shop.example/sale").removeprefix(PUBLIC)
    response = await client.get(url, headers={"User-Agent": HUMAN_AGENT}, allow_redirects=False)
    assert response.headers["Location"] == "https://shop.example/sale"
    await recorder(client).flush()
    [click] = [e async for e in stores.events.export()]
    assert (click["type"], click["machine"], click["detail"]["url"]) == (
        "click",
        False,
        "https://shop.example/sale",
    )


async def test_a_child_that_cannot_open_the_database_is_a_clear_error(
    urls: TrackingUrls, tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("")
    spec = EventProcessSpec(EngineSpec(tmp_path / "a-file" / STORE_FILE), beacon_spec(urls))
    recorder = EventProcess(spec, Metrics())
    with pytest.raises(EventProcessError, match="cannot open"):
        await recorder.start()
    assert not recorder.healthy


def beacon_spec(urls: TrackingUrls) -> BeaconSpec:
    return BeaconSpec.of(
        urls,
        trusted_proxies=(),
        store_ip=False,
        store_user_agent=False,
        machine_seconds=10,
        machine_agents=None,
        machine_networks=None,
    )


# --- configuration (no process started) ----------------------------------------------------


def write_pid(path: Path) -> None:
    """A logging set-up as the relay passes one (picklable); this one leaves a trace."""
    path.write_text(str(os.getpid()))


async def test_the_child_sets_up_its_logs_as_the_app_is_told(
    make_client: Client, tmp_path: Path
) -> None:
    marker = tmp_path / "logging-set-up"
    client = await make_client(event_process_logging=functools.partial(write_pid, marker))
    recorder = client.app[TRACKING].recorder
    assert isinstance(recorder, EventProcess)
    assert marker.read_text() == str(recorder.pid)


def test_the_spec_never_shows_the_signing_keys(urls: TrackingUrls, tmp_path: Path) -> None:
    spec = EventProcessSpec(EngineSpec(tmp_path / STORE_FILE), beacon_spec(urls))
    assert KEYS[0] not in repr(spec) and KEYS[0] not in str(spec)


def test_http_event_process_is_on_by_default_and_can_be_turned_off() -> None:
    assert parse_settings({}).http.event_process is True
    assert parse_settings({"http": {"event_process": False}}).http.event_process is False
    with pytest.raises(ConfigError, match=r"http\.event_process"):
        parse_settings({"http": {"event_process": "yes"}})


async def test_the_relay_wires_the_setting_to_the_app(settings: Settings, stores: Stores) -> None:
    urls = TrackingUrls(PUBLIC, Signer(KEYS))
    on = tracking_app(settings, stores, urls)
    off = tracking_app(
        replace(settings, http=replace(settings.http, event_process=False)), stores, urls
    )
    assert isinstance(on[TRACKING].recorder, EventProcess)
    assert isinstance(off[TRACKING].recorder, EventRecorder)
