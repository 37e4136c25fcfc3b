"""Message processing as an ordered pipeline of small named steps.

Each step reads the parsed headers and records its decision on the message's metadata, so that
what the relay did to a message can always be explained; a step may also add header fields every
copy carries (`Metadata.add_field`). The steps run once per message; the per-recipient work
(tokens, URLs) happens at delivery time in `PreparedMessage.personalise`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.message import Message
from typing import Any, Protocol

from suppression import (
    GLOBAL,
    NO_WORD,
    AddressHasher,
    Consent,
    InvalidScope,
    parse_purposes,
    parse_scope,
    sender_scopes,
    topic_scope,
)
from tracking import RecipientRef, TrackingUrls
from tracking.modes import Mode, Modes, Purpose, click_mode
from tracking.tokens import AggregateRef

from .accounts import Account
from .dkim import DkimError, DkimSigner, SigningMemo, UnsignedFields, signing_domains
from .feedback.outgoing import CopyMarks
from .from_header import from_domains
from .mime import (
    MAX_HEADER_BYTES,
    MimeLimits,
    address_domain,
    headers_of,
    parse_headers,
)
from .rewrite import (
    UNTOUCHABLE_TYPES,
    BodyCache,
    Decorations,
    Hole,
    HoleKey,
    LinkHole,
    ReceivedClient,
    Template,
    build_template,
    date_field,
    list_id,
    list_id_field,
    list_unsubscribe_headers,
    message_id,
    message_id_field,
    received_field,
)

log = logging.getLogger("optout.delivery")
rewrite_log = logging.getLogger("optout.rewrite")
TOPIC_PREFIX = "topic:"
# RFC 3834 section 5: any value but "no" marks a message sent by a machine, not a person.
_NOT_AUTOMATIC = "no"


@dataclass(frozen=True, slots=True)
class Arrival:
    """How the message reached the relay, as the spool recorded it."""

    client: str | None = None  # "HELO[IP]"
    at: float | None = None  # seconds since the epoch; None: now


@dataclass(slots=True)
class Metadata:
    """What the pipeline learnt and decided about one message."""

    queue_id: str
    mail_from: str
    arrival: Arrival = field(default_factory=Arrival)
    # The message's RFC 5322 Message-ID as its events name it: the sender's, or the one the
    # relay added (AddDateAndMessageId); None while it has none.
    message_id: str | None = None
    campaign: str | None = None
    scope: str = GLOBAL
    # How opens and clicks are measured (tracking.modes): the account's or the relay's,
    # narrowed by the message; decided per recipient at delivery (`PreparedMessage.modes_for`).
    modes: Modes = field(default_factory=Modes)
    # Purposes the sender's tool vouches its recipients consented to (X-Optout-Consent).
    header_consent: frozenset[Purpose] = frozenset()
    transactional: bool = False
    automatic: bool = False  # a bounce, report or auto-reply: passes undecorated
    rewrite_body: bool = True
    from_domain: str | None = None
    signer: DkimSigner | None = None
    account: Account | None = None
    decisions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # recorded as warning events
    # Which of Feedback-ID and CFBL-Address the sender set: ours are then not added.
    sender_feedback_fields: frozenset[str] = frozenset()
    fields: list[bytes] = field(default_factory=list)  # added to every copy
    trace: list[bytes] = field(default_factory=list)  # added on top of every copy (Received)

    def decide(self, step: str, decision: str) -> None:
        self.decisions.append(f"{step}: {decision}")

    @property
    def track_opens(self) -> bool:
        return self.modes.opens.tracks

    @property
    def track_clicks(self) -> bool:
        return self.modes.clicks.tracks

    def narrow(self, to: Mode) -> None:
        """Opens and clicks measured at most as `to` (a message may narrow, never widen)."""
        self.modes = self.modes.narrowed(to)

    def add_field(self, field_: bytes, *, trace: bool = False) -> None:
        """A header field (CRLF-terminated) for every copy; `trace` ones go on top."""
        (self.trace if trace else self.fields).append(field_)

    @property
    def received_at(self) -> float:
        at = self.arrival.at
        return time.time() if at is None else at


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
        if campaign and "=?" in campaign:  # a non-ASCII name in RFC 2047 encoded words
            with contextlib.suppress(ValueError, LookupError):
                campaign = " ".join(str(make_header(decode_header(campaign))).split())
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
            meta.narrow(Mode.OFF)
            meta.decide(self.name, "transactional: no tracking, no unsubscribe decoration")


class ReadTracking:
    """X-Optout-Track: `off` (no pixel, no click rewriting) or `aggregate` (counted, naming
    nobody): a message may narrow how it is measured, never widen it."""

    name = "tracking"

    def process(self, headers: Message, meta: Metadata) -> None:
        asked = (_header(headers, "X-Optout-Track") or "").lower()
        if not asked:
            return
        if asked not in (Mode.OFF, Mode.AGGREGATE):
            meta.decide(self.name, f"ignored X-Optout-Track: {asked[:40]!r} (off or aggregate)")
            return
        meta.narrow(Mode(asked))
        if asked == Mode.OFF:
            meta.decide(self.name, "open and click tracking off (X-Optout-Track)")
        else:
            meta.decide(
                self.name,
                f"opens {meta.modes.opens}, clicks {meta.modes.clicks} (X-Optout-Track: aggregate)",
            )


class ReadConsent:
    """X-Optout-Consent: `opens, clicks`: the sender's tool holds its recipients' consent to
    these purposes (under `consented`, they are then measured individually). Believed from
    trusted networks and from accounts with `consent_header = true`; a recipient's own
    withdrawal still wins."""

    name = "consent"

    def process(self, headers: Message, meta: Metadata) -> None:
        value = _header(headers, "X-Optout-Consent")
        if value is None:
            return
        account = meta.account
        if account is not None and not account.consent_header:
            meta.decide(self.name, f"ignored X-Optout-Consent: {account.username} may not vouch")
            return
        words = value.replace(",", " ").split()
        known = [w for w in words if w.lower() in (p.value for p in Purpose)]
        meta.header_consent = parse_purposes(known)
        unknown = [w for w in words if w not in known]
        said = ", ".join(sorted(meta.header_consent)) or "nothing"
        note = f" (ignored: {', '.join(unknown)[:80]})" if unknown else ""
        meta.decide(self.name, f"sender vouches for consent to {said}{note}")


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
        if not account.track_opens:
            meta.decide(self.name, f"{account.username}: open and click tracking off")
        elif account.opens is not None or account.clicks is not None:
            meta.decide(
                self.name,
                f"{account.username}: opens {account.opens or 'as configured'},"
                f" clicks {account.clicks or 'as configured'}",
            )


class ReadFeedbackFields:
    """A sender's own Feedback-ID or CFBL-Address (RFC 9477) is kept, and ours not added."""

    name = "feedback-fields"

    def process(self, headers: Message, meta: Metadata) -> None:
        present = {n for n in ("feedback-id", "cfbl-address") if headers.get(n) is not None}
        if present:
            meta.sender_feedback_fields = frozenset(present)
            meta.decide(self.name, f"sender's own {', '.join(sorted(present))} kept")


class DetectAutomatic:
    """Bounces, delivery and read reports, complaint reports and auto-replies are no marketing
    mail: they go out undecorated (no List-Unsubscribe, no footer, no pixel, no click
    tracking; their own List-* fields and body as sent), signed and delivered, stopped only by
    hard bounces and complaints as transactional mail is. An unsubscribe link in a bounce
    would unsubscribe the marketing sender itself."""

    name = "automatic"

    def process(self, headers: Message, meta: Metadata) -> None:
        reasons = []
        if meta.mail_from in ("", "<>"):
            reasons.append("null envelope sender")
        auto = _header(headers, "Auto-Submitted")
        if auto is not None and auto.partition(";")[0].strip().lower() != _NOT_AUTOMATIC:
            reasons.append(f"Auto-Submitted: {auto[:40]}")
        if headers.get_content_type() == "multipart/report":
            reasons.append("multipart/report")
        if not reasons:
            return
        meta.automatic = meta.transactional = True
        meta.narrow(Mode.OFF)
        meta.decide(self.name, f"automatic mail ({', '.join(reasons)}): passes undecorated")


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


class AddDateAndMessageId:
    """RFC 6409 section 8.3 and 8.6: a submission without Date or Message-ID gets them here,
    before signing; left to the next MTA, they would land outside the DKIM signature, which
    over-signs their absence, and every verifier would fail it."""

    name = "msa"

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname

    def process(self, headers: Message, meta: Metadata) -> None:
        if headers.get("Date") is None:
            meta.add_field(date_field(meta.received_at))
            meta.decide(self.name, "Date added (time of submission)")
        if headers.get("Message-ID") is not None:
            return  # the sender's, as written (meta.message_id: as events name it)
        meta.message_id = message_id(meta.queue_id, meta.received_at, self.hostname)
        meta.add_field(message_id_field(meta.message_id))
        meta.decide(self.name, f"Message-ID {meta.message_id} added")


class AddListId:
    """RFC 2919 List-Id for campaign mail that has none, from the campaign and the sender's
    domain: receivers group and score list mail by it (SpamAssassin's LIST_PARTIAL_* rules
    fire on List-Unsubscribe without it). Mail of a topic without a campaign is named by its
    topic, the list its recipients can leave. A sender's own List-Id stays as it is."""

    name = "list-id"

    def process(self, headers: Message, meta: Metadata) -> None:
        topic = (
            meta.scope.removeprefix(TOPIC_PREFIX) if meta.scope.startswith(TOPIC_PREFIX) else None
        )
        name = meta.campaign or topic  # neither: no list to name
        if name is None or meta.transactional or headers.get("List-Id") is not None:
            return
        domain = meta.from_domain or address_domain(meta.mail_from)
        identifier = list_id(name, domain) if domain else None
        if identifier is None:
            meta.decide(self.name, "no List-Id: no sender domain to name it by")
            return
        meta.add_field(list_id_field(name, identifier))
        meta.decide(self.name, f"List-Id {identifier} added")


class AddReceived:
    """RFC 5321 section 4.4: the relay's own hop on top of the message, naming its client
    as `smtp.received_client` allows."""

    name = "received"

    def __init__(self, hostname: str, mode: ReceivedClient) -> None:
        self.hostname = hostname
        self.mode = mode

    def process(self, headers: Message, meta: Metadata) -> None:
        meta.add_field(
            received_field(
                client=meta.arrival.client,
                hostname=self.hostname,
                queue_id=meta.queue_id,
                moment=meta.received_at,
                authenticated=meta.account is not None,
                mode=self.mode,
            ),
            trace=True,
        )


DEFAULT_STEPS: tuple[Step, ...] = (
    ReadCampaign(),
    ReadTopic(),
    ReadCategory(),
    ReadTracking(),
    ReadConsent(),
    ApplyAccountDefaults(),
    GuardSignedContent(),
    DetectAutomatic(),
    ReadFromDomain(),
    ReadFeedbackFields(),
)


@dataclass(frozen=True, slots=True)
class UnsignedCopy:
    """A recipient's copy and its DKIM-Signature fields still to sign (None: unsigned)."""

    content: bytes
    fields: UnsignedFields | None

    def finish(self) -> bytes:
        """The copy as sent: its signature fields, signed, in front of it."""
        if self.fields is None:
            return self.content
        return self.fields.finish() + self.content


@dataclass(slots=True)
class PreparedMessage:
    """A message after the pipeline: its metadata and its template, ready for recipients."""

    meta: Metadata
    template: Template
    # What an opt-out must name to stop this message: everything, its topic, its sender
    # (envelope domain, account, From domain). Worked out once, checked per recipient.
    scopes_to_check: tuple[str, ...] = ()
    # An SMTP reply when the message must not go out at all (past the limits on work with
    # nowhere to put the unsubscribe link): every recipient's copy bounces with it.
    refusal: str | None = None
    # The per-message halves of the click URLs, signed once for all recipients.
    _link_tokens: tuple[TrackingUrls, tuple[str, ...]] | None = field(
        default=None, repr=False, compare=False
    )
    # The pixel and link URLs of every copy measured in aggregate, made once.
    _aggregate: tuple[TrackingUrls, str, tuple[str, ...]] | None = field(
        default=None, repr=False, compare=False
    )
    # What the copies have in common, for the DKIM signer to read once.
    _signing_memo: SigningMemo = field(default_factory=SigningMemo, repr=False, compare=False)

    def modes_for(self, consent: Consent = NO_WORD) -> Modes:
        """How one recipient's copy is measured, from their word on tracking (per purpose:
        individual, aggregate or off)."""
        return self.meta.modes.for_copy(consent, self.meta.header_consent)

    def personalise(
        self, recipient: str, urls: TrackingUrls, hasher: AddressHasher, **options: Any
    ) -> bytes:
        """The recipient's copy as sent: `personalise_unsigned`, signed here."""
        return self.personalise_unsigned(recipient, urls, hasher, **options).finish()

    def personalise_unsigned(
        self,
        recipient: str,
        urls: TrackingUrls,
        hasher: AddressHasher,
        *,
        eight_bit_ok: bool = True,
        address_hash: str | None = None,
        marks: CopyMarks | None = None,
        modes: Modes | None = None,
        smtp_form: bool = False,
    ) -> UnsignedCopy:
        """The recipient's copy, its DKIM signatures to be made last (`UnsignedCopy.finish`,
        or a signing helper in another process) so that they cover every change.

        `eight_bit_ok`: the next hop takes 8BITMIME; else 8bit parts go as 7-bit encodings.
        `address_hash`: the recipient's keyed hash, when the caller has it already.
        `marks`: the copy's feedback addresses and fields (relay.feedback), if any.
        `modes`: how this copy is measured (`modes_for` the recipient's consent; default:
        as if they had said nothing). `smtp_form`: the copy as SMTP carries it (CRLF line
        breaks, a final CRLF; relay.mime.smtp_lines), made once for the signer and the
        client alike.
        """
        key = address_hash if address_hash is not None else hasher.hash(recipient)
        copy = self._render(key, urls, eight_bit_ok, marks, modes or self.modes_for())
        if smtp_form:
            copy = self._signing_memo.smtp_lines(copy)
        signer = self.meta.signer
        if signer is None:
            return UnsignedCopy(copy, None)
        try:
            fields = signer.prepare(copy, smtp_form=smtp_form, memo=self._signing_memo)
        except DkimError as exc:
            # Headers DKIM cannot sign (e.g. a line without a colon): better unsigned than
            # stuck; the log says why.
            log.warning("DKIM: not signed: %s", exc, extra={"queue_id": self.meta.queue_id})
            return UnsignedCopy(copy, None)
        return UnsignedCopy(copy, fields)

    def _render(
        self,
        address_hash: str,
        urls: TrackingUrls,
        eight_bit_ok: bool,
        marks: CopyMarks | None = None,
        modes: Modes = Modes(),  # noqa: B008 - frozen
    ) -> bytes:
        feedback_fields = marks.fields if marks is not None else ()
        if self.meta.transactional:
            return self.template.render({}, feedback_fields, eight_bit_ok=eight_bit_ok)
        ref = RecipientRef(address_hash, self.meta.scope, self.meta.campaign, self.meta.queue_id)
        unsubscribe_url = urls.unsubscribe_url(ref)
        values: dict[HoleKey, str] = {Hole.UNSUBSCRIBE_URL: unsubscribe_url}
        holes = self.template.holes
        if Hole.PREFERENCES_URL in holes:
            values[Hole.PREFERENCES_URL] = urls.preferences_url(unsubscribe_url)
        if Hole.PIXEL_URL in holes:
            if modes.opens is Mode.INDIVIDUAL:
                values[Hole.PIXEL_URL] = urls.pixel_url(ref)
            else:
                values[Hole.PIXEL_URL] = self._aggregate_urls(urls)[0]
        if self.template.links:
            if modes.clicks is Mode.INDIVIDUAL:
                prefix = urls.click_prefix(ref)
                for index, token in enumerate(self._links_signed(urls)):
                    values[LinkHole(index)] = prefix + token
            else:
                for index, url in enumerate(self._aggregate_urls(urls)[1]):
                    values[LinkHole(index)] = url
        mailto = f"mailto:{marks.mailto}" if marks is not None else None
        return self.template.render(
            values,
            [*list_unsubscribe_headers(unsubscribe_url, mailto), *feedback_fields],
            eight_bit_ok=eight_bit_ok,
        )

    def _aggregate_urls(self, urls: TrackingUrls) -> tuple[str, tuple[str, ...]]:
        """The pixel and link URLs of every copy measured in aggregate: they name the
        campaign and the sending domain, and are signed with the message's arrival time,
        so every copy (a retry's too) has exactly these."""
        cached = self._aggregate
        if cached is None or cached[0] is not urls:
            meta = self.meta
            ref = AggregateRef(meta.campaign, meta.from_domain)
            at = int(meta.received_at)
            links = tuple(urls.aggregate_click_url(ref, u, at) for u in self.template.links)
            cached = self._aggregate = (urls, urls.aggregate_pixel_url(ref, at), links)
        return cached[1], cached[2]

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
        clicks: bool | Mode = False,
        opens: Mode = Mode.INDIVIDUAL,
        hostname: str = "localhost",
        received_client: ReceivedClient = ReceivedClient.OMITTED,
        limits: MimeLimits | None = None,
        postal_address: str | None = None,
        pixel_min_html: int = 0,
    ) -> None:
        """`opens`, `clicks`: how opens and clicks are measured (tracking.modes; `clicks`
        also as the boolean it was: true is individual).
        `hostname`: the relay's name in the fields it adds (Received, Message-ID).
        `received_client`: what the Received field says about the submitting client.
        `limits`: the bounds on the work one message may cost. `postal_address`: the
        footer's, for senders without their own. `pixel_min_html`: see Decorations."""
        self.steps: tuple[Step, ...] = (
            *DEFAULT_STEPS,
            ChooseDkimKey(signers or {}),
            AddDateAndMessageId(hostname),
            AddListId(),
            AddReceived(hostname, received_client),
        )
        self.accounts = dict(accounts or {})
        self.modes = Modes(opens, click_mode(clicks))
        self.limits = limits or MimeLimits()
        self.postal_address = postal_address
        self.pixel_min_html = pixel_min_html
        # A campaign sent one message per recipient: its body is rewritten once.
        self._bodies = BodyCache()

    def prepare(
        self,
        queue_id: str,
        mail_from: str,
        raw: bytes,
        account: str | None = None,
        *,
        arrival: Arrival | None = None,
    ) -> PreparedMessage:
        meta = Metadata(queue_id, mail_from, arrival or Arrival())
        meta.account = self.accounts.get(account) if account else None
        meta.modes = meta.account.modes(self.modes) if meta.account else self.modes
        block = headers_of(raw)
        if len(block) > MAX_HEADER_BYTES:
            # The front door refuses these; one spooled before that must still not cost
            # unbounded work (every header line becomes an object).
            reason = f"a header section over {MAX_HEADER_BYTES} octets"
            meta.decide("limits", f"not sent: {reason}")
            return PreparedMessage(
                meta,
                Template([], [raw], Decorations()),
                refusal=f"554 5.6.0 message not sent: {reason}",
            )
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
        if not meta.rewrite_body:
            meta.narrow(Mode.OFF)  # a body left untouched gets no pixel and no click URLs
        decorations = Decorations(
            unsubscribe=not meta.transactional and meta.rewrite_body,
            pixel=meta.track_opens and meta.rewrite_body,
            clicks=meta.track_clicks,
            replace_list_headers=not meta.automatic,
            postal_address=(meta.account and meta.account.postal_address) or self.postal_address,
            pixel_min_html=self.pixel_min_html,
            preferences=meta.modes.may_name and not meta.transactional,
        )
        template = build_template(raw, decorations, headers, self.limits, self._bodies)
        template.add_fields(meta.fields)
        template.add_fields(meta.trace, trace=True)
        for note in template.notes:
            meta.decide("rewrite", note)
            if note.startswith("rewrite_failed: "):
                rewrite_log.warning(
                    "rewrite failed: %s",
                    note.removeprefix("rewrite_failed: "),
                    extra={"queue_id": queue_id},
                )
        refusal: str | None = None
        if (
            template.over_limit
            and decorations.unsubscribe
            and Hole.UNSUBSCRIBE_URL not in template.holes
        ):
            # Never sent without an unsubscribe link (DESIGN rule 3): returned to the sender.
            refusal = (
                f"554 5.6.0 message not sent: {template.over_limit}, and no part of it"
                " could carry the unsubscribe link"
            )
            meta.decide("limits", refusal)
        scopes = [*sender_scopes(mail_from, account), meta.scope]
        if meta.from_domain:
            with contextlib.suppress(InvalidScope):
                scopes.append(parse_scope(f"sender:{meta.from_domain}"))
        return PreparedMessage(meta, template, tuple(dict.fromkeys(scopes)), refusal=refusal)
