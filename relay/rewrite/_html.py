"""Where a footer goes in an HTML part, found by tokenizing as a browser does.

The tokenizer follows the WHATWG tokenization states that decide what is markup: comments
(including the abrupt `<!-->` and `--!>` forms), bogus comments and declarations, raw text and
RCDATA elements whose content is never markup (`</body>` inside a script or a title is text),
quoted attribute values that may hold `>`, CDATA in SVG/MathML. It only reports where tags are;
the document is never re-serialised.

Outlook's conditional comments matter too: `<!--[if mso]>...<![endif]-->` is one comment, so
nothing inside it counts, while `<!--[if !mso]><!-->...<!--<![endif]-->` and `<![if ...]>...
<![endif]>` reveal their content to every client but the ones the condition excludes. A footer
put inside such a region would be hidden from Outlook, so it goes after the region instead.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from html.entities import html5 as _ENTITIES

from ..mime import MimeLimitError

_TAG_NAME = re.compile(r"[A-Za-z][^\t\n\f\r />]*")
# Attributes up to (not including) the closing ">": a quote only opens a value after "=".
# Possessive throughout: nothing follows, so backtracking could never change the match, and
# without it the regex engine keeps no state per attribute (a tag with nine million of them
# cost gigabytes).
_ATTRIBUTES = re.compile(
    r"""(?:[\t\n\f\r /]++"""
    r"""|[^\t\n\f\r />][^\t\n\f\r /=>]*+"""
    r"""(?:[\t\n\f\r ]*+=[\t\n\f\r ]*+(?:"[^"]*+(?:"|\Z)|'[^']*+(?:'|\Z)|[^\t\n\f\r >]++))?+)*+"""
)
_COMMENT_END = re.compile(r"--!?>")
_RAW_TEXT = frozenset(
    {"script", "style", "xmp", "iframe", "noembed", "noframes", "title", "textarea"}
)
_RAW_TEXT_END = {
    name: re.compile(rf"</{name}[\t\n\f\r />]", re.IGNORECASE | re.ASCII) for name in _RAW_TEXT
}
_FOREIGN = frozenset({"svg", "math"})
# Names whose tags change what follows (raw text, foreign content, plaintext) or are what we
# look for (body, html): these always take the careful path below.
_SPECIAL = frozenset({*_RAW_TEXT, *_FOREIGN, "plaintext", "body", "html"})
_LINK_TAGS = frozenset({"a", "area"})
_IMAGE_TAGS = frozenset({"img"})


def _ordinary_item(special: frozenset[str] | None) -> str:
    """A run of text and ordinary tags, matched in one go: most of a campaign's markup. It
    stops before comments, declarations, special tags and anything unterminated, which the
    tokenizer proper handles; possessive quantifiers keep it linear on any input.

    `special` None: the run does not look at tag names; the caller bounds it (`endpos`)
    before the next special tag instead, which costs half as much as a lookahead at every
    tag. Names compare ASCII case-insensitively, as in browsers."""
    names = "|".join(sorted(special or ()))
    not_special = "" if special is None else rf"(?!(?ai:{names})[\t\n\f\r />])"
    return (
        r"(?:[^<]++"
        r"|<(?![A-Za-z!?/])"
        rf"|</?+{not_special}[A-Za-z][^\t\n\f\r />]*+"
        r"""(?:[\t\n\f\r /]++"""
        r"""|[^\t\n\f\r />][^\t\n\f\r /=>]*+"""
        # After "=" a value must follow (or the ">"): a quote closed only past where the run
        # may go fails the tag, rather than reading its "=" as the start of a name.
        r"""(?:(?=[\t\n\f\r ]*+=)[\t\n\f\r ]*+=[\t\n\f\r ]*+"""
        r"""(?:"[^"]*+"|'[^']*+'|[^\t\n\f\r >"']++|(?=>))|(?![\t\n\f\r ]*+=)))*+>"""
        r")"
    )


def _ordinary_run(special: frozenset[str] | None) -> re.Pattern[str]:
    return re.compile(_ordinary_item(special) + "*+")


_ORDINARY_RUN = _ordinary_run(_SPECIAL)
# The same, stopping at <a> and <area> too, for finding links.
_ORDINARY_RUN_LINKS = _ordinary_run(_SPECIAL | _LINK_TAGS)
# The same, stopping at <img> too, for telling whether a part has images of its own.
_ORDINARY_RUN_IMAGES = _ordinary_run(_SPECIAL | _IMAGE_TAGS)
# One item of `_ordinary_run(None)`: text, a "<" that is text, or one tag.
_ANY_ITEM = re.compile(_ordinary_item(None))
# Most of a campaign's tags, in a simpler grammar that reads them as the one above does:
# names of letters, digits and -_:. only, each value double-quoted right after its "=",
# white space between attributes. A quote can then only be a value's, so such a tag ends
# where the tokenizer proper ends it; the rest (any other shape) is left to `_ANY_ITEM`.
# A third cheaper per character than `_ordinary_run(None)`: the tokenizer's main cost.
_COMMON_RUN = re.compile(
    r"(?:[^<]++"
    r"|<(?![A-Za-z!?/])"
    r"|</?+[A-Za-z][^\t\n\f\r />]*+"
    r'(?:[\t\n\f\r ]++[A-Za-z_:][-A-Za-z0-9_:.]*+(?:="[^"]*+")?+)*+'
    r"[\t\n\f\r ]*+/?+>"
    r")*+"
)


def _special_opening(names: frozenset[str]) -> re.Pattern[str]:
    return re.compile(rf"</?+(?:{'|'.join(sorted(names))})[\t\n\f\r />]")


_SPECIAL_OPENING = {
    names: _special_opening(names)
    for names in (_SPECIAL, _SPECIAL | _LINK_TAGS, _SPECIAL | _IMAGE_TAGS)
}


class _SpecialTags:
    """Where the next tag with a special name may start, found in a lowercased copy of the
    text (a plain search: no case folding, no attributes), so that runs of ordinary markup
    need not check each tag's name."""

    def __init__(self, lowered: str, names: frozenset[str]) -> None:
        self._lowered = lowered
        self._opening = _SPECIAL_OPENING[names]
        self._next = -1

    @classmethod
    def of(cls, text: str, names: frozenset[str]) -> _SpecialTags | None:
        """None when lowercasing moves offsets: a character that becomes two (U+0130)."""
        lowered = text.lower()
        return cls(lowered, names) if len(lowered) == len(text) else None

    def first_from(self, pos: int) -> int:
        """The first candidate at or after `pos`; the text's length if there is none."""
        if pos > self._next:
            found = self._opening.search(self._lowered, pos)
            self._next = found.start() if found else len(self._lowered)
        return self._next


# One attribute inside a tag: its name, then its value's span (quoted or not), if any.
_ATTRIBUTE = re.compile(
    r"""[\t\n\f\r /]*([^\t\n\f\r />][^\t\n\f\r /=>]*)"""
    r"""(?:[\t\n\f\r ]*=[\t\n\f\r ]*(?:"([^"]*)"|'([^']*)'|([^\t\n\f\r >]+)))?"""
)
_CHARREF = re.compile(r"&(?:#[0-9]+;?|#[xX][0-9A-Fa-f]+;?|[A-Za-z][A-Za-z0-9]*;?)")
_META_CHARSET = re.compile(
    rb"""<meta\b[^>]*?charset\s*=\s*["']?\s*([A-Za-z0-9_.:+-]+)""", re.IGNORECASE
)


class Kind(Enum):
    START = "start"
    END = "end"
    COMMENT = "comment"
    DECLARATION = "declaration"  # doctype, bogus comment, <![...]>


@dataclass(frozen=True, slots=True)
class Token:
    kind: Kind
    start: int
    end: int
    name: str = ""  # lowercased tag name
    content: str = ""  # what a comment or declaration holds


@dataclass(slots=True)
class Scan:
    """The tokens, and where an unterminated construct (swallowing the rest) began, if any."""

    tokens: list[Token]
    open_from: int


def tokenize(
    text: str,
    *,
    links: bool = False,
    images: bool = False,
    careful: bool = False,
    max_tokens: int = 0,
) -> Scan:
    """`links`: record <a> and <area> start tags too (for click tracking); `images`: <img>
    (not with `links`). `careful`: check each tag's name as it goes (the same tokens, more
    slowly; for tests). `max_tokens`: MimeLimitError once more tokens than that would be
    kept (0: no limit)."""
    tokens: list[Token] = []
    if links:
        names, ordinary = _SPECIAL | _LINK_TAGS, _ORDINARY_RUN_LINKS
    elif images:
        names, ordinary = _SPECIAL | _IMAGE_TAGS, _ORDINARY_RUN_IMAGES
    else:
        names, ordinary = _SPECIAL, _ORDINARY_RUN
    specials = None if careful else _SpecialTags.of(text, names)
    open_from = _tokenize(text, tokens, names, ordinary, specials, max_tokens)
    return Scan(tokens, open_from)


def _tokenize(
    text: str,
    out: list[Token],
    names: frozenset[str],
    ordinary: re.Pattern[str],
    specials: _SpecialTags | None,
    max_tokens: int,
) -> int:
    """Tokens that matter: comments, declarations and tags named in `names`. Other tags
    are skipped, not recorded, also when a run of ordinary markup stopped short of one."""
    pos = 0
    n = len(text)
    foreign = 0
    while True:
        if specials is None:
            run = ordinary.match(text, pos)
            if run is not None:
                pos = run.end()
        else:
            pos = _ordinary_markup(text, pos, specials.first_from(pos))
        lt = text.find("<", pos)
        if lt < 0 or lt + 1 >= n:
            return n
        nxt = text[lt + 1]
        if nxt == "!":
            if text.startswith("<!--", lt):
                token = _comment(text, lt)
            elif foreign and text.startswith("<![CDATA[", lt):
                close = text.find("]]>", lt + 9)
                if close < 0:
                    return lt
                pos = close + 3
                continue
            else:
                token = _bogus(text, lt, lt + 2, Kind.DECLARATION)
        elif nxt == "?":
            token = _bogus(text, lt, lt + 1, Kind.COMMENT)
        elif nxt == "/":
            if text.startswith(">", lt + 2):  # "</>" is dropped
                pos = lt + 3
                continue
            name = _TAG_NAME.match(text, lt + 2)
            if name:
                token = _tag(text, lt, name, Kind.END)
            else:
                token = _bogus(text, lt, lt + 2, Kind.COMMENT)
        elif nxt.isascii() and nxt.isalpha():
            token = _tag(text, lt, _TAG_NAME.match(text, lt + 1), Kind.START)
        else:
            pos = lt + 1  # a "<" that is just text
            continue
        if token is None:
            return lt
        if not token.name or token.name in names:
            if max_tokens and len(out) >= max_tokens:
                raise MimeLimitError(f"an HTML part with more than {max_tokens} tags and comments")
            out.append(token)
        pos = token.end
        if token.kind is Kind.START:
            if token.name in _FOREIGN:
                foreign += 1
            if token.name == "plaintext":
                return n
            if token.name in _RAW_TEXT and not foreign:
                found = _RAW_TEXT_END[token.name].search(text, pos)
                if found is None:
                    return token.start  # the element swallows the rest of the document
                pos = found.start()
        elif token.kind is Kind.END and token.name in _FOREIGN and foreign:
            foreign -= 1


def _ordinary_markup(text: str, pos: int, end: int) -> int:
    """Past the run of text and ordinary tags at `pos`, up to `end` at most: in the common
    grammar while it goes, one item in the full one where it stops."""
    while True:
        pos = _COMMON_RUN.match(text, pos, end).end()  # type: ignore[union-attr]  # *+
        item = _ANY_ITEM.match(text, pos, end)
        if item is None:
            return pos
        pos = item.end()


def _comment(text: str, lt: int) -> Token | None:
    body = lt + 4
    for abrupt in (">", "->"):  # "<!-->" and "<!--->" are complete, empty comments
        if text.startswith(abrupt, body):
            return Token(Kind.COMMENT, lt, body + len(abrupt))
    found = _COMMENT_END.search(text, body)
    if found is None:
        return None
    return Token(Kind.COMMENT, lt, found.end(), content=text[body : found.start()])


def _bogus(text: str, lt: int, body: int, kind: Kind) -> Token | None:
    gt = text.find(">", body)
    if gt < 0:
        return None
    return Token(kind, lt, gt + 1, content=text[body:gt])


def _tag(text: str, lt: int, name: re.Match[str] | None, kind: Kind) -> Token | None:
    assert name is not None
    attributes = _ATTRIBUTES.match(text, name.end())
    end = attributes.end() if attributes else name.end()
    if end >= len(text):
        return None
    return Token(kind, lt, end + 1, name=name.group().lower())


def _opens_region(token: Token) -> bool:
    content = token.content.strip()
    if token.kind is Kind.COMMENT:  # <!--[if !mso]><!-->
        return content.lower().startswith("[if") and content.endswith(("<!", "<!--"))
    return token.kind is Kind.DECLARATION and content.lower().startswith("[if")  # <![if ...]>


def _closes_region(token: Token) -> bool:
    content = token.content.strip().lower()
    if token.kind is Kind.COMMENT:  # <!--<![endif]-->
        return content == "<![endif]"
    return token.kind is Kind.DECLARATION and content == "[endif]"  # <![endif]>


def _conditional_regions(tokens: Iterator[Token] | list[Token]) -> Iterator[tuple[Token, int]]:
    """Each token with the position after the outermost revealed region it is in (-1: none)."""
    pending: list[Token] = []
    depth = 0
    for token in tokens:
        if _opens_region(token):
            depth += 1
        elif _closes_region(token) and depth:
            depth -= 1
            if depth == 0:
                yield from ((held, token.end) for held in pending)
                pending.clear()
            continue
        if depth:
            pending.append(token)
        else:
            yield token, -1
    yield from ((held, -1) for held in pending)  # a region never closed


def insertion_point(text: str, max_tokens: int = 0, scan: Scan | None = None) -> int:
    """Before the last real `</body>`; else before the last `</html>`; else at the end.

    "The end" stops short of trailing whitespace and of any construct left open at the end of
    the document (an unclosed comment or script would swallow the footer). `scan`: the
    text's tokens, when the caller has them.
    """
    if scan is None:
        scan = tokenize(text, max_tokens=max_tokens)
    body: tuple[Token, int] | None = None
    html: tuple[Token, int] | None = None
    for token, region_end in _conditional_regions(scan.tokens):
        if token.kind is Kind.END and token.name == "body":
            body = (token, region_end)
        elif token.kind is Kind.END and token.name == "html":
            html = (token, region_end)
    chosen = body or html
    if chosen is not None:
        token, region_end = chosen
        return region_end if region_end >= 0 else token.start
    end = scan.open_from
    while end and text[end - 1] in " \t\r\n\f":
        end -= 1
    return end


@dataclass(frozen=True, slots=True)
class Link:
    """The href of an <a> or <area> start tag: its value's span in the text, as written."""

    start: int  # inside the quotes, if any
    end: int
    quoted: bool
    value: str  # character references not yet resolved
    notrack: bool  # the tag has a data-optout-notrack attribute


def links(text: str, max_tokens: int = 0, max_attributes: int = 0) -> list[Link]:
    """Every link a browser would see, in document order: not those in comments (Outlook's
    `<!--[if mso]>` blocks included), scripts, titles or other raw text. A tag with more than
    `max_attributes` attributes is not read past them (its link, if any, is not reported)."""
    found = []
    for token in tokenize(text, links=True, max_tokens=max_tokens).tokens:
        if token.kind is Kind.START and token.name in _LINK_TAGS:
            link = _link(text, token, max_attributes)
            if link is not None:
                found.append(link)
    return found


def _link(text: str, token: Token, max_attributes: int = 0) -> Link | None:
    pos = token.start + 1 + len(token.name)
    end = token.end - 1  # the ">"
    seen: set[str] = set()
    href: tuple[int, int, bool] | None = None
    notrack = False
    count = 0
    while pos < end:
        count += 1
        if max_attributes and count > max_attributes:
            return None  # past the bound on work: the link stays as the sender wrote it
        attribute = _ATTRIBUTE.match(text, pos, end)
        if attribute is None:
            break
        pos = attribute.end()
        name = attribute.group(1).lower()
        if name in seen:
            continue  # a repeated attribute is ignored by browsers: the first one counts
        seen.add(name)
        if name == "data-optout-notrack":
            notrack = True
        elif name == "href":
            group = next((g for g in (2, 3, 4) if attribute.group(g) is not None), None)
            if group is not None:
                href = (attribute.start(group), attribute.end(group), group != 4)
    if href is None:
        return None
    start, stop, quoted = href
    return Link(start, stop, quoted, text[start:stop], notrack)


def attribute_value(raw: str) -> str:
    """An attribute value as a browser reads it: character references resolved, except a
    named one without its ";" followed by "=" or a letter or digit, which in an attribute
    is left as written (`?a=1&copy=2` keeps its `&copy`)."""
    if "&" not in raw:
        return raw

    def resolve(found: re.Match[str]) -> str:
        ref = found.group()
        name = ref[1:]
        if name.startswith("#"):
            return html.unescape(ref)
        if name in _ENTITIES and (name.endswith(";") or raw[found.end() : found.end() + 1] != "="):
            return html.unescape(ref)
        return ref  # unknown, or a legacy name run into what follows: browsers keep it

    return _CHARREF.sub(resolve, raw)


def sniff_charset(data: bytes) -> str | None:
    """The charset an HTML document declares in a <meta>, as browsers honour it."""
    found = _META_CHARSET.search(data[:4096])
    return found.group(1).decode("ascii").lower() if found else None


def attributes(text: str, token: Token, max_attributes: int = 0) -> dict[str, str]:
    """A start tag's attributes by lowercased name (the first of a repeated name counts, as
    in browsers), values with character references resolved."""
    found: dict[str, str] = {}
    pos = token.start + 1 + len(token.name)
    end = token.end - 1
    count = 0
    while pos < end and (not max_attributes or count < max_attributes):
        attribute = _ATTRIBUTE.match(text, pos, end)
        if attribute is None:
            break
        count += 1
        pos = attribute.end()
        value = next((g for g in attribute.groups()[1:] if g is not None), "")
        found.setdefault(attribute.group(1).lower(), html.unescape(value))
    return found


def raw_text(text: str, token: Token) -> str:
    """What a raw text element (style, script, ...) holds, up to its end tag."""
    closing = _RAW_TEXT_END.get(token.name)
    if closing is None:
        return ""
    found = closing.search(text, token.end)
    return text[token.end : found.start() if found else len(text)]
