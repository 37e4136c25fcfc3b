"""Parse once, personalise many: a message becomes a template of the sender's bytes and holes.

Building the template walks the MIME tree once, decides which text parts carry the unsubscribe
footer and the pixel, finds where they go with a real HTML tokenizer, and compiles each changed
part into chunks for its own transfer encoding. Rendering a recipient joins those chunks with
the recipient's URLs; every byte the relay has no reason to change is the sender's byte.

A message the walker cannot follow is still delivered as it came, with the relay's headers and a
`rewrite_failed: ...` note: a compliance relay must never be the reason a mail is lost. A message
past the limits on work (`MimeLimits`) is not rewritten either; where it is a multipart/mixed, a
text part with the unsubscribe link joins it at the end, and `Template.over_limit` says why, so
that the pipeline can refuse to send the rest without a link.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message

from ..mime import (
    HeaderField,
    MimeError,
    MimeLimitError,
    MimeLimits,
    entity_bounds,
    first_non_header,
    header_fields,
    headers_of,
    parse_headers,
)
from ._bodies import BodyCache, BuiltBody
from ._compile import (
    Decoded,
    base64_part,
    byte_edits,
    decode,
    qp_part,
    raw_part,
    seven_bit,
)
from ._encoding import line_ending
from ._footer import Edit, html_footer, link_edits, placeholders, text_footer
from ._html import sniff_charset
from ._parts import CteField, Downgrade, Hole, HoleKey, LinkHole, Piece, Switch
from ._walk import Leaf, Tree, appendable, walk

CONTROL_HEADER_PREFIX = "x-optout-"
# Replaced by ours (RFC 8058 wants exactly one of each).
OWNED_HEADERS = frozenset({"list-unsubscribe", "list-unsubscribe-post"})
FOLD_AT = 78  # RFC 5322 2.1.1's "should"


@dataclass(frozen=True, slots=True)
class Decorations:
    """What this message gets: decided by policy from the control headers."""

    unsubscribe: bool = True
    pixel: bool = True
    clicks: bool = False  # HTML links become click-tracking URLs (LinkHole per link)
    # False for automatic mail (bounces, auto-replies): its own List-* fields stay as sent.
    replace_list_headers: bool = True
    postal_address: str | None = None  # the sender's, in the footer (CAN-SPAM 7704(a)(5))
    # HTML parts of at most this many characters (footer included) with no image of their
    # own get no pixel: spam filters score an image in short HTML (rewrite.pixel_min_html).
    pixel_min_html: int = 0
    # A link to the recipient's tracking preferences beside the unsubscribe link (HTML
    # footer): where someone may be tracked individually, the way to withdraw.
    preferences: bool = False


@dataclass(slots=True)
class Template:
    head: list[Piece]  # the sender's header fields the relay keeps
    body: list[Piece]  # from the blank line after the header block to the end
    decorations: Decorations
    nl: bytes = b"\r\n"  # the message's own line break, for the headers added at render
    notes: list[str] = field(default_factory=list)  # every decision, for logs and events
    holes: frozenset[Hole] = frozenset()
    links: tuple[str, ...] = ()  # LinkHole(i) is the click URL for links[i]
    # The sender's first header block has a line parsers take for the start of the body:
    # every field the relay adds then goes at the very top, as MTAs put Received fields.
    headers_at_top: bool = False
    over_limit: str | None = None  # the limit on work the message went past, if any
    trace: list[bytes] = field(default_factory=list)  # Received: first of all fields
    added: list[bytes] = field(default_factory=list)  # the same for every copy (Date, ...)

    def add_fields(self, fields: Sequence[bytes], *, trace: bool = False) -> None:
        """Header fields (CRLF-terminated) every copy gets: `trace` ones on top of all,
        the others after the sender's (or on top too, see `headers_at_top`)."""
        (self.trace if trace else self.added).extend(fields)

    def render(
        self,
        values: Mapping[HoleKey, str],
        extra_headers: Sequence[bytes] = (),
        *,
        eight_bit_ok: bool = True,
    ) -> bytes:
        """One recipient's copy. `eight_bit_ok=False` when the next hop lacks 8BITMIME: 8bit
        parts outside signed and forwarded content then go as quoted-printable (or base64)."""
        ours = [*self.added, *extra_headers]
        out = self._lines(self.trace)
        if self.headers_at_top:
            out += self._lines(ours)
        out += [p if isinstance(p, bytes) else p.render(values, eight_bit_ok) for p in self.head]
        if not self.headers_at_top:
            out += self._lines(ours)
        out.extend(p if isinstance(p, bytes) else p.render(values, eight_bit_ok) for p in self.body)
        return b"".join(out)

    def _lines(self, fields: Sequence[bytes]) -> list[bytes]:
        if self.nl == b"\n":
            return [f.replace(b"\r\n", b"\n") for f in fields]
        return list(fields)


def list_unsubscribe_headers(unsubscribe_url: str, mailto: str | None = None) -> list[bytes]:
    """List-Unsubscribe (https first, then an optional mailto) and the RFC 8058 one-click field.

    Long values are folded only after the comma between the two URIs (RFC 2369 3.1): a URI
    itself is never broken.
    """
    uris = [f"<{unsubscribe_url}>"] + ([f"<{mailto}>"] if mailto else [])
    name = "List-Unsubscribe: "
    joined = ", ".join(uris)
    value = joined if len(name) + len(joined) <= FOLD_AT else ",\r\n ".join(uris)
    return [
        f"{name}{value}\r\n".encode("ascii"),
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
    ]


def build_template(
    raw: bytes,
    decorations: Decorations,
    headers: Message | None = None,
    limits: MimeLimits | None = None,
    bodies: BodyCache | None = None,
) -> Template:
    """The template of `raw`: owned and control headers dropped, text parts opened for holes.
    `headers`: the message's header block, parsed already. `limits`: bounds on the work.
    `bodies`: bodies rewritten before, whose pieces a message with the same body reuses."""
    limits = limits or MimeLimits()
    block = headers_of(raw)
    head_end = len(block)
    template = Template([], [], decorations, nl=line_ending(block or raw))
    # Only what parsers read as the header section: from a line that is no header field on,
    # they read the body (the block is all headers when there is none).
    readable = first_non_header(block)
    template.headers_at_top = readable is not None
    if readable is not None:
        template.notes.append(
            "the header block has a line that is no header field: fields added on top"
        )
    fields = header_fields(block[:readable] if readable is not None else block)
    splices: list[Splice] = [
        Splice(start, start + len(f.raw), b"")
        for start, f in _offsets(fields)
        if not _kept(f, decorations)
    ]
    if not (decorations.unsubscribe or decorations.pixel):
        template.notes.append("body not decorated (transactional, automatic or tracking off)")
    body_key = None
    if bodies is not None and readable is None:
        body_key = bodies.key(raw, head_end, fields, template.nl, decorations, limits)
    built = bodies.get(body_key) if bodies is not None and body_key is not None else None
    if built is not None:
        template.notes += built.notes
        template.holes, template.links = built.holes, built.links
        _head(template, raw, head_end, splices)
        template.body = list(built.pieces)
        return template
    if headers is None:
        headers = parse_headers(block)
    notes_before = len(template.notes)
    body_splices: list[Splice] | None = None
    try:
        tree = walk(raw, headers, limits)
        body_splices = _Builder(raw, headers, tree, decorations, template, limits).splices()
        splices += body_splices
    except MimeLimitError as exc:
        template.over_limit = str(exc)
        _failed(template, f"over the limits on work: {exc}")
        splices = [s for s in splices if s.end <= head_end]
        if decorations.unsubscribe:
            splices += _footer_part(raw, headers, template)
    except MimeError as exc:
        _failed(template, str(exc))
        splices = [s for s in splices if s.end <= head_end]
    except MemoryError:
        raise  # the delivery process's guard stops this message's work (relay.delivery.guard)
    except Exception as exc:  # a rewriting bug must not cost the message its delivery
        _failed(template, f"unexpected {type(exc).__name__}: {exc}")
        splices = [s for s in splices if s.end <= head_end]
    splices.sort(key=lambda s: (s.start, s.end))
    _head(template, raw, head_end, [s for s in splices if s.start < head_end])
    template.body = _spliced(raw, head_end, len(raw), [s for s in splices if s.start >= head_end])
    if head_end == len(raw):
        template.body.insert(0, template.nl)  # no blank line after the headers: add one
    if (
        bodies is not None
        and body_key is not None
        and body_splices is not None
        and all(s.start >= head_end for s in body_splices)
    ):
        notes = tuple(template.notes[notes_before:])
        bodies.put(body_key, BuiltBody(tuple(template.body), template.holes, template.links, notes))
    return template


def _head(template: Template, raw: bytes, head_end: int, splices: list[Splice]) -> None:
    template.head = _spliced(raw, 0, head_end, splices)
    last = template.head[-1] if template.head else b"\n"
    if isinstance(last, bytes) and not last.endswith(b"\n"):
        template.head[-1] = last + template.nl


def _failed(template: Template, reason: str) -> None:
    """The pipeline logs the note, with the message's queue id, in the relay's own logs."""
    template.notes.append(f"rewrite_failed: {reason}")
    template.holes = frozenset()
    template.links = ()


def _footer_part(raw: bytes, headers: Message, template: Template) -> list[Splice]:
    """A text part with the unsubscribe link at the end of the message's own multipart/mixed,
    where no part of the sender's can take the footer. Never a new container around the
    message: its structure stays what the sender made."""
    place = appendable(raw, headers)
    if place is None:
        return []
    nl = template.nl
    address = template.decorations.postal_address
    charset = "us-ascii" if address is None or address.isascii() else "utf-8"
    edit = text_footer("", nl.decode("ascii"), address, charset)
    data, edits, _ = byte_edits(Decoded(b"", "", charset), [edit], False)
    part = raw_part(nl, data, edits)
    opening = b"" if place.closed or raw.endswith(b"\n") else nl
    content_type = b"Content-Type: text/plain; charset=" + charset.encode("ascii")
    head = opening + place.boundary + nl + content_type + nl
    cte = CteField(
        part,
        b"Content-Transfer-Encoding: " + (b"7bit" if charset == "us-ascii" else b"8bit") + nl,
        b"Content-Transfer-Encoding: quoted-printable" + nl,
    )
    tail = nl if place.closed else nl + place.boundary + b"--" + nl
    template.notes.append("a text part with the unsubscribe link appended to the multipart/mixed")
    template.holes = template.holes | {Hole.UNSUBSCRIBE_URL}
    at = place.at
    return [Splice(at, at, piece) for piece in (head, cte, nl, part, tail)]


@dataclass(frozen=True, slots=True)
class Splice:
    """raw[start:end] is replaced by `piece`."""

    start: int
    end: int
    piece: Piece


def _offsets(fields: list[HeaderField]) -> list[tuple[int, HeaderField]]:
    out = []
    offset = 0
    for f in fields:
        out.append((offset, f))
        offset += len(f.raw)
    return out


def _kept(field_: HeaderField, decorations: Decorations) -> bool:
    name = field_.lname
    if name.startswith(CONTROL_HEADER_PREFIX):
        return False
    return name not in OWNED_HEADERS or not decorations.replace_list_headers


def _spliced(raw: bytes, start: int, end: int, splices: list[Splice]) -> list[Piece]:
    pieces: list[Piece] = []
    cursor = start
    for splice in splices:
        pieces += [raw[cursor : splice.start], splice.piece]
        cursor = splice.end
    pieces.append(raw[cursor:end])
    merged: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += piece
        elif piece != b"":
            merged.append(piece)
    return merged


class _Builder:
    def __init__(
        self,
        raw: bytes,
        headers: Message,
        tree: Tree,
        decorations: Decorations,
        template: Template,
        limits: MimeLimits,
    ) -> None:
        self.raw = raw
        self.headers = headers
        self.tree = tree
        self.decorations = decorations
        self.template = template
        self.limits = limits
        self.notes = template.notes
        self.links: list[str] = []
        self._decoded: dict[int, Decoded] = {}  # by body offset: each body undone once

    def splices(self) -> list[Splice]:
        for sealed in self.tree.sealed:
            self.notes.append(f"{sealed.ctype} left untouched")
        decorations = self.decorations
        wanted = decorations.unsubscribe or decorations.pixel or decorations.clicks
        plan = self._plan() if wanted else {}
        out: list[Splice] = []
        holes: set[Hole] = set()
        for leaf in self.tree.leaves:
            edits = plan.get(leaf.body_start)
            if edits:
                spliced = self._changed(leaf, *edits)
                out += spliced
                holes.update(_holes_of(edits[1]))
            else:
                out += self._unchanged(leaf)
        self._undowngradable()
        self.template.holes = frozenset(holes)
        self.template.links = tuple(self.links)
        if decorations.unsubscribe and Hole.UNSUBSCRIBE_URL not in holes:
            appended = _footer_part(self.raw, self.headers, self.template)
            if not appended:
                self.notes.append("no text part could carry the unsubscribe link")
            out += appended
        elif decorations.pixel and not holes - {Hole.CLICK_URL}:
            self.notes.append("no text part could carry the pixel")
        return out

    def _plan(self) -> dict[int, tuple[str, list[Edit]]]:
        """For each leaf to change (by body offset): its text and its edits, sorted."""
        texts: dict[int, tuple[Leaf, str, str]] = {}
        for leaf in self.tree.leaves:
            if leaf.decorable:
                body = self.raw[leaf.body_start : leaf.body_end]
                try:
                    charset = self._charset(leaf)
                    decoded = self._decoded[leaf.body_start] = decode(body, leaf.cte, charset)
                except MimeError as exc:
                    raise MimeError(f"{leaf.ctype}: {exc}") from exc
                texts[leaf.body_start] = (leaf, decoded.text, charset)
        edits: dict[int, list[Edit]] = {key: [] for key in texts}
        unsubscribe = self.decorations.unsubscribe
        limits = self.limits
        if self.decorations.clicks:
            for key, (leaf, text, _) in texts.items():
                if leaf.ctype == "text/html":
                    edits[key] += link_edits(
                        text, self.links, limits.max_html_tokens, limits.max_tag_attributes
                    )
        decorations = self.decorations
        for ctype in ("text/plain", "text/html"):
            of_type = [(k, v) for k, v in texts.items() if v[0].ctype == ctype]
            html = ctype == "text/html"
            with_placeholder = False
            for key, (_, text, _) in of_type:
                found = placeholders(text, html) if unsubscribe else []
                edits[key] += found
                with_placeholder = with_placeholder or bool(found)
            if not of_type:
                continue
            key, (_, text, charset) = of_type[-1]
            footer = unsubscribe and not with_placeholder
            if html and (footer or decorations.pixel):
                edit, notes = html_footer(
                    text,
                    footer,
                    decorations.pixel,
                    max_tokens=limits.max_html_tokens,
                    postal_address=decorations.postal_address,
                    pixel_min_html=decorations.pixel_min_html,
                    preferences=decorations.preferences,
                )
                edits[key].append(edit)
                self.notes.extend(notes)
            elif not html and footer:
                edits[key].append(text_footer(text, None, decorations.postal_address, charset))
        return {
            key: (texts[key][2], sorted(found, key=lambda e: (e.start, e.end)))
            for key, found in edits.items()
            if found
        }

    def _charset(self, leaf: Leaf) -> str:
        declared = leaf.headers.get_content_charset()
        if declared:
            return declared
        if leaf.ctype == "text/html":
            # Byte-transparent first, to read the <meta> under the transfer encoding.
            body = self.raw[leaf.body_start : leaf.body_end]
            sniffed = sniff_charset(decode(body, leaf.cte, "latin-1").data)
            if sniffed:
                return sniffed
        return "us-ascii"

    def _changed(self, leaf: Leaf, charset: str, edits: list[Edit]) -> list[Splice]:
        body = self.raw[leaf.body_start : leaf.body_end]
        cte = leaf.cte
        html = leaf.ctype == "text/html"
        decoded = self._decoded.get(leaf.body_start) or decode(body, cte, charset)
        data, bedits, exact = byte_edits(decoded, edits, html)
        what = _describe(edits)
        if not exact:
            self.notes.append(
                f"{leaf.ctype} ({charset}): re-encoded whole, the charset's shifts differ at"
                " an edit; text outside the edits unchanged"
            )
        out: list[Splice] = []
        if cte == "quoted-printable":
            piece: Piece = qp_part(body, data, bedits, exact)
        elif cte == "base64":
            piece = base64_part(body, data, bedits, exact)
        else:
            piece = raw_part(body, data, bedits)
            start, end, qp_field = self._cte_field(leaf, b"quoted-printable")
            out.append(Splice(start, end, CteField(piece, self.raw[start:end], qp_field)))
        self.notes.append(f"{leaf.ctype} ({charset}, {cte}) personalised: {what}")
        out.append(Splice(leaf.body_start, leaf.body_end, piece))
        return out

    def _unchanged(self, leaf: Leaf) -> list[Splice]:
        """Nothing, unless the body is 8-bit: then a 7-bit form for hops without 8BITMIME."""
        body = self.raw[leaf.body_start : leaf.body_end]
        if leaf.cte not in ("8bit", "binary") or (body.isascii() and leaf.cte == "8bit"):
            return []
        text_type = leaf.ctype.startswith("text/")
        nl = line_ending(body)
        target = b"quoted-printable" if text_type else b"base64"
        return [
            self._cte_switch(leaf, target),
            Splice(
                leaf.body_start,
                leaf.body_end,
                Downgrade(body, lambda data: seven_bit(data, text_type, nl)),
            ),
        ]

    def _undowngradable(self) -> None:
        where = [s.ctype for s in self.tree.sealed if not self.raw[s.start : s.end].isascii()]
        where += [
            leaf.ctype
            for leaf in self.tree.leaves
            if leaf.cte not in ("8bit", "binary", "quoted-printable", "base64")
            and not self.raw[leaf.body_start : leaf.body_end].isascii()
        ]
        if where:
            self.notes.append(
                "8-bit data that cannot be downgraded for a hop without 8BITMIME: "
                + ", ".join(where)
            )

    def _cte_field(self, leaf: Leaf, encoding: bytes) -> tuple[int, int, bytes]:
        nl = line_ending(self.raw[leaf.header_start : leaf.body_start])
        new = b"Content-Transfer-Encoding: " + encoding + nl
        if leaf.cte_field is not None:
            return leaf.cte_field[0], leaf.cte_field[1], new
        at, _ = entity_bounds(self.raw, leaf.header_start, leaf.body_end)
        return at, at, new

    def _cte_switch(self, leaf: Leaf, encoding: bytes) -> Splice:
        start, end, new = self._cte_field(leaf, encoding)
        return Splice(start, end, Switch(self.raw[start:end], new))


def _holes_of(edits: list[Edit]) -> set[Hole]:
    holes = {item for e in edits for item in e.replacement if isinstance(item, Hole)}
    if any(isinstance(item, LinkHole) for e in edits for item in e.replacement):
        holes.add(Hole.CLICK_URL)
    return holes


def _describe(edits: list[Edit]) -> str:
    kinds = []
    tracked = 0
    for edit in edits:
        if any(isinstance(item, LinkHole) for item in edit.replacement):
            tracked += 1
        elif edit.start != edit.end:
            kinds.append("placeholder")
        elif Hole.UNSUBSCRIBE_URL in edit.replacement:
            kinds.append("footer" + (" and pixel" if Hole.PIXEL_URL in edit.replacement else ""))
        else:
            kinds.append("pixel")
    if tracked:
        kinds.append(f"{tracked} link{'s' if tracked > 1 else ''} tracked")
    return ", ".join(dict.fromkeys(kinds))
