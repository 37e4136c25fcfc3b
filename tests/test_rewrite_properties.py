"""Property tests: generated MIME trees and HTML keep the rewrite's invariants."""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import html
import itertools
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.rewrite import Decorations, build_template, list_unsubscribe_headers
from relay.rewrite._html import insertion_point, tokenize
from tests.corpus.check import UNSUB, VALUES, check_rewrite

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- HTML: the insertion point against a grammar whose answer is known -----------------------------

FILLER = [
    "<p>Hello</p>",
    "<TABLE><TR><TD>cell</TD></TR></TABLE>",
    "text &amp; more ",
    "\r\n",
    "<img src=x alt='>'>",
    "<br/>",
    "<!--[if mso]><table><tr><td><![endif]-->",
    "<!---->",
    "<!-->",
    "<?xml version='1.0'?>",
    "<!DOCTYPE html>",
    "<div class=a>",
    "</div>",
    "a < b ",
    "</ notatag>",
]
# Each holds "</body>" that is not markup: a browser sees text, a comment or an attribute.
FAKE_BODY_CLOSE = [
    "<!-- </body> -->",
    "<!--[if mso]></body></html><![endif]-->",
    "<script>var s = '</body>';</script>",
    "<SCRIPT>document.write('</BODY>')</SCRIPT>",
    "<style>/* </body> */</style>",
    "<title></body></title>",
    "<textarea></body></textarea>",
    '<a title="</body>" href="#">x</a>',
    "<a title='x > </body>'>y</a>",
    "<!-- a --!></body>"[:0] + "<!-- ok --!>",
    "<![CDATA[ x ]]>",
    "<svg><![CDATA[ </body> ]]></svg>",
    "<xmp></body></xmp>",
]
REAL_BODY_CLOSE = ["</body>", "</BODY>", "</Body >", "</body\r\n>"]
REAL_HTML_CLOSE = ["</html>", "</HTML>"]


@dataclass(frozen=True)
class Piece:
    text: str
    kind: str  # "filler", "fake", "body", "html"


pieces = st.one_of(
    st.sampled_from(FILLER).map(lambda t: Piece(t, "filler")),
    st.sampled_from(FAKE_BODY_CLOSE).map(lambda t: Piece(t, "fake")),
    st.sampled_from(REAL_BODY_CLOSE).map(lambda t: Piece(t, "body")),
    st.sampled_from(REAL_HTML_CLOSE).map(lambda t: Piece(t, "html")),
)


@SETTINGS
@given(st.lists(pieces, max_size=25))
def test_insertion_point_is_before_the_last_real_body_close(doc: list[Piece]) -> None:
    text = "".join(p.text for p in doc)
    offsets = list(itertools.accumulate((len(p.text) for p in doc), initial=0))
    starts = {
        kind: [o for o, p in zip(offsets, doc, strict=False) if p.kind == kind]
        for kind in ("body", "html")
    }
    if starts["body"]:
        expected = starts["body"][-1]
    elif starts["html"]:
        expected = starts["html"][-1]
    else:
        expected = len(text.rstrip(" \t\r\n\f"))
    assert insertion_point(text) == expected


@SETTINGS
@given(st.text(alphabet="<>/!-'\"=abody \r\n[]%?", max_size=200))
def test_insertion_point_never_fails_and_stays_inside(text: str) -> None:
    assert 0 <= insertion_point(text) <= len(text)


# Tags whose names change tokenizing, in odd spellings, and characters whose lowercase form
# is longer or is ASCII (U+0130, U+212A) or only looks like ASCII (U+017F).
TRICKY = [
    "<SCRIPT>",
    "</Script >",
    "<script",
    "<svg>",
    "</SVG>",
    "<math/>",
    "<a href='x'>",
    '<AREA alt=">">',
    "</a>",
    "<abbr>",
    "<bodyx>",
    "<body",
    "<Body\t",
    "<title>",
    "</title>",
    "<plaintext>",
    "<\u017fcript>",
    "\u0130",
    "\u212a",
    "<style>",
    "</style>",
    "é",
]


@SETTINGS
@given(
    st.lists(
        st.sampled_from([*FILLER, *FAKE_BODY_CLOSE, *REAL_BODY_CLOSE, *REAL_HTML_CLOSE, *TRICKY]),
        max_size=30,
    ).map("".join),
    st.booleans(),
)
def test_the_fast_tokenizer_finds_what_the_careful_one_finds(text: str, links: bool) -> None:
    assert tokenize(text, links=links) == tokenize(text, links=links, careful=True)


@SETTINGS
@given(st.text(alphabet="<>/!-'\"=abodysvgcrpt \r\n[]?AB\u0130", max_size=300), st.booleans())
def test_the_fast_tokenizer_agrees_on_any_text(text: str, links: bool) -> None:
    assert tokenize(text, links=links) == tokenize(text, links=links, careful=True)


# -- MIME trees ----------------------------------------------------------------------------------

CHARSETS = {
    "us-ascii": "",
    "utf-8": "äöü€✓日本",
    "iso-8859-1": "äöüßé",
    "windows-1252": "€\u201c\u201d\u2013é",
}
TEXT_BITS = [
    "Hello",
    " ",
    "\r\n",
    "-- \r\n",
    "> quoted \r\n",
    "%unsubscribe_url%",
    "=",
    "=3D",
    ".",
    "From ",
    "\t",
    "a" * 90,
]
HTML_BITS = [
    *FILLER,
    *FAKE_BODY_CLOSE,
    *REAL_BODY_CLOSE,
    "<html><body>",
    '<a href="%unsubscribe_url%">u</a>',
]


@st.composite
def text_content(draw: st.DrawFn, html: bool, charset: str) -> str:
    extra = list(CHARSETS[charset])
    bits = st.sampled_from((HTML_BITS if html else TEXT_BITS) + extra)
    return "".join(draw(st.lists(bits, max_size=30)))


def encode(data: bytes, cte: str) -> bytes:
    if cte == "base64":
        return base64.encodebytes(data).replace(b"\n", b"\r\n").rstrip(b"\r\n")
    if cte == "quoted-printable":
        return binascii.b2a_qp(data.replace(b"\r\n", b"\n"), istext=True).replace(b"\n", b"\r\n")
    return data


@st.composite
def text_leaf(draw: st.DrawFn) -> bytes:
    html = draw(st.booleans())
    charset = draw(st.sampled_from(sorted(CHARSETS)))
    content = draw(text_content(html, charset))
    data = content.encode(charset)
    ctes = ["quoted-printable", "base64"] + (
        ["8bit"] if max(map(len, data.split(b"\n"))) < 990 else []
    )
    if data.isascii() and max(map(len, data.split(b"\n"))) < 990:
        ctes.append("7bit")
    cte = draw(st.sampled_from(ctes))
    ctype = "text/html" if html else "text/plain"
    params = draw(st.sampled_from(["", "; format=flowed", "; format=flowed; delsp=yes"]))
    disposition = draw(st.sampled_from(["", "inline", "attachment; filename=x.txt"]))
    headers = f"Content-Type: {ctype}; charset={charset}{params if not html else ''}\r\n"
    headers += f"Content-Transfer-Encoding: {cte}\r\n"
    if disposition:
        headers += f"Content-Disposition: {disposition}\r\n"
    return headers.encode() + b"\r\n" + encode(data, cte)


@st.composite
def opaque_leaf(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["pdf", "png", "rfc822"]))
    if kind == "rfc822":
        inner = (
            b"From: x@y.example\r\nContent-Type: text/html\r\n\r\n<html><body>fwd</body></html>\r\n"
        )
        return b"Content-Type: message/rfc822\r\n\r\n" + inner
    payload = draw(st.binary(max_size=120))
    return (
        f"Content-Type: application/{kind}\r\nContent-Transfer-Encoding: base64\r\n"
        f"Content-Disposition: attachment; filename=f.{kind}\r\n\r\n"
    ).encode() + encode(payload, "base64")


counter = itertools.count()


def multipart(subtype: str, children: list[bytes], extra: str = "") -> bytes:
    boundary = f"=_b{next(counter)}_{subtype}"
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + c + b"\r\n" for c in children)
    body += b"--" + boundary.encode() + b"--\r\n"
    header = f'Content-Type: multipart/{subtype}; boundary="{boundary}"{extra}\r\n\r\n'
    return header.encode() + body


def signed(children: list[bytes]) -> bytes:
    inner = children[0]
    signature = b"Content-Type: application/pgp-signature\r\n\r\n-----BEGIN PGP SIGNATURE-----\r\n"
    return multipart("signed", [inner, signature], '; protocol="application/pgp-signature"')


def _branches(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    plain = st.builds(
        multipart,
        st.sampled_from(["mixed", "alternative", "related"]),
        st.lists(children, min_size=1, max_size=3),
    )
    # Repeated to weigh the draw: mostly ordinary multiparts, some signed ones.
    return st.one_of(
        plain, plain, plain, st.builds(signed, st.lists(children, min_size=1, max_size=1))
    )


trees = st.recursive(
    st.one_of(text_leaf(), text_leaf(), text_leaf(), opaque_leaf()), _branches, max_leaves=6
)


def message(tree: bytes) -> bytes:
    return (
        b"From: Shop <news@shop.example>\r\nTo: a@example.net\r\nSubject: generated\r\n"
        b"List-Unsubscribe: <mailto:old@shop.example>\r\nX-Optout-Campaign: c\r\n"
        b"MIME-Version: 1.0\r\n" + tree
    )


@SETTINGS
@given(trees)
def test_generated_messages_keep_every_invariant(tree: bytes) -> None:
    raw = message(tree)
    template = build_template(raw, Decorations())
    failed = any(n.startswith("rewrite_failed") for n in template.notes)
    assert not failed, template.notes
    out = template.render(VALUES, list_unsubscribe_headers(UNSUB))
    check_rewrite(raw, out)


@SETTINGS
@given(trees)
def test_seven_bit_rendering_says_the_same(tree: bytes) -> None:
    raw = message(tree)
    template = build_template(raw, Decorations())
    normal = template.render(VALUES, list_unsubscribe_headers(UNSUB))
    seven = template.render(VALUES, list_unsubscribe_headers(UNSUB), eight_bit_ok=False)
    if not any("cannot be downgraded" in n for n in template.notes):
        assert seven.isascii()
    a = email.message_from_bytes(normal, policy=email.policy.compat32)
    b = email.message_from_bytes(seven, policy=email.policy.compat32)
    for x, y in zip(a.walk(), b.walk(), strict=True):
        if not x.is_multipart():
            assert x.get_payload(decode=True) == y.get_payload(decode=True)
    assert max(map(len, seven.splitlines())) <= 998


def _decoded_leaves(raw: bytes, urls: dict[str, str]) -> list[bytes]:
    out = []
    for part in email.message_from_bytes(raw, policy=email.policy.compat32).walk():
        if not part.is_multipart():
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            for url, name in sorted(urls.items(), key=lambda item: -len(item[0])):
                payload = payload.replace(url.encode(), name.encode())
            out.append(payload)
    return out


tokens = st.text(alphabet="abcXYZ019-._~/?=&", min_size=1, max_size=120)


@SETTINGS
@given(trees, tokens)
def test_recipients_differ_only_by_their_urls(tree: bytes, token: str) -> None:
    raw = message(tree)
    template = build_template(raw, Decorations())
    mine = {hole: f"https://m.example/{hole}/{token}" for hole in VALUES}
    out = template.render(mine, list_unsubscribe_headers(UNSUB))
    reference = template.render(VALUES, list_unsubscribe_headers(UNSUB))
    escaped = {html.escape(url): f"<{hole}>" for hole, url in mine.items()}
    names = {**{url: f"<{hole}>" for hole, url in mine.items()}, **escaped}
    reference_names = {html.escape(url): f"<{hole}>" for hole, url in VALUES.items()}
    reference_names |= {url: f"<{hole}>" for hole, url in VALUES.items()}
    assert _decoded_leaves(out, names) == _decoded_leaves(reference, reference_names)
    assert max(map(len, out.splitlines())) <= 998
