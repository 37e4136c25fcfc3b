"""Tracking modes through the relay and its HTTP endpoint (CNIL deliberation 2026-042):
what an open and a click write in each mode, read back from the SQLite files (rows, and the
raw bytes of optout.db and its WAL), consent per recipient in one campaign, and a withdrawal
after delivery that changes what an old copy's pixel records.

Each test prints the rows an open and a click added: `pytest -s` shows what each mode
stores."""

from __future__ import annotations

import contextlib
import html
import json
import re
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from relay.app import Relay
from relay.settings import Settings
from relay.stores import STORE_FILE
from suppression import Purpose
from tests.helpers import (
    SIGNING_KEYS,
    CaptureServer,
    StartRelay,
    asubmit,
    body_of,
    cli,
    local_url,
    parse,
    relay_settings,
    wait_for,
)
from tracking import Signer, TrackingUrls
from tracking.modes import Mode
from tracking.webhooks import WebhookDelivery, WebhookEndpoint

ANN = "ann@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.org"
SENDER = "news@shop.example"
HUMAN = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Thunderbird/128.0"
LANDING = "https://shop.example/sale?from=mail"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
# Every table an open or a click could write to.
TABLES = (
    "events",
    "contacts",
    "event_messages",
    "aggregate_counts",
    "stats_counts",
    "stats_reach",
    "stats_messages",
    "webhook_outbox",
    "tracking_consent",
    "suppression_audit",
)
PAGE_SIZE = 4096


def mode_settings(
    data_dir: Path, downstream_port: int, opens: Mode, clicks: Mode, **tracking: Any
) -> Settings:
    settings = relay_settings(data_dir, downstream_port)
    return replace(
        settings,
        # Opens a moment after delivery count as a person's, not a scanner's.
        tracking=replace(
            settings.tracking, opens=opens, clicks=clicks, machine_seconds=0.001, **tracking
        ),
    )


def campaign_mail(to: list[str], campaign: str = "spring", **headers: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = f"Shop <{SENDER}>"
    message["To"] = ", ".join(to)
    message["Subject"] = "Spring sale"
    message["X-Optout-Campaign"] = campaign
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message.set_content("Our spring sale starts today.\n")
    message.add_alternative(
        '<html><body><img src="https://shop.example/logo.png" alt="Shop">'
        f'<p>Everything 20% off: <a href="{LANDING}">see the sale</a>.</p></body></html>',
        subtype="html",
    )
    return message


@dataclass
class Copy:
    """A recipient's copy as delivered: its URLs, and what identifies the recipient."""

    recipient: str
    unsubscribe: str
    pixel: str | None
    clicks: list[str]
    preferences: str | None

    @classmethod
    def of(cls, content: bytes) -> Copy:
        message = parse(content)
        page = body_of(message, "html")
        unsubscribe = re.fullmatch(r"<(https://\S+/u/[\w.\-]+)>.*", message["List-Unsubscribe"])
        assert unsubscribe, message["List-Unsubscribe"]
        pixel = re.search(r'<img src="(https://mail\.shop\.example/o/[^"]+)"', page)
        preferences = re.search(r'href="(https://mail\.shop\.example/p/[^"]+)"', page)
        return cls(
            message["To"],
            unsubscribe.group(1),
            pixel.group(1) if pixel else None,
            [
                html.unescape(url)
                for url in re.findall(r'href="(https://mail\.shop\.example/c/[^"]+)"', page)
            ],
            preferences.group(1) if preferences else None,
        )

    @property
    def token(self) -> str:
        return self.unsubscribe.rsplit("/", 1)[1]


def pixel_token(copy: Copy) -> str:
    assert copy.pixel is not None
    return copy.pixel.rsplit("/", 1)[1].removesuffix(".gif")


Rows = dict[str, set[tuple[Any, ...]]]


def ro(path: Path) -> contextlib.closing[sqlite3.Connection]:
    """A read-only connection of the test's own, closed at once (never holding the WAL)."""
    return contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True))


def rows(path: Path) -> Rows:
    with ro(path) as db:
        return {table: set(db.execute(f"SELECT * FROM {table}")) for table in TABLES}


def added(
    before: dict[str, set[tuple[Any, ...]]], after: dict[str, set[tuple[Any, ...]]]
) -> dict[str, list[tuple[Any, ...]]]:
    return {t: sorted(after[t] - before[t], key=repr) for t in TABLES if after[t] - before[t]}


def removed(
    before: dict[str, set[tuple[Any, ...]]], after: dict[str, set[tuple[Any, ...]]]
) -> dict[str, list[tuple[Any, ...]]]:
    return {t: sorted(before[t] - after[t], key=repr) for t in TABLES if before[t] - after[t]}


def scalar(path: Path, sql: str, *params: object) -> Any:
    with ro(path) as db:
        row = db.execute(sql, params).fetchone()
    return None if row is None else row[0]


@dataclass
class Relayed:
    relay: Relay
    downstream: CaptureServer
    data: Path
    copies: dict[str, Copy] = field(default_factory=dict)

    @property
    def db(self) -> Path:
        return self.data / STORE_FILE

    async def send(self, message: EmailMessage, to: list[str]) -> dict[str, Copy]:
        handler = self.downstream.handler
        handler.messages.clear()
        result = await asubmit(self.relay.addresses.smtp[1], message, SENDER, to)
        assert result.refused == {}
        await wait_for(lambda: len(handler.messages) == len(to), what="every copy")
        copies = {m.recipients[0]: Copy.of(m.content) for m in handler.messages}

        def delivered() -> bool:
            n = scalar(self.db, "SELECT count(*) FROM events WHERE type = 'delivered'")
            return int(n) >= len(self.copies) + len(to)

        await wait_for(delivered, what="the delivered events")
        self.copies.update(copies)
        return copies

    async def fetch(self, url: str, client: str = "192.0.2.10") -> aiohttp.ClientResponse:
        headers = {"User-Agent": HUMAN, "X-Forwarded-For": client}
        async with (
            aiohttp.ClientSession() as http,
            http.get(local_url(self.relay, url), headers=headers, allow_redirects=False) as got,
        ):
            await got.read()
            return got

    async def quiet_wal(self) -> None:
        """Everything so far copied into optout.db and the WAL emptied, so that the WAL then
        holds exactly what is written next."""
        database = self.relay.stores.suppressions.database
        await wait_for(database.checkpoint, what="a checkpoint no reader holds back")
        assert (self.data / f"{STORE_FILE}-wal").stat().st_size == 0


@pytest.fixture
async def relayed(
    tmp_path: Path,
    downstream: CaptureServer,
    start_relay: StartRelay,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Relayed]:
    opens, clicks, extra = request.param
    settings = mode_settings(tmp_path / "data", downstream.port, opens, clicks, **extra)
    relay = await start_relay(settings)
    yield Relayed(relay, downstream, tmp_path / "data")


def identifiers(relayed: Relayed, address: str) -> dict[str, bytes]:
    """What would name the recipient (or their copy) if it were stored."""
    copy = relayed.copies[address]
    address_hash = relayed.relay.stores.suppressions.hasher.hash(address)
    queue_id = scalar(
        relayed.db,
        "SELECT queue_id FROM events WHERE type = 'delivered' AND address_hash = ?",
        address_hash,
    )
    found = {
        "address": address.encode(),
        "address hash": address_hash.encode(),
        "queue id": str(queue_id).encode(),
        "unsubscribe token": copy.token.encode(),
    }
    if copy.pixel is not None:
        found["pixel token"] = pixel_token(copy).encode()
    return found


def named_in(data: bytes, names: dict[str, bytes]) -> list[str]:
    return [what for what, value in names.items() if value in data]


def changed_pages(before: bytes, after: bytes) -> bytes:
    pages = max(len(before), len(after)) // PAGE_SIZE
    return b"".join(
        after[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        for i in range(pages)
        if before[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] != after[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
    )


MODES = {
    "individual": (Mode.INDIVIDUAL, Mode.INDIVIDUAL, {}),
    "consented": (Mode.CONSENTED, Mode.CONSENTED, {}),
    "aggregate": (Mode.AGGREGATE, Mode.AGGREGATE, {}),
}


@pytest.mark.parametrize("relayed", list(MODES.values()), ids=list(MODES), indirect=True)
async def test_what_an_open_and_a_click_write_in_each_mode(relayed: Relayed) -> None:
    """ann and bob get one campaign; nobody consented. ann opens her copy and clicks its
    link. Individual: events naming her. Consented (without consent) and aggregate: one
    counter each, and no byte naming her, her copy or the message anywhere in what the
    open and the click wrote (the WAL, then the database file's changed pages)."""
    opens = relayed.relay.settings.tracking.opens
    copies = await relayed.send(campaign_mail([ANN, BOB]), [ANN, BOB])
    ann, bob = copies[ANN], copies[BOB]
    assert ann.pixel and bob.pixel and len(ann.clicks) == len(bob.clicks) == 1
    if opens is Mode.INDIVIDUAL:
        assert ann.pixel != bob.pixel and ann.clicks != bob.clicks
        assert ann.preferences and ann.preferences.endswith(ann.token)
    else:
        # One URL for every copy of the message: it cannot tell who fetched it.
        assert ann.pixel == bob.pixel and ann.clicks == bob.clicks
        assert "/c/-/" in ann.clicks[0]
    assert (ann.preferences is not None) == opens.may_name

    await relayed.quiet_wal()
    before = rows(relayed.db)
    db_before = relayed.db.read_bytes()
    assert (await relayed.fetch(ann.pixel)).status == 200
    click = await relayed.fetch(ann.clicks[0])
    assert click.status == 302 and click.headers["Location"] == LANDING

    def written() -> bool:
        counted = scalar(relayed.db, "SELECT coalesce(sum(n), 0) FROM aggregate_counts")
        fetched = scalar(relayed.db, "SELECT count(*) FROM events WHERE type IN ('open', 'click')")
        return int(counted) + int(fetched) == 2

    await wait_for(written, what="the open and the click")
    after = rows(relayed.db)
    wal = (relayed.data / f"{STORE_FILE}-wal").read_bytes()
    new, gone = added(before, after), removed(before, after)
    print(f"\n[{opens}] an open and a click added:")
    for table, found in new.items():
        for row in found:
            print(f"  {table}: {row}")
    assert gone == {}
    names = identifiers(relayed, ANN)
    if opens is Mode.INDIVIDUAL:
        kinds = sorted((row[1], row[3] is not None) for row in new["events"])
        assert kinds == [("click", True), ("open", True)]  # (type, names ann)
        assert "aggregate_counts" not in new
        assert "address hash" in named_in(wal, names)  # the check can find what is there
        return
    assert set(new) == {"aggregate_counts"}
    day = new["aggregate_counts"][0][2]
    assert sorted(new["aggregate_counts"]) == [
        ("spring", "shop.example", day, "click_human", 1),
        ("spring", "shop.example", day, "open_human", 1),
    ]
    assert named_in(wal, names) == []
    await relayed.quiet_wal()
    changed = changed_pages(db_before, relayed.db.read_bytes())
    assert changed  # the counters' page
    assert named_in(changed, names) == []
    print(
        f"  WAL: {len(wal)} bytes, database pages changed: {len(changed) // PAGE_SIZE};"
        f" none holds any of {sorted(names)}"
    )


@pytest.mark.parametrize("relayed", [(Mode.OFF, Mode.OFF, {})], ids=["off"], indirect=True)
async def test_off_means_no_pixel_and_no_click_urls(relayed: Relayed) -> None:
    copies = await relayed.send(campaign_mail([ANN]), [ANN])
    assert copies[ANN].pixel is None and copies[ANN].clicks == []
    assert copies[ANN].preferences is None


@pytest.mark.parametrize(
    "relayed", [(Mode.CONSENTED, Mode.CONSENTED, {})], ids=["consented"], indirect=True
)
async def test_consent_per_recipient_in_one_campaign(relayed: Relayed) -> None:
    """ann consented to both purposes, carol to opens and then withdrew, bob said nothing:
    one message, and only ann is measured individually. A trusted sender's X-Optout-Consent
    vouches for bob's opens in a later message, not his clicks; carol's withdrawal wins."""
    consents = relayed.relay.stores.consents
    await consents.grant(ANN, [Purpose.OPENS, Purpose.CLICKS], actor="test")
    await consents.grant(CAROL, [Purpose.OPENS], actor="test")
    await consents.withdraw(CAROL, [Purpose.OPENS], actor="test")
    copies = await relayed.send(campaign_mail([ANN, BOB, CAROL]), [ANN, BOB, CAROL])
    ann, bob, carol = copies[ANN], copies[BOB], copies[CAROL]
    assert bob.pixel == carol.pixel != ann.pixel
    assert bob.clicks == carol.clicks != ann.clicks
    await relayed.quiet_wal()
    before = rows(relayed.db)
    for copy, client in ((bob, "192.0.2.2"), (carol, "192.0.2.3")):
        assert copy.pixel is not None
        await relayed.fetch(copy.pixel, client)
        await relayed.fetch(copy.clicks[0], client)
    await relayed.fetch(bob.pixel, "192.0.2.2")  # bob reads it again: the same open

    def all_written() -> bool:
        counted = scalar(relayed.db, "SELECT coalesce(sum(n), 0) FROM aggregate_counts")
        return int(counted) == 4

    await wait_for(all_written, what="bob's and carol's counts")
    wal = (relayed.data / f"{STORE_FILE}-wal").read_bytes()
    for address in (BOB, CAROL):
        assert named_in(wal, identifiers(relayed, address)) == []
    assert ann.pixel is not None
    await relayed.fetch(ann.pixel, "192.0.2.1")
    await relayed.fetch(ann.clicks[0], "192.0.2.1")
    await wait_for(
        lambda: scalar(relayed.db, "SELECT count(*) FROM events WHERE type = 'click'") == 1,
        what="ann's click",
    )
    new = added(before, rows(relayed.db))
    print("\n[consented] ann (consent), bob (none), carol (withdrawn) open and click:")
    for table, found in new.items():
        for row in found:
            print(f"  {table}: {row}")
    hasher = relayed.relay.stores.suppressions.hasher
    named = {(row[1], row[3]) for row in new["events"]}
    assert named == {("open", hasher.hash(ANN)), ("click", hasher.hash(ANN))}
    counts = {row[3]: row[4] for row in new["aggregate_counts"]}
    assert counts == {"open_human": 2, "click_human": 2}

    vouched = campaign_mail([BOB, CAROL], campaign="summer", X_Optout_Consent="opens")
    later = await relayed.send(vouched, [BOB, CAROL])
    for delivered in relayed.downstream.handler.messages:  # read, then removed
        assert b"X-Optout-Consent" not in delivered.content
    assert later[BOB].pixel != later[CAROL].pixel  # bob's opens individually, carol's not
    assert later[BOB].clicks == later[CAROL].clicks  # nobody vouched for clicks


class Receiver:
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(json.loads(await request.read()))
        return web.Response(text="thanks")


@pytest.fixture
async def receiver(aiohttp_server: Any) -> AsyncIterator[tuple[Receiver, str]]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hooks", receiver.handle)
    server = await aiohttp_server(app)
    yield receiver, str(server.make_url("/hooks"))


async def test_withdrawal_after_delivery_changes_what_an_old_copy_records(
    tmp_path: Path,
    downstream: CaptureServer,
    start_relay: StartRelay,
    receiver: tuple[Receiver, str],
) -> None:
    """Individual mode: ann opens her copy (an event naming her), then stops tracking on
    her preference page (a GET changes nothing; the form's POST does). The same old pixel
    and link then only add to the aggregate counts; the withdrawal is an event, a webhook
    and an audited consent change, and her next copy gets the message's aggregate URLs."""
    hooks, url = receiver
    settings = mode_settings(tmp_path / "data", downstream.port, Mode.INDIVIDUAL, Mode.INDIVIDUAL)
    settings = replace(
        settings,
        webhooks=(WebhookEndpoint(url, SECRET, ("tracking.withdrawn",)),),
        webhook_delivery=WebhookDelivery(timeout=5.0, first_retry=0.05),
    )
    relayed = Relayed(await start_relay(settings), downstream, tmp_path / "data")
    ann = (await relayed.send(campaign_mail([ANN, BOB]), [ANN, BOB]))[ANN]
    assert ann.pixel and ann.preferences
    await relayed.fetch(ann.pixel)
    address_hash = relayed.relay.stores.suppressions.hasher.hash(ANN)
    opened = "SELECT count(*) FROM events WHERE type = 'open' AND address_hash = ?"
    await wait_for(lambda: scalar(relayed.db, opened, address_hash) == 1, what="ann's open")

    page = await relayed.fetch(ann.preferences)
    assert page.status == 200
    assert scalar(relayed.db, "SELECT count(*) FROM tracking_consent") == 0  # GET: nothing
    async with aiohttp.ClientSession() as http:
        form = {"stop_tracking": "yes"}
        async with http.post(local_url(relayed.relay, ann.preferences), data=form) as done:
            assert done.status == 200
            assert "Tracking stopped" in await done.text()
    states = "SELECT purpose, state, source FROM tracking_consent WHERE address_hash = ?"
    with ro(relayed.db) as db:
        assert sorted(db.execute(states, [address_hash])) == [
            ("clicks", "withdrawn", "preferences"),
            ("opens", "withdrawn", "preferences"),
        ]
    await wait_for(lambda: len(hooks.seen) == 1, what="the tracking.withdrawn webhook")
    hook = hooks.seen[0]
    assert hook["type"] == "tracking.withdrawn"
    assert hook["data"]["recipient"] == ANN and hook["data"]["campaign"] == "spring"
    assert hook["data"]["detail"]["purposes"] == ["clicks", "opens"]
    # The dispatcher marks the webhook delivered once the receiver has answered: after that
    # nothing else is on its way into the store.
    waiting = "SELECT count(*) FROM webhook_outbox WHERE state != 'delivered'"
    await wait_for(lambda: scalar(relayed.db, waiting) == 0, what="the webhook marked delivered")

    before = rows(relayed.db)
    await relayed.fetch(ann.pixel, "192.0.2.99")
    await relayed.fetch(ann.clicks[0], "192.0.2.99")
    counted = "SELECT coalesce(sum(n), 0) FROM aggregate_counts"
    await wait_for(lambda: scalar(relayed.db, counted) == 2, what="the aggregate counts")
    new = added(before, rows(relayed.db))
    print("\n[individual, after ann withdrew] her old copy's open and click added:")
    for table, found in new.items():
        for row in found:
            print(f"  {table}: {row}")
    assert set(new) == {"aggregate_counts"}
    assert scalar(relayed.db, opened, address_hash) == 1  # her old open stays as it was

    again = await relayed.send(campaign_mail([ANN, BOB], campaign="summer"), [ANN, BOB])
    urls = TrackingUrls("https://mail.shop.example", Signer(SIGNING_KEYS))
    kinds = {
        address: type(urls.check_beacon(pixel_token(copy))).__name__
        for address, copy in again.items()
    }
    assert kinds == {ANN: "AggregateReading", BOB: "Reading"}
    shown = cli(_config(tmp_path), "consent", "show", ANN)
    assert shown.returncode == 1, shown.stderr  # consents to nothing
    assert "opens: withdrawn" in shown.stdout and "via preferences" in shown.stdout


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(f'[storage]\ndir = "{tmp_path / "data"}"\n')
    return path
