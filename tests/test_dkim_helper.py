"""The DKIM signing helper (relay.dkim.helper): a process of its own makes the RSA
signatures of a delivery process's copies, byte for byte those the delivery process would
make, and a helper that dies or stops answering never leaves a copy unsigned."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.dkim import DkimSigner
from relay.dkim import helper as helper_module
from relay.dkim.helper import SigningHelper
from tests.helpers import wait_for


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


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_the_helper_signs_what_the_signer_would(signers: list[DkimSigner]) -> None:
    helper = SigningHelper(keys(signers))
    await helper.start()
    try:
        pid = helper.pid
        assert pid is not None
        prepared = [
            signer.prepare(copy(n), timestamp=1_765_000_000)
            for n in range(40)
            for signer in signers
        ]
        made = await asyncio.gather(*(helper.finish(fields) for fields in prepared))
        assert made == [fields.finish() for fields in prepared]
        assert helper.pid == pid  # it did them all, nothing fell back
    finally:
        await helper.close()
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
    helper = SigningHelper(keys(signers))
    await helper.start()
    try:
        first = helper.pid
        assert first is not None
        prepared = [signers[0].prepare(copy(n), timestamp=1_765_000_000) for n in range(200)]
        signing = [asyncio.ensure_future(helper.finish(fields)) for fields in prepared]
        os.kill(first, signal.SIGKILL)
        made = await asyncio.gather(*signing)
        assert made == [fields.finish() for fields in prepared]
        assert "DKIM signing helper lost" in caplog.text

        async def back() -> bool:
            await helper.finish(prepared[0])  # a copy signed while it is away starts it again
            return helper.pid not in (None, first)

        await wait_for(back, what="a new helper")
        await wait_for(lambda: gone(first), what="the killed helper to be reaped")
    finally:
        await helper.close()


async def test_a_helper_that_stops_answering_is_ended(
    signers: list[DkimSigner], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(helper_module, "ANSWER_TIMEOUT", 0.5)
    helper = SigningHelper(keys(signers))
    await helper.start()
    pid = helper.pid
    assert pid is not None
    try:
        os.kill(pid, signal.SIGSTOP)
        fields = signers[1].prepare(copy(7), timestamp=1_765_000_000)
        with caplog.at_level(logging.WARNING, logger="optout.delivery"):
            assert await asyncio.wait_for(helper.finish(fields), 10) == fields.finish()
        assert "no answer in 0.5 s" in caplog.text
        await wait_for(lambda: gone(pid), what="the stuck helper to be ended")
    finally:
        await helper.close()
