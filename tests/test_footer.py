"""Where the footer goes on odd but real MIME, how it looks, and what it says (issue 14,
items 5 and 10): never glued to a part that is all headers or into an empty part, inline text
files are body text, a footer part joins a multipart/mixed where no part can take one, the
relay's fields go on top of a malformed header block, the footer stays readable (WCAG AA) on
the sender's background, and it carries the sender's postal address."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import re
from dataclasses import replace
from email.message import Message
from pathlib import Path

import pytest

from relay.accounts import Account, hash_password
from relay.rewrite import Decorations, Hole, build_template, list_unsubscribe_headers
from relay.rewrite._colour import contrast, parse_colour
from relay.settings import RewriteSettings
from tests.helpers import (
    PASSWORD,
    CaptureServer,
    StartRelay,
    parse,
    session,
    untrusted,
    wait_for,
)

UNSUB = "https://mail.shop.example/u/TOKEN"
PIXEL = "https://mail.shop.example/o/TOKEN.gif"
VALUES = {Hole.UNSUBSCRIBE_URL: UNSUB, Hole.PIXEL_URL: PIXEL}
HEAD = b"From: Shop <news@shop.example>\r\nSubject: odd\r\nMIME-Version: 1.0\r\n"


def render(raw: bytes, decorations: Decorations | None = None) -> tuple[bytes, list[str]]:
    template = build_template(raw, decorations or Decorations())
    return template.render(VALUES, list_unsubscribe_headers(UNSUB)), template.notes


def parsed(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def leaves(message: Message) -> list[Message]:
    return [part for part in message.walk() if not part.is_multipart()]


def text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode(part.get_content_charset() or "ascii")


def mixed(*parts: bytes, close: bool = True) -> bytes:
    body = b"".join(b"--b\r\n" + part + b"\r\n" for part in parts)
    return (
        HEAD
        + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        + body
        + (b"--b--\r\n" if close else b"")
    )


# -- parts that cannot take a footer ---------------------------------------------------------


def test_a_part_that_is_all_headers_keeps_them_and_the_next_text_part_gets_the_footer() -> None:
    headers_only = b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable"
    raw = mixed(headers_only, b"Content-Type: text/plain\r\n\r\nHello")
    out, _ = render(raw)
    assert headers_only + b"\r\n--b\r\n" in out  # the header block as sent, nothing glued on
    first, second = leaves(parsed(out))
    assert first["Content-Transfer-Encoding"] == "quoted-printable"
    assert UNSUB not in text(first)
    assert text(second).endswith(f"Unsubscribe: {UNSUB}\r\n")


def test_an_empty_part_between_two_delimiters_gets_nothing() -> None:
    raw = mixed(b"", b"Content-Type: text/plain\r\n\r\nHello")
    out, _ = render(raw)
    assert b"--b\r\n\r\n--b\r\n" in out  # the empty part as it was
    assert text(leaves(parsed(out))[-1]).endswith(f"Unsubscribe: {UNSUB}\r\n")


def test_an_inline_text_file_is_body_text() -> None:
    raw = mixed(
        b'Content-Type: text/plain; name="notes.txt"\r\n'
        b'Content-Disposition: inline; filename="notes.txt"\r\n\r\nThe notes'
    )
    out, notes = render(raw)
    [part] = leaves(parsed(out))
    assert text(part).startswith("The notes") and UNSUB in text(part)
    assert not any("appended" in note for note in notes)


def test_where_no_part_takes_the_footer_a_text_part_joins_the_mixed() -> None:
    pdf = b"Content-Type: application/pdf\r\nContent-Disposition: attachment\r\n\r\n%PDF-1.4"
    page = b"Content-Type: text/html\r\nContent-Disposition: attachment\r\n\r\n<p>page</p>"
    for raw in (mixed(pdf, page), mixed(pdf, page, close=False)):
        out, notes = render(raw)
        message = parsed(out)
        assert message.get_content_type() == "multipart/mixed"  # never a new container
        assert [p.get_content_type() for p in leaves(message)] == [
            "application/pdf",
            "text/html",
            "text/plain",
        ]
        assert text(leaves(message)[-1]) == f"-- \r\nUnsubscribe: {UNSUB}\r\n"
        assert out.split(b"\r\n\r\n", 1)[1].startswith(raw.split(b"\r\n\r\n", 1)[1][:-9])
        assert "a text part with the unsubscribe link appended to the multipart/mixed" in notes
    # Any other shape is left as it is: a footer part elsewhere is not what readers see.
    single = HEAD + b"Content-Type: application/pdf\r\n\r\n%PDF-1.4\r\n"
    out, notes = render(single)
    assert out.endswith(b"\r\n\r\n%PDF-1.4\r\n")
    assert "no text part could carry the unsubscribe link" in notes


# -- a malformed first header block ----------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"This line is no header\r\nFrom: news@shop.example\r\n\r\nHello\r\n",
        b"From: news@shop.example\r\nSubject: no blank line\r\n<p>Hello</p>\r\n\r\nmore\r\n",
    ],
)
def test_fields_go_on_top_of_a_malformed_header_block(raw: bytes) -> None:
    template = build_template(raw, Decorations())
    template.add_fields(
        [b"Received: by relay.test (optout-relay) with ESMTP id X;\r\n"], trace=True
    )
    template.add_fields([b"List-Id: <c.shop.example>\r\n"])
    out = template.render(VALUES, list_unsubscribe_headers(UNSUB))
    assert out.startswith(
        b"Received: by relay.test (optout-relay) with ESMTP id X;\r\nList-Id: <c.shop.example>\r\n"
        b"List-Unsubscribe: <"
    )
    message = parsed(out)  # what a receiver reads as the header section
    assert message["List-Unsubscribe"] == f"<{UNSUB}>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message["List-Id"] == "<c.shop.example>"
    assert raw in out  # the sender's bytes as sent, below the relay's fields


# -- colour ----------------------------------------------------------------------------------


def footer_colour(html: str) -> str:
    raw = HEAD + b"Content-Type: text/html; charset=utf-8\r\n\r\n" + html.encode()
    out, _ = render(raw)
    found = re.search(r'<a href="[^"]*" style="color:(#[0-9a-f]{6});', text(parsed(out)))
    assert found is not None
    return found.group(1)


@pytest.mark.parametrize(
    ("html", "background"),
    [
        ("<html><body><p>Hi</p></body></html>", "#ffffff"),
        ('<html><body bgcolor="#111111"><p>Hi</p></body></html>', "#111111"),
        ('<html><body bgcolor="111"><p>Hi</p></body></html>', "#111111"),
        ('<body style="margin:0; background: #222 url(bg.png) repeat"><p>Hi</p></body>', "#222222"),
        (
            "<style>/* dark */ body, td { background-color: black }</style><body>Hi</body>",
            "#000000",
        ),
        ('<body bgcolor="#ffffff" style="background-color:#333"><p>Hi</p></body>', "#333333"),
        ('<body style="background-color:#777777"><p>Hi</p></body>', "#777777"),
    ],
)
def test_the_footer_keeps_aa_contrast_on_the_senders_background(html: str, background: str) -> None:
    colour = footer_colour(html)
    ratio = contrast(parse_colour(colour), parse_colour(background))  # type: ignore[arg-type]
    assert ratio >= 4.5, (colour, background, ratio)


def test_on_a_light_background_the_footer_is_grey_and_on_a_dark_one_it_takes_the_text_colour() -> (
    None
):
    assert footer_colour("<body><p>Hi</p></body>") == "#666666"
    dark = '<body bgcolor="#111111" text="#eeeeee"><p>Hi</p></body>'
    assert footer_colour(dark) == "#eeeeee"


# -- the postal address ----------------------------------------------------------------------


def test_the_footer_carries_the_postal_address_in_every_charset() -> None:
    address = "Shop GmbH\nMarktgasse 1, 8001 Zürich"
    raw = (
        HEAD + b"Content-Type: multipart/alternative; boundary=a\r\n\r\n"
        b"--a\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nHello\r\n"
        b"--a\r\nContent-Type: text/html; charset=iso-8859-1\r\n\r\n<p>Hello</p>\r\n--a--\r\n"
    )
    out, _ = render(raw, Decorations(postal_address=address))
    plain, html = leaves(parsed(out))
    assert f"-- \r\nShop GmbH\r\nMarktgasse 1, 8001 Zurich\r\nUnsubscribe: {UNSUB}" in text(plain)
    assert "Shop GmbH<br>Marktgasse 1, 8001 Z&#252;rich<br>" in text(html)
    # In a footer part of its own, in UTF-8.
    pdf = b"Content-Type: application/pdf\r\nContent-Disposition: attachment\r\n\r\n%PDF"
    out, _ = render(mixed(pdf), Decorations(postal_address=address))
    added = leaves(parsed(out))[-1]
    assert added.get_content_charset() == "utf-8"
    assert "Marktgasse 1, 8001 Zürich\r\nUnsubscribe: " in text(added)


POSTAL = "Shop Ltd, 1 Market Street, Springfield 12345"


async def test_an_accounts_postal_address_is_in_its_mail_and_serve_warns_about_the_others(
    tmp_path: Path,
    downstream: CaptureServer,
    start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hashed = hash_password(PASSWORD)
    accounts = (
        Account("shop", hashed, ("shop.example",), postal_address=POSTAL),
        Account("crm", hashed, ("crm.example",)),
        Account("receipts", hashed, ("pay.example",), category="transactional"),
    )
    settings = untrusted(tmp_path, downstream.port, accounts)
    with caplog.at_level(logging.WARNING, logger="optout"):
        relay = await start_relay(replace(settings, rewrite=RewriteSettings(pixel_min_html=0)))
    warned = [r.getMessage() for r in caplog.records if "postal address" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("account crm sends marketing mail")

    def submit() -> None:
        with session(relay.addresses.smtp[1], login="shop") as client:
            client.sendmail(
                "news@shop.example",
                ["ann@example.org"],
                b"From: news@shop.example\r\nTo: ann@example.org\r\nSubject: hi\r\n\r\nHello\r\n",
            )

    await asyncio.to_thread(submit)
    await wait_for(lambda: len(downstream.handler.messages) == 1, what="the copy")
    body = parse(downstream.handler.messages[0].content).get_payload()
    assert f"-- \r\n{POSTAL}\r\nUnsubscribe: https://mail.shop.example/u/" in body
