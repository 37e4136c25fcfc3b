"""The first rewrite: owned headers, footers, pixel, placeholders, untouchable parts."""

from __future__ import annotations

import email
import email.policy
import tracemalloc
from email.message import EmailMessage, Message

import pytest

from relay.rewrite import (
    BodyCache,
    Decorations,
    Hole,
    LinkHole,
    build_template,
    list_unsubscribe_headers,
)

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


# -- byte preservation: only the lines around an insertion are re-encoded --------------------------


def body_of(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[1]


def test_base64_keeps_the_senders_lines_before_the_footer() -> None:
    html = (
        "<html><body>" + "<p>Grüße aus dem Laden, alles reduziert.</p>\n" * 200 + "</body></html>\n"
    )
    raw = simple("text/html", html, cte="base64")
    out = render(raw)
    original, rewritten = body_of(raw).split(b"\r\n"), body_of(out).split(b"\r\n")
    kept = next(i for i, (a, b) in enumerate(zip(original, rewritten, strict=False)) if a != b)
    assert kept >= len(original) - 3  # all but the last line or two are the sender's bytes
    assert all(len(line) <= 76 for line in rewritten)
    assert text_of(parsed(out), "text/html").startswith(html[: -len("</body></html>\n")])


def test_quoted_printable_keeps_every_line_it_does_not_change() -> None:
    html = (
        "<html><body>\n"
        + "<p>Caf\u00e9 = caf\u00e9, line number %d.</p>\n" * 50
        + "</body></html>\n"
    )
    raw = simple("text/html", html % tuple(range(50)), cte="quoted-printable")
    original = body_of(raw).split(b"\r\n")
    rewritten = body_of(render(raw)).split(b"\r\n")
    assert rewritten[: len(original) - 2] == original[:-2]  # up to the </body> line
    assert rewritten[-2:] == original[-2:]


def test_quoted_printable_minified_html_reencodes_only_the_soft_lines_it_touches() -> None:
    html = "<html><body>" + "<td>x</td>" * 800 + "</body></html>"  # one 8 KB line
    raw = simple("text/html", html, cte="quoted-printable")
    original = body_of(raw).split(b"\r\n")
    rewritten = body_of(render(raw)).split(b"\r\n")
    assert rewritten[: len(original) - 3] == original[: len(original) - 3]
    assert UNSUB in text_of(parsed(render(raw)), "text/html")


def test_iso_2022_jp_keeps_its_escape_sequences() -> None:
    text = "お知らせ\n春のセールを開催します。\n"
    raw = (
        b"From: a@shop.example\r\nContent-Type: text/plain; charset=ISO-2022-JP\r\n"
        b"Content-Transfer-Encoding: 7bit\r\n\r\n"
        + text.replace("\n", "\r\n").encode("iso-2022-jp")
    )
    out = render(raw)
    assert out.split(b"\r\n\r\n", 1)[1].startswith(text.replace("\n", "\r\n").encode("iso-2022-jp"))
    assert out.isascii()
    assert UNSUB in text_of(parsed(out), "text/plain")


# -- the next hop without 8BITMIME ----------------------------------------------------------------


def test_without_8bitmime_8bit_parts_go_as_quoted_printable_and_say_so() -> None:
    message = EmailMessage()
    message["From"] = "a@shop.example"
    message.set_content("Grüße\n", cte="8bit")
    message.add_attachment(b"\x00\xff binary", maintype="application", subtype="octet-stream")
    raw = crlf(message).replace(
        b"Content-Transfer-Encoding: base64", b"Content-Transfer-Encoding: 8bit", 1
    )
    template = build_template(raw, Decorations())
    eight = template.render(VALUES, list_unsubscribe_headers(UNSUB))
    seven = template.render(VALUES, list_unsubscribe_headers(UNSUB), eight_bit_ok=False)
    assert b"Content-Transfer-Encoding: 8bit" in eight and not eight.isascii()
    assert seven.isascii()
    assert b"Content-Transfer-Encoding: quoted-printable" in seven
    assert text_of(parsed(seven), "text/plain") == text_of(parsed(eight), "text/plain")


def test_unchanged_8bit_attachment_goes_as_base64_without_8bitmime() -> None:
    raw = (
        b"From: a@shop.example\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
        b"--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n\xe9\xe8 data\r\n--b--\r\n"
    )
    seven = build_template(raw, Decorations()).render(VALUES, eight_bit_ok=False)
    attachment = next(
        p for p in parsed(seven).walk() if p.get_content_type() == "application/octet-stream"
    )
    assert attachment["Content-Transfer-Encoding"] == "base64"
    assert attachment.get_payload(decode=True) == b"\xe9\xe8 data"
    assert render(raw).endswith(b"\xe9\xe8 data\r\n--b--\r\n")  # with 8BITMIME: as sent


def test_a_signed_8bit_part_cannot_be_downgraded_and_a_note_says_so() -> None:
    raw = (
        b"From: a@shop.example\r\nContent-Type: multipart/signed; boundary=s;"
        b' protocol="application/pgp-signature"\r\n\r\n'
        b"--s\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n--s\r\n"
        b"Content-Type: application/pgp-signature\r\n\r\nSIG\r\n--s--\r\n"
    )
    template = build_template(raw, Decorations())
    assert any("cannot be downgraded" in note for note in template.notes)
    assert template.render(VALUES, eight_bit_ok=False).endswith(body_of(raw))


# -- lines stay within 998 octets -----------------------------------------------------------------


def test_a_long_url_on_a_long_8bit_line_sends_that_copy_as_quoted_printable() -> None:
    line = "<p>" + "é" * 400 + '<a href="%unsubscribe_url%">leave</a></p>'
    raw = simple("text/html", f"<html><body>{line}</body></html>\n", cte="8bit")
    template = build_template(raw, Decorations())
    short = template.render(VALUES)
    assert b"Content-Transfer-Encoding: 8bit" in short
    long_url = "https://mail.shop.example/u/" + "T" * 300
    long = template.render({Hole.UNSUBSCRIBE_URL: long_url, Hole.PIXEL_URL: PIXEL})
    assert b"Content-Transfer-Encoding: quoted-printable" in long
    assert max(len(x) for x in long.split(b"\r\n")) <= 76
    assert long_url in text_of(parsed(long), "text/html")


def test_the_footer_goes_on_lines_of_its_own_after_a_long_8bit_line() -> None:
    html = "<html><body><p>" + "a" * 950 + "</p></body></html>\n"
    out = render(simple("text/html", html, cte="8bit"))
    assert max(len(x) for x in out.split(b"\r\n")) <= 998
    assert ("<p>" + "a" * 950 + "</p>").encode() + b"\r\n" in out


# -- headers -------------------------------------------------------------------------------------


def test_list_unsubscribe_folds_only_between_uris() -> None:
    short = list_unsubscribe_headers("https://m.example/u/1")
    assert short[0] == b"List-Unsubscribe: <https://m.example/u/1>\r\n"
    both = list_unsubscribe_headers(UNSUB, "mailto:u+1@mail.shop.example")
    assert both[0] == (
        f"List-Unsubscribe: <{UNSUB}>,\r\n <mailto:u+1@mail.shop.example>\r\n".encode()
    )
    assert both[1] == b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"


def test_lf_only_messages_get_lf_headers() -> None:
    raw = b"From: a@shop.example\nSubject: x\n\nhello\n"
    out = render(raw)
    assert b"\r" not in out
    assert out.startswith(b"From: a@shop.example\nSubject: x\nList-Unsubscribe: <")
    assert out.endswith(b"hello\n\n-- \nUnsubscribe: " + UNSUB.encode() + b"\n")


def test_headers_without_a_body_still_get_a_blank_line() -> None:
    out = render(b"From: a@shop.example\r\nSubject: x")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"From: a@shop.example\r\nSubject: x\r\nList-Unsubscribe: ")
    assert UNSUB.encode() in body


# -- text footer conventions ----------------------------------------------------------------------


def test_text_footer_joins_an_existing_signature() -> None:
    out = text_of(parsed(render(simple("text/plain", "Hi\n\n-- \nBob\n"))), "text/plain")
    assert out.replace("\r\n", "\n") == f"Hi\n\n-- \nBob\n\nUnsubscribe: {UNSUB}\n"


def test_text_footer_starts_a_signature_when_there_is_none() -> None:
    out = text_of(parsed(render(simple("text/plain", "Hi there"))), "text/plain")
    assert out.replace("\r\n", "\n") == f"Hi there\n\n-- \nUnsubscribe: {UNSUB}\n"


def test_flowed_text_never_flows_into_the_footer() -> None:
    raw = (
        b"From: a@shop.example\r\nContent-Type: text/plain; charset=us-ascii; format=flowed\r\n\r\n"
        b"A paragraph that flows \r\ninto this line "
    )
    out = render(raw)
    assert out.endswith(b"into this line \r\n\r\n-- \r\nUnsubscribe: " + UNSUB.encode() + b"\r\n")


def test_percent_encoded_placeholder_in_a_link_is_filled() -> None:
    html = '<html><body><a href="%25unsubscribe_url%25">Leave</a></body></html>'
    out = text_of(parsed(render(simple("text/html", html))), "text/html")
    assert f'<a href="{UNSUB}">Leave</a>' in out
    assert ">Unsubscribe</a>" not in out


def test_urls_are_escaped_in_html_and_not_in_text() -> None:
    url = "https://m.example/u/a?b=1&c=2"
    message = EmailMessage()
    message["From"] = "a@shop.example"
    message.set_content("Leave: %unsubscribe_url%\n")
    message.add_alternative('<a href="%unsubscribe_url%">x</a>', subtype="html")
    out = parsed(
        build_template(crlf(message), Decorations()).render(
            {Hole.UNSUBSCRIBE_URL: url, Hole.PIXEL_URL: PIXEL}
        )
    )
    assert f"Leave: {url}" in text_of(out, "text/plain")
    assert 'href="https://m.example/u/a?b=1&amp;c=2"' in text_of(out, "text/html")


# -- HTML insertion points -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "before"),
    [
        ("<p>a</p><!--[if !mso]><!--><p>b</p></body><!--<![endif]--></html>", "</html>"),
        ("<p>a</p><![if !mso]><p>b</p></body><![endif]></html>", "</html>"),
        ("<p>a</p></body><plaintext></body>", "</body><plaintext>"),
        ("<p>a</p><!-- never closed </body>", "<!-- never closed"),
        ("<p>a</p><script>never closed </body>", "<script>"),
        ("<p>a</p><a title='</body>'", "<a title="),
        ("<p>a</p><!--></body>", "</body>"),
        ("<p>a</p><svg><![CDATA[</body>]]></svg></body>", "</body>"),
    ],
)
def test_html_insertion_points(document: str, before: str) -> None:
    from relay.rewrite._html import insertion_point

    assert document[insertion_point(document) :].startswith(before)


# -- never a crash ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\r\n\r\n",
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n",
        b"Content-Type: text/html; charset=utf-16\r\n\r\n<html></html>",
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin",
        b"Content-Type: multipart/mixed; boundary=" + b"x" * 300 + b"\r\n\r\nbody",
        b"Content-Type: multipart/mixed; boundary=a\r\n\r\n"
        + b"--a\r\nContent-Type: multipart/mixed; boundary=a\r\n\r\n" * 60,
    ],
)
def test_odd_input_never_raises(raw: bytes) -> None:
    template = build_template(raw, Decorations())
    out = template.render(VALUES, list_unsubscribe_headers(UNSUB))
    assert b"List-Unsubscribe-Post" in out


def test_one_template_serves_many_recipients() -> None:
    template = build_template(simple("text/html", "<html><body>Hi</body></html>"), Decorations())
    copies = {
        template.render({Hole.UNSUBSCRIBE_URL: f"{UNSUB}{i}", Hole.PIXEL_URL: f"{PIXEL}{i}"})
        for i in range(20)
    }
    assert len(copies) == 20
    assert template.holes == {Hole.UNSUBSCRIBE_URL, Hole.PIXEL_URL}


def test_messages_sharing_a_body_each_render_as_if_rewritten_alone() -> None:
    """A campaign sent one message per recipient: the body's rewrite is reused (BodyCache),
    and every copy must still be exactly what the message makes on its own, its own headers
    included, while a body, a structure or decorations that differ get their own rewrite."""

    def newsletter_to(to: str, body: str = "Everything 20% off.") -> bytes:
        message = EmailMessage()
        message["From"] = "Shop <news@shop.example>"
        message["To"] = to
        message["Subject"] = "Spring sale"
        message["Message-ID"] = f"<{to.replace('@', '.')}@shop.example>"
        message["List-Unsubscribe"] = "<mailto:old@shop.example>"
        message.set_content(f"Our spring sale.\n{body}\n")
        message.add_alternative(
            f'<html><body><p>{body}</p><a href="https://shop.example/sale">Sale</a></body></html>',
            subtype="html",
        )
        message.set_boundary("sale-boundary")  # one body, as a campaign tool sends it
        return crlf(message)

    html = "<html><body><p>" + "Sale " * 30 + "</p></body></html>"
    same_body_as_html = simple("text/html", html, cte="quoted-printable")
    same_body_as_text = same_body_as_html.replace(b"text/html", b"text/plain")
    messages = [
        (newsletter_to("ann@example.org"), Decorations(clicks=True)),
        (newsletter_to("a-much-longer-address@example.org"), Decorations(clicks=True)),
        (newsletter_to("bob@example.org"), Decorations(clicks=True)),
        (newsletter_to("bob@example.org"), Decorations(unsubscribe=False, pixel=False)),
        (newsletter_to("bob@example.org", "All 30% off."), Decorations(clicks=True)),
        (same_body_as_html, Decorations()),
        (same_body_as_text, Decorations()),
        (simple("text/html", html, cte="8bit"), Decorations()),
        (simple("text/html", html, cte="8bit"), Decorations()),
    ]
    bodies = BodyCache()
    values = {**VALUES, LinkHole(0): "https://mail.shop.example/c/TOKEN-3"}
    seen = set()
    for raw, decorations in messages:
        alone = build_template(raw, decorations)
        reused = build_template(raw, decorations, bodies=bodies)
        for template in (alone, reused):
            assert template.render(values, list_unsubscribe_headers(UNSUB)) == alone.render(
                values, list_unsubscribe_headers(UNSUB)
            )
            assert (template.notes, template.holes, template.links) == (
                alone.notes,
                alone.holes,
                alone.links,
            )
        copy = parsed(reused.render(values, list_unsubscribe_headers(UNSUB)))
        assert copy["List-Unsubscribe"] == f"<{UNSUB}>"
        seen.add(reused.render(values, list_unsubscribe_headers(UNSUB)))
    assert len(seen) == len(messages) - 1  # only the last two messages are the same
    ann, longer, _, bare, other, as_html, as_text, _, _ = (
        parsed(build_template(raw, d, bodies=bodies).render(values)) for raw, d in messages
    )
    assert ann["To"] == "ann@example.org" and longer["To"].startswith("a-much-longer")
    assert "https://mail.shop.example/c/TOKEN-3" in text_of(ann, "text/html")
    assert UNSUB not in text_of(bare, "text/html")
    assert "All 30% off." in text_of(other, "text/html")
    assert PIXEL in text_of(as_html, "text/html")
    assert PIXEL not in text_of(as_text, "text/plain") and UNSUB in text_of(as_text, "text/plain")


def test_a_kept_base64_body_stays_near_its_size_whatever_the_token_lengths() -> None:
    """A base64 body is re-encoded around each copy's URLs; what is kept for reuse must not
    grow with every URL length a campaign's copies bring (the body cache keeps it)."""
    paragraphs = "".join(f"<p>Paragraph {i} of the spring news.</p>\n" for i in range(4000))
    html = f'<html><body><a href="https://shop.example/sale">Sale</a>{paragraphs}</body></html>'
    raw = simple("text/html", html, cte="base64")
    template = build_template(raw, Decorations(clicks=True), bodies=BodyCache())
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for length in range(40, 120):  # every phase a line of base64 can start at, and more
            token = "T" * length
            copy = template.render(
                {**VALUES, LinkHole(0): f"https://mail.shop.example/c/{token}"},
                list_unsubscribe_headers(UNSUB),
            )
            assert text_of(parsed(copy), "text/html").startswith(
                f'<html><body><a href="https://mail.shop.example/c/{token}">Sale</a>'
            )
        kept = sum(
            stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(before, "filename")
        )
    finally:
        tracemalloc.stop()
    assert kept < 8 * len(raw), f"{kept:,} bytes kept for a {len(raw):,}-byte message"
