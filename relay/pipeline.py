"""Message processing as an ordered pipeline of small named steps.

Each step reads the parsed headers and records its decision on the message's metadata, so that
what the relay did to a message can always be explained. The steps run once per message; the
per-recipient work (tokens, URLs) happens at delivery time in `PreparedMessage.personalise`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import Message
from typing import Protocol

from suppression import (
    GLOBAL,
    AddressHasher,
    InvalidScope,
    parse_scope,
    sender_scopes,
    topic_scope,
)
from tracking import RecipientRef, TrackingUrls

from .accounts import Account
from .dkim import DkimError, DkimSigner, signing_domains
from .feedback.outgoing import CopyMarks
from .from_header import from_domains
from .mime import headers_of, parse_headers
from .rewrite import (
    UNTOUCHABLE_TYPES,
    Decorations,
    Hole,
    HoleKey,
    LinkHole,
    Template,
    build_template,
    list_unsubscribe_headers,
)

log = logging.getLogger("optout.delivery")


@dataclass(slots=True)
class Metadata:
    """What the pipeline learnt and decided about one message."""

    queue_id: str
    mail_from: str
    # The message's RFC 5322 Message-ID as its events name it; None while it has none.
    message_id: str | None = None
    campaign: str | None = None
    scope: str = GLOBAL
    track_opens: bool = True
    track_clicks: bool = False
    transactional: bool = False
    rewrite_body: bool = True
    from_domain: str | None = None
    signer: DkimSigner | None = None
    account: Account | None = None
    decisions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # recorded as warning events
    # Which of Feedback-ID and CFBL-Address the sender set: ours are then not added.
    sender_feedback_fields: frozenset[str] = frozenset()

    def decide(self, step: str, decision: str) -> None:
        self.decisions.append(f"{step}: {decision}")


class Step(Protocol):
    name: str

    def process(self, headers: Message, meta: Metadata) -> None: ...


def _header(headers: Message, name: str) -> str | None:
    value = headers.get(name)
    return " ".join(str(value).split()) if value is not None else None


MAX_MESSAGE_ID = 998  # a header line's limit (RFC 5322 2.1.1): longer is not a Message-ID


def message_id_of(headers: Message) -> str | None:
    """The Message-ID as written, `<left@right>`, unfolded; None when absent or unusable.

    Only the first `<...>` is taken: a comment or a second id after it is no part of it.
    """
    value = _header(headers, "Message-ID")
    if not value:
        return None
    start = value.find("<")
    end = value.find(">", start + 1)
    if start >= 0 and end > start + 1:
        value = value[start : end + 1]
    if len(value) > MAX_MESSAGE_ID or not value.isprintable():
        return None
    return value


class ReadCampaign:
    name = "campaign"

    def process(self, headers: Message, meta: Metadata) -> None:
        campaign = _header(headers, "X-Optout-Campaign")
        if campaign:
            meta.campaign = campaign[:200]
            meta.decide(self.name, f"campaign {meta.campaign!r}")


class ReadTopic:
    name = "topic"

    def process(self, headers: Message, meta: Metadata) -> None:
        topic = _header(headers, "X-Optout-Topic")
        if not topic:
            return
        try:
            meta.scope = topic_scope(topic)
        except InvalidScope:
            meta.decide(self.name, f"ignored unusable topic {topic!r}; scope stays global")
        else:
            meta.decide(self.name, f"unsubscribe scope {meta.scope}")


class ReadCategory:
    name = "category"

    def process(self, headers: Message, meta: Metadata) -> None:
        category = (_header(headers, "X-Optout-Category") or "").lower()
        if category == "transactional":
            meta.transactional = True
            meta.track_opens = False
            meta.decide(self.name, "transactional: no tracking, no unsubscribe decoration")


class ReadTracking:
    name = "tracking"

    def process(self, headers: Message, meta: Metadata) -> None:
        if (_header(headers, "X-Optout-Track") or "").lower() == "off":
            meta.track_opens = False
            meta.decide(self.name, "open tracking off (X-Optout-Track)")


class GuardSignedContent:
    name = "signed-content"

    def process(self, headers: Message, meta: Metadata) -> None:
        ctype = headers.get_content_type()
        if ctype in UNTOUCHABLE_TYPES:
            meta.rewrite_body = False
            meta.decide(self.name, f"{ctype}: body left untouched, headers only")


class ApplyAccountDefaults:
    """The sender account's default topic and tracking choice, unless the message says."""

    name = "account"

    def process(self, headers: Message, meta: Metadata) -> None:
        account = meta.account
        if account is None:
            return
        if account.topic and meta.scope == GLOBAL and headers.get("X-Optout-Topic") is None:
            try:
                meta.scope = topic_scope(account.topic)
            except InvalidScope:
                meta.decide(self.name, f"ignored unusable default topic {account.topic!r}")
            else:
                meta.decide(self.name, f"{account.username}: default scope {meta.scope}")
        if not account.track_opens and meta.track_opens:
            meta.track_opens = False
            meta.decide(self.name, f"{account.username}: open tracking off")


class ReadFeedbackFields:
    """A sender's own Feedback-ID or CFBL-Address (RFC 9477) is kept, and ours not added."""

    name = "feedback-fields"

    def process(self, headers: Message, meta: Metadata) -> None:
        present = {n for n in ("feedback-id", "cfbl-address") if headers.get(n) is not None}
        if present:
            meta.sender_feedback_fields = frozenset(present)
            meta.decide(self.name, f"sender's own {', '.join(sorted(present))} kept")


class ReadFromDomain:
    name = "from"

    def process(self, headers: Message, meta: Metadata) -> None:
        domains = from_domains(headers)
        if len(domains) == 1:
            meta.from_domain = domains.pop()
        else:
            meta.decide(self.name, f"no single From domain ({len(domains)} found)")


class ChooseDkimKey:
    """Sign with the key of the From domain, or of its nearest parent (DMARC relaxed alignment)."""

    name = "dkim"

    def __init__(self, signers: Mapping[str, DkimSigner]) -> None:
        self.signers = signers

    def process(self, headers: Message, meta: Metadata) -> None:
        meta.signer = signer_for(self.signers, meta.from_domain)
        if meta.signer is None:
            meta.decide(self.name, f"no DKIM key for {meta.from_domain or 'this sender'}: unsigned")
        else:
            selectors = ",".join(meta.signer.selectors)
            meta.decide(self.name, f"signing as d={meta.signer.domain} s={selectors}")


def signer_for(signers: Mapping[str, DkimSigner], domain: str | None) -> DkimSigner | None:
    """The key of `domain` or of its nearest parent (not the bare top-level domain)."""
    while domain:
        if domain in signers:
            return signers[domain]
        domain = domain.partition(".")[2] if domain.count(".") > 1 else ""
    return None


DEFAULT_STEPS: tuple[Step, ...] = (
    ReadCampaign(),
    ReadTopic(),
    ReadCategory(),
    ReadTracking(),
    ApplyAccountDefaults(),
    GuardSignedContent(),
    ReadFromDomain(),
    ReadFeedbackFields(),
)


@dataclass(slots=True)
class PreparedMessage:
    """A message after the pipeline: its metadata and its template, ready for recipients."""

    meta: Metadata
    template: Template
    # What an opt-out must name to stop this message: everything, its topic, its sender
    # (envelope domain, account, From domain). Worked out once, checked per recipient.
    scopes_to_check: tuple[str, ...] = ()
    # The per-message halves of the click URLs, signed once for all recipients.
    _link_tokens: tuple[TrackingUrls, tuple[str, ...]] | None = field(
        default=None, repr=False, compare=False
    )

    def personalise(
        self,
        recipient: str,
        urls: TrackingUrls,
        hasher: AddressHasher,
        *,
        eight_bit_ok: bool = True,
        address_hash: str | None = None,
        marks: CopyMarks | None = None,
    ) -> bytes:
        """The recipient's copy, DKIM-signed last so the signature covers every change.

        `eight_bit_ok`: the next hop takes 8BITMIME; else 8bit parts go as 7-bit encodings.
        `address_hash`: the recipient's keyed hash, when the caller has it already.
        `marks`: the copy's feedback addresses and fields (relay.feedback), if any.
        """
        key = address_hash if address_hash is not None else hasher.hash(recipient)
        copy = self._render(key, urls, eight_bit_ok, marks)
        signer = self.meta.signer
        if signer is None:
            return copy
        try:
            return signer.sign(copy) + copy
        except DkimError as exc:
            # Headers DKIM cannot sign (e.g. a line without a colon): better unsigned than
            # stuck; the log says why.
            log.warning("DKIM: not signed: %s", exc, extra={"queue_id": self.meta.queue_id})
            return copy

    def _render(
        self,
        address_hash: str,
        urls: TrackingUrls,
        eight_bit_ok: bool,
        marks: CopyMarks | None = None,
    ) -> bytes:
        feedback_fields = marks.fields if marks is not None else ()
        if self.meta.transactional:
            return self.template.render({}, feedback_fields, eight_bit_ok=eight_bit_ok)
        ref = RecipientRef(address_hash, self.meta.scope, self.meta.campaign, self.meta.queue_id)
        unsubscribe_url = urls.unsubscribe_url(ref)
        values: dict[HoleKey, str] = {Hole.UNSUBSCRIBE_URL: unsubscribe_url}
        if self.meta.track_opens and self.meta.rewrite_body:
            values[Hole.PIXEL_URL] = urls.pixel_url(ref)
        if self.template.links:
            prefix = urls.click_prefix(ref)
            for index, token in enumerate(self._links_signed(urls)):
                values[LinkHole(index)] = prefix + token
        mailto = f"mailto:{marks.mailto}" if marks is not None else None
        return self.template.render(
            values,
            [*list_unsubscribe_headers(unsubscribe_url, mailto), *feedback_fields],
            eight_bit_ok=eight_bit_ok,
        )

    def _links_signed(self, urls: TrackingUrls) -> tuple[str, ...]:
        cached = self._link_tokens
        if cached is None or cached[0] is not urls:
            tokens = tuple(urls.link_token(self.meta.queue_id, u) for u in self.template.links)
            cached = self._link_tokens = (urls, tokens)
        return cached[1]


def _signing_domains(block: bytes) -> list[str]:
    try:
        return signing_domains(block)
    except DkimError:
        return []  # headers DKIM cannot read: no signature of the sender's to speak of


class Pipeline:
    def __init__(
        self,
        *,
        signers: Mapping[str, DkimSigner] | None = None,
        accounts: Mapping[str, Account] | None = None,
        clicks: bool = False,
    ) -> None:
        """`clicks`: rewrite the HTML links of tracked messages to signed click URLs."""
        self.steps = (*DEFAULT_STEPS, ChooseDkimKey(signers or {}))
        self.accounts = dict(accounts or {})
        self.clicks = clicks

    def prepare(
        self, queue_id: str, mail_from: str, raw: bytes, account: str | None = None
    ) -> PreparedMessage:
        meta = Metadata(queue_id, mail_from, track_clicks=self.clicks)
        meta.account = self.accounts.get(account) if account else None
        block = headers_of(raw)
        headers = parse_headers(block)
        meta.message_id = message_id_of(headers)
        for step in self.steps:
            step.process(headers, meta)
        if meta.from_domain and meta.from_domain in _signing_domains(block):
            # The sender's signature cannot survive the rewrite; ours replaces its purpose.
            warning = (
                f"the sender's own d={meta.from_domain} DKIM signature"
                " will not verify after the rewrite"
            )
            meta.warnings.append(warning)
            meta.decide("dkim", f"warning: {warning}")
        # Whatever turns open tracking off (X-Optout-Track, transactional, the account's
        # choice) turns click tracking off too: it is the same consent.
        meta.track_clicks = meta.track_clicks and meta.track_opens and meta.rewrite_body
        decorations = Decorations(
            unsubscribe=not meta.transactional and meta.rewrite_body,
            pixel=meta.track_opens and meta.rewrite_body,
            clicks=meta.track_clicks,
        )
        template = build_template(raw, decorations, headers)
        for note in template.notes:
            meta.decide("rewrite", note)
        scopes = [*sender_scopes(mail_from, account), meta.scope]
        if meta.from_domain:
            with contextlib.suppress(InvalidScope):
                scopes.append(parse_scope(f"sender:{meta.from_domain}"))
        return PreparedMessage(meta, template, tuple(dict.fromkeys(scopes)))
