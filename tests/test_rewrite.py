"""The first rewrite: owned headers, footers, pixel, placeholders, untouchable parts."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage, Message

import pytest

from relay.rewrite import Decorations, Hole, build_template, list_unsubscribe_headers

UNSUB = "https://mail.shop.example/u/TOKEN-1"
PIXEL = "https://mail.shop.example/o/TOKEN-2.gif"
VALUES = {Hole.UNSUBSCRIBE_URL: UNSUB, Hole.PIXEL_URL: PIXEL}


def crlf(message: EmailMessage | bytes) -> bytes:
    raw = message if isinstance(message, bytes) else message.as_bytes()
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def render(raw: bytes, decorations: Decorations | None = None) -> bytes:
    template = build_template(raw, decorations or Decorations())
    return template.render(VALUES, list_unsubscribe_headers(UNSUB))


def parsed(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def text_of(message: Message, ctype: str) -> str:
    part = next(p for p in message.walk() if p.get_content_type() == ctype)
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode(part.get_content_charset() or "ascii")


def simple(ctype: str, body: str, charset: str = "utf-8", cte: str | None = None) -> bytes:
    message = EmailMessage()
    message["From"] = "a@shop.example"
    message["Subject"] = "x"
    message.set_content(body, subtype=ctype.split("/")[1], charset=charset, cte=cte)
    return crlf(message)


def test_sender_list_headers_are_replaced_and_control_headers_removed() -> None:
    raw = (
        b"From: a@shop.example\r\nList-Unsubscribe: <mailto:x@shop.example>\r\n"
        b"list-unsubscribe-post: List-Unsubscribe=One-Click\r\nX-Optout-Campaign: c1\r\n"
        b"X-Optout-Topic: news\r\nSubject: hi\r\n  folded on\r\n\r\nbody\r\n"
    )
    out = parsed(render(raw))
    assert out.get_all("List-Unsubscribe") == [f"<{UNSUB}>"]
    assert out.get_all("List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"]
    assert out.get("X-Optout-Campaign") is None and out.get("X-Optout-Topic") is None
    # Headers the relay does not own keep their bytes, folding included.
    assert b"Subject: hi\r\n  folded on\r\n" in render(raw)


@pytest.mark.parametrize(
    ("charset", "cte"),
    [(cs, cte) for cs in ("utf-8", "iso-8859-1") for cte in ("quoted-printable", "base64", "8bit")]
    + [("us-ascii", "7bit")],
)
def test_text_parts_keep_charset_and_encoding(charset: str, cte: str) -> None:
    body = "Grüße aus dem Laden\n" if cte != "7bit" else "Hello from the shop\n"
    out = parsed(render(simple("text/plain", body, charset, cte)))
    assert out.get_content_charset() == charset
    assert out["Content-Transfer-Encoding"] == cte
    text = text_of(out, "text/plain").replace("\r\n", "\n")
    assert text.startswith(body)
    assert UNSUB in text


def test_html_link_and_pixel_go_before_the_real_body_close() -> None:
    html = (
        "<HTML><BODY><p>Hi</p><!-- </body> in a comment -->"
        "<script>var s = '</body>';</script><!--[if mso]><p>mso</p><![endif]-->"
        "</BODY></HTML>"
    )
    out = text_of(parsed(render(simple("text/html", html))), "text/html").rstrip()
    assert out.endswith("</BODY></HTML>")
    insert = out.index(f'<a href="{UNSUB}"')
    assert insert > out.index("<![endif]-->")
    assert out.index(f'<img src="{PIXEL}"') < out.rindex("</BODY>")


def test_html_without_body_gets_the_footer_at_the_end() -> None:
    out = text_of(parsed(render(simple("text/html", "<p>fragment</p>"))), "text/html")
    assert out.startswith("<p>fragment</p>")
    assert UNSUB in out and PIXEL in out


def test_placeholder_is_filled_and_no_footer_added() -> None:
    html = '<html><body><a href="%unsubscribe_url%">Leave</a></body></html>'
    out = text_of(parsed(render(simple("text/html", html))), "text/html")
    assert out.count(UNSUB) == 1
    assert f'<a href="{UNSUB}">Leave</a>' in out
    assert "%unsubscribe_url%" not in out
    assert PIXEL in out


def test_signed_messages_keep_their_body_bytes() -> None:
    body = (
        b"--sig\r\nContent-Type: text/plain\r\n\r\nsigned text\r\n--sig\r\n"
        b"Content-Type: application/pkcs7-signature\r\n\r\nAAAA\r\n--sig--\r\n"
    )
    raw = (
        b"From: a@shop.example\r\nContent-Type: multipart/signed; boundary=sig;"
        b' protocol="application/pkcs7-signature"\r\n\r\n' + body
    )
    out = render(raw)
    assert out.endswith(b"\r\n\r\n" + body)
    assert f"List-Unsubscribe: <{UNSUB}>".encode() in out


def test_attachments_are_not_touched() -> None:
    message = EmailMessage()
    message["From"] = "a@shop.example"
    message.set_content("Main text\n")
    message.add_attachment(
        "<html><body>attached</body></html>", subtype="html", filename="page.html"
    )
    raw = crlf(message)
    out = parsed(render(raw))
    attached = [p for p in out.walk() if p.get_filename() == "page.html"]
    assert UNSUB not in text_of(attached[0], "text/html")
    assert UNSUB in text_of(out, "text/plain")


def test_broken_mime_still_gets_headers_and_keeps_its_body() -> None:
    raw = (
        b"From: a@shop.example\r\nContent-Type: multipart/mixed; boundary=nothere\r\n\r\n"
        b"no delimiter at all\r\n"
    )
    template = build_template(raw, Decorations())
    assert any(note.startswith("rewrite_failed") for note in template.notes)
    out = template.render(VALUES, list_unsubscribe_headers(UNSUB))
    assert out.endswith(b"\r\n\r\nno delimiter at all\r\n")
    assert b"List-Unsubscribe-Post" in out


def test_undecodable_text_is_left_alone() -> None:
    raw = (
        b"From: a@shop.example\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        b"caf\xe9 undeclared 8-bit\r\n"
    )
    out = render(raw)
    assert out.endswith(b"\r\n\r\ncaf\xe9 undeclared 8-bit\r\n")


def test_transactional_is_not_decorated() -> None:
    raw = simple("text/plain", "Your receipt\n")
    out = build_template(raw, Decorations(unsubscribe=False, pixel=False)).render({})
    assert UNSUB.encode() not in out
    assert b"List-Unsubscribe" not in out


def test_every_line_stays_within_998_octets() -> None:
    out = render(
        simple("text/html", "<html><body>" + "x" * 500 + "</body></html>", cte="quoted-printable")
    )
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
