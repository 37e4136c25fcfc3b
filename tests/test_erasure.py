"""Erasure where the address hides: other recipients' waiting mail, non-ASCII spellings,
Message-IDs; and the operator's side of it (the question asked, the report)."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.spool import Spool
from relay.stores import SPOOL_FILE
from suppression import (
    MIGRATIONS,
    AddressHasher,
    SuppressionStore,
    caseless,
    erase_subject,
)
from suppression.holders import spool_holder
from tests.helpers import (
    ROOT,
    CaptureServer,
    StartRelay,
    asubmit,
    cli,
    newsletter,
    parse,
    relay_settings,
    spool_depth,
    wait_for,
)
from tests.postgres import OpenEngine
from tracking.events import MIGRATIONS as EVENT_MIGRATIONS
from tracking.events import Event, EventStore, EventType

KEY = b"erasure-test-key-0123456789abcdef"
ZOE = "Zoë.Victim@Bücher.Example"
ZOE_SPELLINGS = ["zoë.victim@bücher.example", "zoë.victim@xn--bcher-kva.example"]
ZOE_ASCII = "Zoe.Victim@example.org"
OLGA = "olga.other@example.org"


def files_mentioning(directory: Path, needles: list[str]) -> list[str]:
    """Files under `directory` holding a needle in any case, in any script."""
    found = []
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            text = caseless(path.read_bytes().decode("utf-8", "surrogateescape"))
            if any(caseless(needle) in text for needle in needles):
                found.append(path.name)
    return found


@pytest.fixture
async def stores(
    tmp_path: Path, open_engine: OpenEngine
) -> AsyncIterator[tuple[SuppressionStore, EventStore, Spool]]:
    """The shared stores on each engine (`open_engine`), the spool on SQLite as always."""
    db = await open_engine(MIGRATIONS + EVENT_MIGRATIONS)
    spool = await Spool.open(tmp_path / SPOOL_FILE)
    try:
        yield SuppressionStore(db, AddressHasher(KEY)), EventStore(db), spool
    finally:
        await spool.close()


async def test_non_ascii_spellings_in_the_spool_are_erased(
    stores: tuple[SuppressionStore, EventStore, Spool], tmp_path: Path
) -> None:
    store, _events, spool = stores
    # Spelt as senders do: upper-case non-ASCII letters (SQLite's lower() folds ASCII only),
    # the domain in IDNA form, the local part decomposed (NFD).
    for spelling in ("ZOË.VICTIM@BÜCHER.EXAMPLE", "zoe\u0308.victim@xn--bcher-kva.example"):
        await spool.accept("news@shop.example", [spelling], b"To: x@y\r\n\r\nHi\r\n", "c")
    await spool.accept("news@shop.example", [OLGA], b"To: olga@x\r\n\r\nHi\r\n", "c")
    assert len(await spool.for_recipient(lambda a: caseless(a).startswith("zo"))) == 2

    report = await erase_subject(
        store, ZOE, [spool_holder(spool, tmp_path / SPOOL_FILE)], actor="dpo"
    )
    assert report.effects["spool"]["waiting deliveries cancelled"] == 2
    assert await spool_depth(tmp_path) == (1, 1)
    assert files_mentioning(tmp_path, ZOE_SPELLINGS) == []


async def test_a_message_id_naming_the_person_goes_with_their_events(
    stores: tuple[SuppressionStore, EventStore, Spool],
) -> None:
    store, events, _spool = stores
    zoe, olga = store.hasher.hash(ZOE), store.hasher.hash(OLGA)
    await events.record(
        Event(
            EventType.DELIVERED,
            zoe,
            "spring",
            "Q1",
            message_id="<20260401.ZOË.Victim@bücher.example>",
        ),
        Event(EventType.DELIVERED, olga, "spring", "Q2", message_id="<20260401.olga@shop.example>"),
        Event(EventType.OPEN, zoe, "spring", "Q1", machine=False),
    )
    report = await erase_subject(store, ZOE, [events.holder()], actor="dpo")
    assert report.effects == {"events": {"anonymised": 2}}
    exported = [(e["queue_id"], e["message_id"], e["recipient"]) async for e in events.export()]
    assert exported == [
        ("Q1", None, None),
        ("Q2", "<20260401.olga@shop.example>", None),  # olga was never remembered as a contact
        ("Q1", None, None),
    ]


async def test_waiting_mail_to_others_loses_the_erased_address_and_the_report_says_what_happened(
    tmp_path: Path, start_relay: StartRelay, downstream: CaptureServer
) -> None:
    settings = relay_settings(tmp_path / "data", downstream.port)
    relay = await start_relay(settings)
    # Olga's mailbox is busy: her copy waits in the spool after Zoë's has gone out.
    downstream.handler.rcpt_replies[OLGA] = "451 4.2.0 Mailbox busy"
    message = newsletter([OLGA])
    del message["To"]
    message["To"] = f'"Zoë Victim" <{ZOE_ASCII}>, Olga <{OLGA}>'
    message["Cc"] = "friends: zoe.victim@EXAMPLE.org;"
    await asubmit(relay.addresses.smtp[1], message, "news@shop.example", [ZOE_ASCII, OLGA])
    await wait_for(lambda: len(downstream.handler.messages) == 1, what="zoë's copy")

    async def olga_deferred() -> bool:
        return "deferred" in [e["type"] async for e in relay.stores.events.export()]

    await wait_for(olga_deferred, what="olga's deferral")
    await relay.stop()
    [before] = await _spooled(tmp_path / "data")
    assert b"Victim" in before

    config = tmp_path / "relay.toml"
    config.write_text(f'[storage]\ndir = "{tmp_path / "data"}"\n')
    erased = cli(config, "subject", "erase", "--yes", "--actor", "dpo", ZOE_ASCII.upper())
    assert erased.returncode == 0, erased.stderr
    lines = erased.stdout.splitlines()
    assert lines[1:] == [
        "  suppressions: 1 kept, by key only, address deleted (global suppression by key"
        " added: mail to it stays refused)",
        "  contact: deleted",
        "  events: 1 anonymised",
        "  tracking: 2 withdrawn",  # an old copy's pixel names nobody now
        "  webhooks: 0 anonymised",
        "  spool: 0 waiting deliveries cancelled, 1 waiting messages with the address taken"
        " out of To/Cc",
        "  outbox: 0 files deleted",
        "  (anonymised events keep their campaign counts, without the address)",
    ]
    [after] = await _spooled(tmp_path / "data")
    # Only the two recipient fields changed; every other byte, the body included, stays.
    before_head, _, before_body = before.partition(b"\r\n\r\n")
    after_head, _, after_body = after.partition(b"\r\n\r\n")
    assert after_body == before_body
    before_fields, after_fields = fields(before_head), fields(after_head)
    assert [f for f in after_fields if not f.startswith((b"To:", b"Cc:"))] == [
        f for f in before_fields if not f.startswith((b"To:", b"Cc:"))
    ]
    assert [f for f in after_fields if f.startswith((b"To:", b"Cc:"))] == [
        f"To: Olga <{OLGA}>".encode(),
        b"Cc: friends:;",
    ]
    assert files_mentioning(tmp_path / "data", ["zoe.victim@example.org", "Victim"]) == []

    # The relay starts again and Olga's mailbox takes mail: her copy leaves without Zoë.
    downstream.handler.rcpt_replies.clear()
    relay = await start_relay(settings)
    await wait_for(lambda: len(downstream.handler.messages) == 2, what="olga's copy")
    copy = parse(downstream.handler.messages[1].content)
    assert (copy["To"], copy["Cc"]) == (f"Olga <{OLGA}>", "friends:;")
    assert "victim" not in downstream.handler.messages[1].content.decode().lower()


def fields(head: bytes) -> list[bytes]:
    """A header section's fields in order, each with its folding."""
    return re.split(rb"\r\n(?![ \t])", head)


async def _spooled(data: Path) -> list[bytes]:
    spool = await Spool.open(data / SPOOL_FILE)
    try:
        return [await spool.content(entry.queue_id) or b"" for entry in await spool.entries()]
    finally:
        await spool.close()


def read_until(fd: int, marker: bytes, seconds: float = 30) -> bytes:
    """What a terminal shows up to `marker` (which must come within `seconds`)."""
    seen = b""
    deadline = time.monotonic() + seconds
    while marker not in seen:
        assert time.monotonic() < deadline, f"no {marker!r} on the terminal: {seen!r}"
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            seen += os.read(fd, 1024)
    return seen


def test_erase_asks_on_a_terminal_and_refuses_without_one(config: Path) -> None:
    cli(config, "suppress", "add", "ann@example.org")
    refused = cli(config, "subject", "erase", "ann@example.org")
    assert refused.returncode == 2
    assert refused.stderr.startswith(
        "optout-relay: error: erasure cannot be undone: pass --yes to confirm"
    )
    shown = cli(config, "suppress", "show", "ann@example.org")
    assert shown.stdout.startswith("address: ann@example.org\n")

    for answer, code in ((b"n\n", 130), (b"y\n", 0)):
        main, terminal = pty.openpty()
        try:
            command = ["subject", "erase", "ann@example.org", "--config", str(config)]
            process = subprocess.Popen(
                [sys.executable, "-m", "relay", *command],
                cwd=config.parent,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdin=terminal,
                stdout=terminal,
                stderr=terminal,
            )
            os.close(terminal)
            seen = read_until(main, b"[y/N]")
            assert b"Erase all personal data of ann@example.org? It cannot be undone" in seen
            os.write(main, answer)
            seen = b""
            try:
                while chunk := os.read(main, 4096):
                    seen += chunk
            except OSError:  # the terminal's other end closed: the command is done
                pass
            process.wait(timeout=60)
        finally:
            os.close(main)
        assert process.returncode == code, seen
    assert b"erased ann@example.org (key " in seen
    shown = cli(config, "suppress", "show", "ann@example.org")
    assert "erased: " in shown.stdout
