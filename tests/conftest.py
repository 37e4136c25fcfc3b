"""Fixtures only; the helpers they use live in tests/helpers.py."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest

from relay.app import Relay
from relay.settings import Settings
from suppression import Database, Migration
from suppression.engine import Engine
from tests.helpers import (
    CaptureServer,
    StartDownstream,
    StartRelay,
    free_port,
    relay_settings,
)
from tests.opendkim import OpenDkim
from tests.postgres import OpenEngine, PostgresServer, running_postgres
from tests.postgres import unavailable_reason as postgres_unavailable


@pytest.fixture
async def start_downstream() -> AsyncIterator[StartDownstream]:
    """Start capture SMTP servers (as `CaptureServer.start`); all stop at teardown."""
    started: list[CaptureServer] = []

    async def start(
        *,
        port: int = 0,
        tls: ssl.SSLContext | None = None,
        eight_bit: bool = True,
        pipelining: bool = True,
    ) -> CaptureServer:
        server = await CaptureServer.start(port, tls, eight_bit, pipelining)
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        await server.stop()


@pytest.fixture
async def downstream(start_downstream: StartDownstream) -> CaptureServer:
    return await start_downstream()


@pytest.fixture
def settings(tmp_path: Path, downstream: CaptureServer) -> Settings:
    return relay_settings(tmp_path / "data", downstream.port)


@pytest.fixture
async def start_relay(start_downstream: StartDownstream) -> AsyncIterator[StartRelay]:
    """Start relays with the given settings; every one still running stops at teardown,
    before the downstream servers (a test may stop one itself, `Relay.stop` is idempotent)."""
    started: list[Relay] = []

    async def start(settings: Settings) -> Relay:
        relay = await Relay.start(settings)
        started.append(relay)
        return relay

    yield start
    for relay in reversed(started):
        await relay.stop()


@pytest.fixture
async def relay(settings: Settings, start_relay: StartRelay) -> Relay:
    return await start_relay(settings)


@pytest.fixture
def closed_port() -> int:
    """A loopback port with nothing listening: a downstream MTA that is down."""
    return free_port()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config file that keeps the data under tmp_path, everything else by default."""
    path = tmp_path / "relay.toml"
    path.write_text(f'[storage]\ndir = "{tmp_path / "data"}"\n')
    return path


@pytest.fixture(scope="module")
def opendkim() -> OpenDkim:
    """OpenDKIM's verifier in private namespaces, or a skip saying what is missing."""
    tool = shutil.which("opendkim-testmsg") or shutil.which(
        "opendkim-testmsg", path="/usr/sbin:/usr/bin"
    )
    if tool is None:
        pytest.skip("OpenDKIM's verifier is absent: apt-get install opendkim-tools")
    if not Path("/etc/resolv.conf").exists():
        pytest.skip("no /etc/resolv.conf to point at the test DNS server")
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is needed to give OpenDKIM a private test DNS")
    probe = subprocess.run(
        [unshare, "--net", "--mount", "true"], capture_output=True, check=False, timeout=30
    )
    if probe.returncode != 0:
        pytest.skip(
            "cannot create a private network and mount namespace (needs root or user "
            "namespaces) for the test DNS server OpenDKIM queries: "
            + probe.stderr.decode(errors="replace").strip()
        )
    return OpenDkim(tool, unshare)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One private PostgreSQL server for the whole session (initdb once), or a skip."""
    reason = postgres_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on the session's server."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
async def open_engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenEngine]:
    """Open the store database with these migrations, on each engine in turn: SQLite in
    tmp_path, or a fresh PostgreSQL database. Closed at teardown."""
    opened: list[Engine] = []
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None

    async def open_(migrations: Sequence[Migration]) -> Engine:
        engine: Engine
        if url is None:
            engine = await Database.open(tmp_path / "optout.db", migrations)
        else:
            from suppression.postgres import PostgresDatabase

            engine = await PostgresDatabase.open(url, migrations)
        opened.append(engine)
        return engine

    yield open_
    for engine in opened:
        await engine.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_database(request: pytest.FixtureRequest) -> str | None:
    """`storage.database` for tests that run on each engine: None (SQLite in the data
    dir), then a fresh PostgreSQL database's URL."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return None
