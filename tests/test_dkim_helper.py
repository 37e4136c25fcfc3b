"""The DKIM signing helper (relay.dkim.helper): a process of its own makes the RSA
signatures of a delivery process's copies, byte for byte those the delivery process would
make, and a helper that dies or stops answering never leaves a copy unsigned."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.dkim import DkimSigner, UnsignedFields
from relay.dkim import helper as helper_module
from relay.dkim.helper import SigningHelper
from tests.helpers import wait_for

T = TypeVar("T")


def copy(number: int) -> bytes:
    return (
        f"From: News <news@shop.example>\r\nTo: reader{number}@example.org\r\n"
        f"Subject: Spring sale {number}\r\nMessage-ID: <{number}@shop.example>\r\n\r\n"
        f"Hello reader {number}.\r\n"
    ).encode()


@pytest.fixture(scope="module")
def signers() -> list[DkimSigner]:
    return [
        DkimSigner(
            "shop.example",
            "rsa",
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
            second=("ed", ed25519.Ed25519PrivateKey.generate()),
        ),
        DkimSigner(
            "news.example", "s1", rsa.generate_private_key(public_exponent=65537, key_size=1024)
        ),
    ]


def keys(signers: list[DkimSigner]) -> list[rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey]:
    return [key for signer in signers for key in signer.private_keys]


def unsigned(signer: DkimSigner, number: int) -> UnsignedFields:
    return signer.prepare(copy(number), timestamp=1_765_000_000)


@contextlib.asynccontextmanager
async def started(signers: list[DkimSigner]) -> AsyncIterator[tuple[SigningHelper, int]]:
    """A running helper and its process id; closed at the end."""
    helper = SigningHelper(keys(signers))
    await helper.start()
    try:
        assert helper.pid is not None
        yield helper, helper.pid
    finally:
        await helper.close()


async def back_again(helper: SigningHelper, fields: UnsignedFields, ended: list[int]) -> None:
    """Wait for a new helper: a copy signed while none runs starts one."""

    async def running() -> bool:
        await helper.finish(fields)
        return helper.pid is not None and helper.pid not in ended

    await wait_for(running, what="a new helper")


async def within(work: Awaitable[T]) -> T:
    """A helper that loses a request would hang the test: fail it instead."""
    return await asyncio.wait_for(work, 20)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_the_helper_signs_what_the_signer_would(signers: list[DkimSigner]) -> None:
    async with started(signers) as (helper, pid):
        prepared = [unsigned(signer, n) for n in range(40) for signer in signers]
        made = await within(asyncio.gather(*(helper.finish(fields) for fields in prepared)))
        assert made == [fields.finish() for fields in prepared]
        assert helper.fallbacks == 0  # the helper made every RSA signature
        assert helper.pid == pid
    assert gone(pid)


async def test_without_rsa_keys_there_is_no_helper() -> None:
    helper = SigningHelper([ed25519.Ed25519PrivateKey.generate()])
    assert not helper.useful
    await helper.start()
    assert helper.pid is None


async def test_a_helper_killed_midway_leaves_no_copy_unsigned_and_comes_back(
    signers: list[DkimSigner], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(helper_module, "RESTART_AFTER", 0.0)
    async with started(signers) as (helper, first):
        prepared = [unsigned(signers[0], n) for n in range(200)]
        signing = [asyncio.ensure_future(helper.finish(fields)) for fields in prepared]
        os.kill(first, signal.SIGKILL)
        made = await within(asyncio.gather(*signing))
        assert made == [fields.finish() for fields in prepared]
        assert helper.fallbacks > 0
        assert "DKIM signing helper lost" in caplog.text
        await back_again(helper, prepared[0], [first])
        await wait_for(lambda: gone(first), what="the killed helper to be reaped")


async def test_a_helper_that_stops_answering_is_ended(
    signers: list[DkimSigner], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(helper_module, "ANSWER_TIMEOUT", 0.5)
    async with started(signers) as (helper, pid):
        os.kill(pid, signal.SIGSTOP)
        fields = unsigned(signers[1], 7)
        with caplog.at_level(logging.WARNING, logger="optout.delivery"):
            assert await within(helper.finish(fields)) == fields.finish()
        assert "no answer in 0.5 s" in caplog.text
        await wait_for(lambda: gone(pid), what="the stuck helper to be ended")


async def test_signals_sent_to_the_process_group_leave_the_helper_working(
    signers: list[DkimSigner],
) -> None:
    """A service manager's stop or a terminal's Ctrl-C reaches every process of the group;
    the helper leaves the stop to its parent and ends with its socket pair."""
    async with started(signers) as (helper, pid):
        fields = unsigned(signers[0], 1)
        await within(helper.finish(fields))  # it is past setting up its signals
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.kill(pid, number)
        assert await within(helper.finish(fields)) == fields.finish()
        assert helper.fallbacks == 0
        assert helper.pid == pid
    await wait_for(lambda: gone(pid), what="the helper to end with its socket pair")


async def test_a_helper_slow_to_die_does_not_end_the_watch(
    signers: list[DkimSigner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every helper that stops answering is ended, the one after a helper that took long to
    die too."""
    monkeypatch.setattr(helper_module, "ANSWER_TIMEOUT", 0.5)
    monkeypatch.setattr(helper_module, "RESTART_AFTER", 0.0)
    monkeypatch.setattr(helper_module, "STOP_TIMEOUT", 0.0)  # as if it took long to die
    fields = unsigned(signers[1], 3)
    stopped: list[int] = []
    async with started(signers) as (helper, _):
        try:
            for _ in range(2):
                await back_again(helper, fields, stopped)
                assert helper.pid is not None
                stopped.append(helper.pid)
                os.kill(helper.pid, signal.SIGSTOP)
                assert await within(helper.finish(fields)) == fields.finish()
        finally:
            monkeypatch.setattr(helper_module, "STOP_TIMEOUT", 5.0)  # the close reaps them
    for pid in stopped:
        assert gone(pid)


async def test_a_close_while_a_helper_starts_leaves_no_process(
    signers: list[DkimSigner], monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned: list[subprocess.Popen[bytes]] = []
    spawn = helper_module._spawn

    def slow_spawn() -> Any:
        made = spawn()
        spawned.append(made[0])
        time.sleep(0.3)  # the close comes while the start is under way
        return made

    monkeypatch.setattr(helper_module, "_spawn", slow_spawn)
    monkeypatch.setattr(helper_module, "RESTART_AFTER", 0.0)
    helper = SigningHelper(keys(signers))
    await helper.start()
    first = helper.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    fields = unsigned(signers[0], 5)
    assert await within(helper.finish(fields)) == fields.finish()  # lost: signed here
    await wait_for(lambda: len(spawned) == 1 or helper.pid is None, what="the helper lost")
    await helper.finish(fields)  # starts a new helper, slowly
    await wait_for(lambda: len(spawned) == 2, what="a second helper to be forked")
    await within(helper.close())
    assert helper.pid is None
    for process in spawned:
        assert process.poll() is not None  # ended and reaped: no stray process, no zombie
