"""The front door on its own: a `FrontDoor` over a real spool and suppression list, served
by `RelaySMTP` on a loopback port, driven with the stdlib client as a marketing tool would.
No relay process around it: no delivery, no tracking app, no config file."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import ipaddress
import logging
import os
import smtplib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from relay.accounts import Account, hash_password
from relay.settings import IPNetwork, SmtpSettings
from relay.smtpd import AuthPolicy, AuthThrottle, ConnectionLimits, FrontDoor, RelaySMTP
from relay.smtpd.data import SPILL_THRESHOLD
from relay.smtpd.senders import HEADER_LIMIT
from relay.spool import Spool
from suppression import MIGRATIONS, AddressHasher, Database, SuppressionStore

SENDER = "news@shop.example"
RCPT = "erin@example.org"
PASSWORD = "door test password"
# An account that may send as shop.example only.
SHOP = Account("shop", hash_password(PASSWORD), ("shop.example",))
# Trusts a documentation network, so that a client on loopback must log in.
UNTRUSTED: tuple[IPNetwork, ...] = (ipaddress.ip_network("192.0.2.0/24"),)
# Twice the spill threshold, in lines a client may send (RFC 5321's 998 octets): a message
# whose end arrives in the same read that crosses the threshold is never spilled.
BIG_BODY = (b"x" * 998 + b"\r\n") * (2 * SPILL_THRESHOLD // 1000)

OpenDoor = Callable[..., Awaitable[int]]


def message(from_header: bytes = b"Shop <news@shop.example>", body: bytes = b"Hello\r\n") -> bytes:
    return (
        b"From: " + from_header + b"\r\nTo: " + RCPT.encode() + b"\r\nSubject: hello\r\n"
        b"Message-ID: <door-test@shop.example>\r\n\r\n" + body
    )


def subdirectories(directory: Path) -> list[str]:
    return [entry.name for entry in os.scandir(directory) if entry.is_dir()]


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    opened = await Spool.open(tmp_path / "spool.db")
    yield opened
    await opened.close()


@pytest.fixture
async def suppressions(tmp_path: Path) -> AsyncIterator[SuppressionStore]:
    database = await Database.open(tmp_path / "optout.db", MIGRATIONS)
    yield SuppressionStore(database, AddressHasher(b"door-test-key-0123456789abcdef"))
    await database.close()


@pytest.fixture
async def open_door(spool: Spool, suppressions: SuppressionStore) -> AsyncIterator[OpenDoor]:
    """Serve a front door on a free loopback port (its port); all close at teardown."""
    servers: list[asyncio.Server] = []

    async def open_(
        *,
        trusted: tuple[IPNetwork, ...] = SmtpSettings().trusted_networks,
        accounts: tuple[Account, ...] = (),
        spill_dir: Path | None = None,
        limits: ConnectionLimits | None = None,
        throttle: AuthThrottle | None = None,
    ) -> int:
        by_name = {account.username: account for account in accounts}
        door = FrontDoor(
            spool=spool,
            suppressions=suppressions,
            settings=SmtpSettings(trusted_networks=trusted),
            max_queued_messages=100,
            on_spooled=lambda: None,
            accounts=by_name,
        )
        auth = AuthPolicy(by_name) if throttle is None else AuthPolicy(by_name, throttle)
        admitted = limits or ConnectionLimits(total=10, per_client=10)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: RelaySMTP(
                door,
                limits=admitted,
                auth=auth,
                spill_dir=spill_dir,
                hostname="door.test",
                # The test logs in over plain TCP: TLS before AUTH is test_auth.py's.
                auth_require_tls=False,
            ),
            "127.0.0.1",
            0,
        )
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield open_
    for server in servers:
        server.close()
        await server.wait_closed()


def connect(port: int, *, login: str | None = None, source: str | None = None) -> smtplib.SMTP:
    """A session from `source` (a loopback address; all of 127.0.0.0/8 is local)."""
    client = smtplib.SMTP(
        "127.0.0.1", port, timeout=30, source_address=None if source is None else (source, 0)
    )
    try:
        client.ehlo("tool.test")
        if login is not None:
            client.login(login, PASSWORD)
    except BaseException:
        client.close()
        raise
    return client


def send(port: int, content: bytes, *, login: str | None = None) -> tuple[int, bytes | str]:
    """The reply to the end of DATA (the session then QUITs, as a tool does)."""
    with connect(port, login=login) as client:
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt(RCPT)[0] == 250
        try:
            return client.data(content)
        except smtplib.SMTPDataError as refused:
            return refused.smtp_code, refused.smtp_error


async def test_a_trusted_clients_message_is_spooled_under_the_queue_id_it_is_told(
    open_door: OpenDoor, spool: Spool
) -> None:
    port = await open_door()

    reply = await asyncio.to_thread(send, port, message())

    [entry] = await spool.entries()
    assert reply == (250, f"2.0.0 Ok: queued as {entry.queue_id}".encode())
    assert (entry.mail_from, entry.recipients) == (SENDER, (RCPT,))
    assert await spool.content(entry.queue_id) == message()


async def test_a_recipient_who_opted_out_is_refused_at_rcpt(
    open_door: OpenDoor, suppressions: SuppressionStore, spool: Spool
) -> None:
    await suppressions.add(RCPT)
    port = await open_door()

    def rcpt() -> tuple[int, bytes]:
        with connect(port) as client:
            assert client.mail(SENDER)[0] == 250
            return client.rcpt(RCPT)

    assert await asyncio.to_thread(rcpt) == (
        550,
        f"5.7.1 <{RCPT}>: Recipient has opted out of this sender's mail".encode(),
    )
    assert await spool.entries() == []


async def test_an_untrusted_client_must_log_in_before_mail(open_door: OpenDoor) -> None:
    port = await open_door(trusted=UNTRUSTED, accounts=(SHOP,))

    def mail(login: str | None) -> tuple[int, bytes]:
        with connect(port, login=login) as client:
            return client.mail(SENDER)

    assert await asyncio.to_thread(mail, None) == (530, b"5.7.0 Authentication required")
    assert (await asyncio.to_thread(mail, "shop"))[0] == 250


@pytest.mark.parametrize(
    ("from_header", "expected"),
    [
        (b"CEO <ceo@bank.example>", b"5.7.1 From domain bank.example not allowed for this account"),
        (b"undisclosed", b"5.7.1 Message has no From address this account may send as"),
    ],
    ids=["foreign domain", "no address"],
)
async def test_an_account_is_refused_at_data_unless_from_is_its_own(
    open_door: OpenDoor, spool: Spool, from_header: bytes, expected: bytes
) -> None:
    port = await open_door(trusted=UNTRUSTED, accounts=(SHOP,))

    reply = await asyncio.to_thread(send, port, message(from_header), login="shop")

    assert reply == (550, expected)
    assert await spool.entries() == []


async def test_a_big_message_goes_through_the_spill_dir_it_is_given_and_leaves_it_empty(
    open_door: OpenDoor, spool: Spool, tmp_path: Path
) -> None:
    spill_dir = tmp_path / "spill"
    port = await open_door(spill_dir=spill_dir)
    big = message(body=BIG_BODY)
    assert len(big) > SPILL_THRESHOLD

    reply = await asyncio.to_thread(send, port, big)

    [entry] = await spool.entries()
    assert reply == (250, f"2.0.0 Ok: queued as {entry.queue_id}".encode())
    assert await spool.content(entry.queue_id) == big
    # The first write of a spill creates the directory: this one, not the spool's incoming/.
    assert subdirectories(tmp_path) == ["spill"]
    assert os.listdir(spill_dir) == []


async def test_without_a_spill_dir_a_big_message_is_held_in_memory(
    open_door: OpenDoor, spool: Spool, tmp_path: Path
) -> None:
    port = await open_door()
    big = message(body=BIG_BODY)

    reply = await asyncio.to_thread(send, port, big)

    [entry] = await spool.entries()
    assert reply == (250, f"2.0.0 Ok: queued as {entry.queue_id}".encode())
    assert await spool.content(entry.queue_id) == big
    assert subdirectories(tmp_path) == []  # no spill file was made anywhere


async def test_a_connection_over_the_limit_is_refused_with_421(open_door: OpenDoor) -> None:
    port = await open_door(limits=ConnectionLimits(total=1, per_client=1))

    def second_connection() -> tuple[int, bytes | str]:
        with connect(port), pytest.raises(smtplib.SMTPConnectError) as refused:
            connect(port)
        return refused.value.smtp_code, refused.value.smtp_error

    assert await asyncio.to_thread(second_connection) == (
        421,
        b"4.7.0 Too many connections, try again later",
    )
    # The refused connection took no slot, and the first gave its own back.
    assert await asyncio.to_thread(lambda: connect(port).quit()[0]) == 221


def message_with(from_lines: bytes) -> bytes:
    """A message whose From field(s) are `from_lines` as written, line breaks included."""
    return (
        from_lines + b"To: " + RCPT.encode() + b"\r\nSubject: hello\r\n"
        b"Message-ID: <door-test@shop.example>\r\n\r\nHello\r\n"
    )


# From fields that mail clients, DMARC checks and DKIM signers read differently.
AMBIGUOUS_FROM = {
    "obsolete second field": b"From : CEO <ceo@evil.example>\r\nFrom: Shop <news@shop.example>\r\n",
    "obsolete field after": b"From: Shop <news@shop.example>\r\nFrom\t: ceo@evil.example\r\n",
    "upper-case second field": b"From: news@shop.example\r\nFROM: ceo@evil.example\r\n",
    "two @": b"From: ceo@evil.example@shop.example\r\n",
    "split by a tab fold": b"From: ceo@evil.example\r\n\t@shop.example\r\n",
    "fold inside brackets": b"From: <ceo@evil.example\r\n\t@shop.example>\r\n",
    "text after the address": b"From: news@shop.example <ceo@evil.example>\r\n",
    "quoted @ in local part": b'From: "ceo@evil.example"@shop.example\r\n',
    "NUL": b"From: news@shop.example\x00ceo@evil.example\r\n",
    "unclosed comment": b"From: news@shop.example (ceo@evil.example\r\n",
}


@pytest.mark.parametrize("from_lines", AMBIGUOUS_FROM.values(), ids=AMBIGUOUS_FROM.keys())
@pytest.mark.parametrize("login", ["shop", None], ids=["account", "trusted"])
async def test_an_ambiguous_from_is_refused_at_data(
    open_door: OpenDoor, spool: Spool, from_lines: bytes, login: str | None
) -> None:
    trusted = UNTRUSTED if login else SmtpSettings().trusted_networks
    port = await open_door(trusted=trusted, accounts=(SHOP,))

    code, text = await asyncio.to_thread(send, port, message_with(from_lines), login=login)

    assert code == 550
    assert isinstance(text, bytes)
    assert text.startswith(b"5.7.1 From header cannot be read unambiguously: ")
    assert text.isascii() and b"\r" not in text and b"\n" not in text
    assert await spool.entries() == []


async def test_a_from_refused_once_is_refused_again_and_a_clear_one_keeps_passing(
    open_door: OpenDoor, spool: Spool
) -> None:
    """A campaign repeats its From field: the reading of one is kept, verdicts included."""
    port = await open_door(trusted=UNTRUSTED, accounts=(SHOP,))
    ambiguous = message_with(AMBIGUOUS_FROM["two @"])
    clear = message_with(b"From: Shop <news@shop.example>\r\n")

    replies = [
        (await asyncio.to_thread(send, port, content, login="shop"))[0]
        for content in (ambiguous, clear, ambiguous, clear, ambiguous)
    ]

    assert replies == [550, 250, 550, 250, 550]
    assert len(await spool.entries()) == 2


CLEAR_FROM = {
    "obsolete spelling alone": b"From : Shop <news@shop.example>\r\n",
    "folded between name and address": b"From: Shop\r\n <news@shop.example>\r\n",
    "obsolete route": b"From: <@relay.example:news@shop.example>\r\n",
    "obsolete spaces around @": b"From: news @ shop.example\r\n",
    "period in the name": b"From: J. Smith <news@shop.example>\r\n",
    "address in the name": b'From: "news@shop.example" <news@shop.example>\r\n',
    "Latin-1 name": b"From: Sh\xf6p <news@shop.example>\r\n",
    "UTF-8 name": "From: Shöp <news@shop.example>\r\n".encode(),
    "two mailboxes of the domain": b"From: a@shop.example, b@news.shop.example\r\n",
}


@pytest.mark.parametrize("from_lines", CLEAR_FROM.values(), ids=CLEAR_FROM.keys())
async def test_an_unambiguous_from_passes_in_any_rfc_5322_form(
    open_door: OpenDoor, spool: Spool, from_lines: bytes
) -> None:
    port = await open_door(trusted=UNTRUSTED, accounts=(SHOP,))

    code, _ = await asyncio.to_thread(send, port, message_with(from_lines), login="shop")

    assert code == 250
    assert len(await spool.entries()) == 1


async def test_the_obsolete_spelling_of_a_foreign_from_is_refused(
    open_door: OpenDoor, spool: Spool
) -> None:
    port = await open_door(trusted=UNTRUSTED, accounts=(SHOP,))

    reply = await asyncio.to_thread(
        send, port, message_with(b"From : CEO <ceo@bank.example>\r\n"), login="shop"
    )

    assert reply == (550, b"5.7.1 From domain bank.example not allowed for this account")
    assert await spool.entries() == []


@pytest.mark.parametrize("spill", [False, True], ids=["in memory", "spilled"])
async def test_a_trusted_client_gets_552_for_a_header_section_over_the_limit(
    open_door: OpenDoor, spool: Spool, tmp_path: Path, spill: bool
) -> None:
    port = await open_door(spill_dir=tmp_path / "spill" if spill else None)
    line = b"X-Padding: " + b"p" * 900 + b"\r\n"
    huge = message_with(b"From: news@shop.example\r\n" + line * (HEADER_LIMIT // len(line) + 1))

    reply = await asyncio.to_thread(send, port, huge)

    assert reply == (552, b"5.3.4 Message header section exceeds fixed maximum size")
    assert await spool.entries() == []


@pytest.mark.parametrize(
    "control", ["\x00", "\x01", "\x1b", "\x7f", "\t"], ids=["NUL", "SOH", "ESC", "DEL", "TAB"]
)
async def test_an_address_with_a_control_character_is_refused(
    open_door: OpenDoor, spool: Spool, control: str
) -> None:
    port = await open_door()

    def converse() -> list[tuple[int, bytes]]:
        with connect(port) as client:
            replies = [client.docmd(f"MAIL FROM:<news{control}@shop.example>")]
            replies.append(client.docmd(f"MAIL FROM:<news@shop.example{control}>"))
            replies.append(client.mail(SENDER))
            replies.append(client.docmd(f"RCPT TO:<erin{control}@example.org>"))
            replies.append(client.rcpt(RCPT))
            replies.append(client.data(message()))
            return replies

    replies = await asyncio.to_thread(converse)

    assert replies[:2] == [(501, b"5.1.7 Bad sender address syntax")] * 2
    assert replies[3] == (501, b"5.1.3 Bad recipient address syntax")
    assert [code for code, _ in (replies[2], replies[4], replies[5])] == [250, 250, 250]
    [entry] = await spool.entries()
    assert (entry.mail_from, entry.recipients) == (SENDER, (RCPT,))


def auth_plain(client: smtplib.SMTP, username: str, password: str) -> tuple[int, bytes]:
    token = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
    return client.docmd("AUTH PLAIN", token)


async def test_parallel_guesses_are_counted_before_any_password_is_checked(
    open_door: OpenDoor,
) -> None:
    throttle = AuthThrottle(slow_after=100, lock_after=6)  # no delay: only the count matters
    port = await open_door(
        accounts=(SHOP,), limits=ConnectionLimits(total=40, per_client=40), throttle=throttle
    )

    def guess_at_once() -> list[int]:
        """20 sessions, then one guess on each, all sent before any is answered."""
        clients = [connect(port) for _ in range(20)]
        start = threading.Barrier(len(clients))

        def guess(client: smtplib.SMTP) -> int:
            start.wait()
            return auth_plain(client, "shop", "guess")[0]

        try:
            with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
                return list(pool.map(guess, clients))
        finally:
            for client in clients:
                client.close()

    codes = await asyncio.to_thread(guess_at_once)

    assert codes.count(535) == 6  # the rest were refused unchecked
    assert codes.count(454) == 14


async def test_rotating_addresses_within_a_24_buys_no_more_guesses(open_door: OpenDoor) -> None:
    throttle = AuthThrottle(slow_after=100, lock_after=6)
    port = await open_door(accounts=(SHOP,), throttle=throttle)

    def guess_from(source: str, password: str = "guess") -> tuple[int, bytes]:
        with connect(port, source=source) as client:
            return auth_plain(client, "shop", password)

    codes = [(await asyncio.to_thread(guess_from, f"127.0.0.{host}"))[0] for host in range(1, 8)]

    assert codes == [535] * 6 + [454]
    # Even the right password waits out the window from that network; not from another.
    assert await asyncio.to_thread(guess_from, "127.0.0.200", PASSWORD) == (
        454,
        b"4.7.0 Too many failed authentications from your address, try again later",
    )
    assert (await asyncio.to_thread(guess_from, "127.0.1.1", PASSWORD))[0] == 235


def test_the_throttle_counts_ipv6_clients_by_their_64() -> None:
    throttle = AuthThrottle(slow_after=100, lock_after=2)
    assert throttle.begin("2001:db8:0:1::a") == 0.0
    assert throttle.begin("2001:db8:0:1:ffff::b") == 0.0
    assert throttle.begin("2001:db8:0:1::c") is None  # the same /64
    assert throttle.begin("2001:db8:0:2::a") == 0.0  # the next /64
    assert throttle.begin("::ffff:192.0.2.7") == 0.0  # IPv4-mapped: counted as 192.0.2.0/24
    assert throttle.network("::ffff:192.0.2.7") == "192.0.2.0/24"


async def test_a_failed_login_logs_no_unknown_username_and_a_535_says_5_7_8(
    open_door: OpenDoor, caplog: pytest.LogCaptureFixture
) -> None:
    port = await open_door(accounts=(SHOP,))

    def attempts() -> list[tuple[int, bytes]]:
        with connect(port) as client:
            # A password typed into the username field, then a known user's wrong guess.
            return [auth_plain(client, PASSWORD, ""), auth_plain(client, "shop", "guess")]

    with caplog.at_level(logging.INFO):
        replies = await asyncio.to_thread(attempts)

    assert replies == [(535, b"5.7.8 Authentication credentials invalid")] * 2
    assert PASSWORD not in caplog.text
    assert "AUTH failed for <unknown> from 127.0.0.1" in caplog.text
    assert "AUTH failed for shop from 127.0.0.1" in caplog.text


async def test_a_successful_login_logs_no_deprecation_warning(
    open_door: OpenDoor, caplog: pytest.LogCaptureFixture
) -> None:
    port = await open_door(accounts=(SHOP,))

    def login() -> tuple[int, bytes]:
        with connect(port) as client:
            return auth_plain(client, "shop", PASSWORD)

    with caplog.at_level(logging.DEBUG, logger="mail.log"):
        reply = await asyncio.to_thread(login)

    assert reply == (235, b"2.7.0 Authentication successful")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
