from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from relay.app import Relay
from relay.settings import (
    DeliverySettings,
    Downstream,
    HttpSettings,
    Listen,
    Settings,
    SigningSettings,
    SmtpSettings,
    StorageSettings,
)
from tests.helpers import CaptureServer

SIGNING_KEYS = ("test-signing-key-newest-0123456789", "test-signing-key-older-0123456789")


@pytest.fixture
async def downstream() -> AsyncIterator[CaptureServer]:
    server = await CaptureServer.start()
    yield server
    await server.stop()


def relay_settings(data_dir: Path, downstream_port: int | None) -> Settings:
    """Settings for a relay on free loopback ports, quick to retry."""
    return Settings(
        storage=StorageSettings(dir=data_dir),
        smtp=SmtpSettings(listen=Listen("127.0.0.1", 0), hostname="relay.test"),
        http=HttpSettings(listen=Listen("127.0.0.1", 0), public_url="https://mail.shop.example"),
        delivery=DeliverySettings(
            downstream=None
            if downstream_port is None
            else Downstream("127.0.0.1", downstream_port),
            retry_initial_delay=0.2,
            retry_max_delay=1.0,
            timeout=10.0,
        ),
        signing=SigningSettings(secret_keys=SIGNING_KEYS),
    )


@pytest.fixture
def settings(tmp_path: Path, downstream: CaptureServer) -> Settings:
    return relay_settings(tmp_path / "data", downstream.port)


@pytest.fixture
async def relay(settings: Settings) -> AsyncIterator[Relay]:
    running = await Relay.start(settings)
    yield running
    await running.stop()


def with_smtp(settings: Settings, **changes: object) -> Settings:
    return replace(settings, smtp=replace(settings.smtp, **changes))


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config file that keeps the data under tmp_path, everything else by default."""
    path = tmp_path / "relay.toml"
    path.write_text(f'[storage]\ndir = "{tmp_path / "data"}"\n')
    return path
