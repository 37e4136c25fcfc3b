"""What the relay adds to a text part, as edits at positions of the decoded text."""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import quote

from tracking.tokens import is_redirectable

from ._colour import RGB, body_rules, declared_colours, footer_colour, parse_colour
from ._encoding import line_ending
from ._html import (
    Kind,
    Scan,
    attribute_value,
    attributes,
    insertion_point,
    links,
    raw_text,
    tokenize,
)
from ._parts import Hole, HoleKey, LinkHole

PLACEHOLDER = "%unsubscribe_url%"
# HTML editors percent-encode a placeholder typed into a link's address.
_HTML_PLACEHOLDER = re.compile(r"%unsubscribe_url%|%25unsubscribe_url%25")
_TEXT_PLACEHOLDER = re.compile(re.escape(PLACEHOLDER))
_SIGNATURE = re.compile(r"^-- \r?$", re.MULTILINE)

# Inline-styled, ASCII only (safe in any charset), each piece on its own line so that no line
# of the sender's grows and none of ours comes near 998 octets whatever the URL. The colour is
# chosen against the sender's background (_colour.py).
_LINK_OPEN = (
    '<div style="margin:0;padding:16px 8px;font-family:Arial,Helvetica,sans-serif;'
    'font-size:12px;line-height:18px;color:{colour};text-align:center">'
)
_LINK = ('<a href="', '" style="color:{colour};text-decoration:underline">Unsubscribe</a>')
_PREFERENCES = (
    ' | <a href="',
    '" style="color:{colour};text-decoration:underline">Tracking preferences</a>',
)
_PIXEL = (
    '<img src="',
    '" width="1" height="1" alt="" style="display:block;width:1px;height:1px;border:0">',
)

Replacement = tuple[str | HoleKey, ...]


@dataclass(frozen=True, slots=True)
class Edit:
    """Replace text[start:end] (empty for an insertion) by constant text and holes."""

    start: int
    end: int
    replacement: Replacement


# Longer links stay as they are: a click URL carries its destination, and must stay usable.
MAX_TRACKED_URL = 2048
MAX_TRACKED_LINKS = 1000
# Printable ASCII but the space: what a URL keeps as it is; the rest is percent-encoded.
_URL_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))
_C0_AND_SPACE = "".join(chr(c) for c in range(0x21))
_TAB_OR_NEWLINE = re.compile(r"[\t\n\r]")
_WEB = re.compile(r"https?://", re.IGNORECASE)


def link_edits(
    text: str, tracked: list[str], max_tokens: int = 0, max_attributes: int = 0
) -> list[Edit]:
    """Each trackable link's href becomes a click URL hole; its URL is appended to `tracked`.

    Left alone: links marked data-optout-notrack, anything but absolute http(s) URLs
    (mailto:, tel:, #anchors, relative), the unsubscribe placeholder, and overlong URLs.
    """
    edits = []
    for link in links(text, max_tokens, max_attributes):
        if link.notrack or len(tracked) >= MAX_TRACKED_LINKS:
            continue
        url = trackable_url(link.value)
        if url is None:
            continue
        hole = LinkHole(len(tracked))
        tracked.append(url)
        # An unquoted value gets quotes, so nothing in the URL can end the attribute.
        replacement: Replacement = (hole,) if link.quoted else ('"', hole, '"')
        edits.append(Edit(link.start, link.end, replacement))
    return edits


def trackable_url(raw: str) -> str | None:
    """The URL a browser would follow for this href value, if it is one to track."""
    if _HTML_PLACEHOLDER.search(raw):
        return None
    # As the URL parser does: outer spaces and controls go, tabs and newlines anywhere.
    url = _TAB_OR_NEWLINE.sub("", attribute_value(raw).strip(_C0_AND_SPACE))
    if not _WEB.match(url):
        return None
    url = quote(url, safe=_URL_SAFE)  # non-ASCII as UTF-8 %-escapes, as browsers send it
    if len(url) > MAX_TRACKED_URL or not is_redirectable(url):
        return None
    return url


def placeholders(text: str, html: bool) -> list[Edit]:
    pattern = _HTML_PLACEHOLDER if html else _TEXT_PLACEHOLDER
    return [Edit(m.start(), m.end(), (Hole.UNSUBSCRIBE_URL,)) for m in pattern.finditer(text)]


def html_footer(
    text: str,
    unsubscribe: bool,
    pixel: bool,
    *,
    max_tokens: int = 0,
    postal_address: str | None = None,
    pixel_min_html: int = 0,
    preferences: bool = False,
) -> tuple[Edit, list[str]]:
    """The footer (link, postal address) and the open pixel before the body's end, and the
    notes on what was decided.

    The pixel is left out of HTML of at most `pixel_min_html` characters, footer included,
    that has no image of its own: SpamAssassin's HTML_IMAGE_ONLY_* rules score any <img> in
    an HTML part of up to 3,200 characters (markup counted), and no markup that mail clients
    load as an image escapes them (README: "The footer, the open pixel and spam filters").
    """
    nl = line_ending(text)
    scan = tokenize(text, images=True, max_tokens=max_tokens)
    notes: list[str] = []
    added: list[str | Hole] = [nl]
    if unsubscribe:
        colour = footer_colour(*_body_colours(text, scan))
        added += [_LINK_OPEN.format(colour=colour), nl]
        if postal_address:
            lines = [_html_text(line) for line in postal_address.splitlines() if line.strip()]
            added += ["<br>".join(lines), "<br>", nl]
        link = _LINK[1].format(colour=colour)
        added += [_LINK[0], Hole.UNSUBSCRIBE_URL, link, nl]
        if preferences:
            added += [_PREFERENCES[0], Hole.PREFERENCES_URL, _PREFERENCES[1].format(colour=colour)]
            added += [nl]
        added += ["</div>", nl]
    if pixel:
        own_images = any(t.kind is Kind.START and t.name == "img" for t in scan.tokens)
        size = len(text) + sum(len(a) for a in added if isinstance(a, str))
        if own_images or size > pixel_min_html:
            added += [_PIXEL[0], Hole.PIXEL_URL, _PIXEL[1], nl]
        else:
            notes.append(
                f"pixel left out: HTML of {size} characters with no image of its own"
                f" (rewrite.pixel_min_html = {pixel_min_html}; SpamAssassin scores an image"
                " in short HTML)"
            )
    at = insertion_point(text, scan=scan)
    return Edit(at, at, tuple(added)), notes


def _body_colours(text: str, scan: Scan) -> tuple[RGB | None, RGB | None]:
    """(background, text colour) of the body: its bgcolor and text attributes, overridden
    by `body` rules of the document's style sheets, overridden by its own style."""
    background = foreground = None
    body = next((t for t in scan.tokens if t.kind is Kind.START and t.name == "body"), None)
    found = attributes(text, body, 200) if body is not None else {}
    if "bgcolor" in found:
        background = parse_colour(found["bgcolor"])
    if "text" in found:
        foreground = parse_colour(found["text"])
    sheets = [raw_text(text, t) for t in scan.tokens if t.kind is Kind.START and t.name == "style"]
    declarations = [rules for sheet in sheets for rules in body_rules(sheet)]
    if "style" in found:
        declarations.append(found["style"])
    for css in declarations:
        bg, fg = declared_colours(css)
        background = bg if bg is not None else background
        foreground = fg if fg is not None else foreground
    return background, foreground


def _html_text(line: str) -> str:
    """Text as HTML in ASCII: escaped, and any other character as a character reference."""
    escaped = html.escape(line.strip(), quote=False)
    return escaped.encode("ascii", "xmlcharrefreplace").decode("ascii")


def _in_charset(line: str, charset: str) -> str:
    """`line` if the part's charset can write it; else with accents dropped and anything
    else as "?" (the address stays readable in a us-ascii part)."""
    try:
        line.encode(charset)
    except (UnicodeEncodeError, LookupError):
        folded = unicodedata.normalize("NFKD", line)
        return (
            "".join(c for c in folded if not unicodedata.combining(c))
            .encode("ascii", "replace")
            .decode("ascii")
        )
    return line


def text_footer(
    text: str,
    nl: str | None = None,
    postal_address: str | None = None,
    charset: str = "utf-8",
) -> Edit:
    """At the end, as a signature block: after the sender's own, or behind a new `-- ` line.

    Mail clients hide or grey what follows `-- ` and leave it out of replies, so a recipient who
    replies or forwards does not pass their own unsubscribe link on. In format=flowed text the
    separator is the one line ending in a space that never flows (RFC 3676 4.3); a blank line
    before it ends any flowed paragraph the sender left open, and no line we add ends in a space.
    """
    nl = nl or line_ending(text)
    added: list[str | Hole] = []
    if text and not text.endswith("\n"):
        added.append(nl)
    if _SIGNATURE.search(text):
        added.append(nl)
    else:
        if text.strip("\r\n") and not text.endswith(("\n\n", "\n\r\n")):
            added.append(nl)
        added += ["-- ", nl]
    if postal_address:
        for line in postal_address.splitlines():
            if line.strip():
                added += [_in_charset(line.strip(), charset), nl]
    added += ["Unsubscribe: ", Hole.UNSUBSCRIBE_URL, nl]
    return Edit(len(text), len(text), tuple(added))
