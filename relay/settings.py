"""The relay's settings: typed, frozen, every field with its default. `relay.config` reads
them from the TOML file; everything else only reads them."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from suppression import NormalizationPolicy
from tracking.modes import Mode, Modes, click_mode
from tracking.retention import Retention
from tracking.webhooks import WebhookDelivery, WebhookEndpoint

from .accounts import Account
from .cores import auto_delivery_processes, auto_http_processes

if TYPE_CHECKING:
    from .mime import MimeLimits

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Downstream:
    host: str
    port: int
    implicit_tls: bool = False

    def __str__(self) -> str:
        return f"{'smtps' if self.implicit_tls else 'smtp'}://{self.address}"

    @property
    def address(self) -> str:
        """host:port, as delivery logs name the MTA (Postfix's relay=)."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class StorageSettings:
    dir: Path = Path("optout-data")
    # A shared store (suppressions, events, keys...) for several nodes; None: SQLite in dir.
    database: str | None = None
    database_password_file: Path | None = None
    reserve: int = 32 * 1024 * 1024  # bytes kept free so the spool can always drain; 0: none


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    listen: Listen = Listen("127.0.0.1", 2525)
    trusted_networks: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    max_message_size: int = 26_214_400
    max_recipients: int = 1000
    hostname: str | None = None
    tls_cert: Path | None = None  # with tls_key: STARTTLS offered, AUTH possible
    tls_key: Path | None = None
    implicit_tls_listen: Listen | None = None  # a second listener, TLS from the first byte
    transactional_listen: Listen | None = None  # a listener whose mail is all transactional
    max_connections: int = 200
    max_connections_per_client: int = 20
    idle_timeout: float = 300.0
    # What the relay's Received field says of the client: "full" (HELO and IP), "network"
    # (HELO and its /24 or /48), "omitted" (data minimisation; the log keeps the client).
    received_client: str = "omitted"


LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True, slots=True)
class HttpSettings:
    listen: Listen = Listen("127.0.0.1", 8080)
    public_url: str | None = None  # default: http:// and the listen address
    trusted_proxies: tuple[str, ...] = LOOPBACK_NETWORKS  # whose X-Forwarded-For is believed
    metrics_from: tuple[str, ...] = LOOPBACK_NETWORKS  # who may read /metrics
    event_process: bool = True  # opens and clicks checked and written by a child process
    # Processes answering HTTP on the listen address (SO_REUSEPORT); "auto" in the file:
    # one per usable core, at most 4.
    processes: int = field(default_factory=auto_http_processes)
    # None: what the open-files limit leaves after SMTP (relay.descriptors), at most 4096.
    max_connections: int | None = None
    max_connections_per_client: int = 64  # trusted proxies count towards the total only
    header_timeout: float = 30.0  # seconds for a request's headers to arrive
    body_timeout: float = 30.0  # seconds for a POST's body to arrive


@dataclass(frozen=True, slots=True)
class TrackingSettings:
    # How opens and clicks are measured (tracking.modes): individual, consented, aggregate,
    # off. `clicks` also takes the booleans it always took: false (off), true (individual).
    opens: Mode = Mode.INDIVIDUAL
    clicks: Mode | bool = Mode.OFF
    keep_last_open_only: bool = False  # per recipient and campaign, only the last open's day
    store_ip: bool = False  # then only the /24 (IPv4) or /48 (IPv6) network
    store_user_agent: bool = False
    durable_events: bool = False
    templates: Path | None = None
    brand: str | None = None
    undo_window: float = 3600.0
    machine_seconds: float = 10.0
    rate_per_minute: float = 60.0
    rate_burst: int = 20
    fetch_rate_per_minute: float = 600.0  # opens and clicks recorded per client
    fetch_rate_burst: int = 300
    repeat_window: float = 3600.0  # seconds: repeated fetches of one copy counted on one row

    def __post_init__(self) -> None:
        object.__setattr__(self, "opens", Mode(self.opens))
        object.__setattr__(self, "clicks", click_mode(self.clicks))

    @property
    def click_mode(self) -> Mode:
        return click_mode(self.clicks)


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    downstream: Downstream | None = None
    workers: int = 16
    retry_initial_delay: float = 60.0
    retry_max_delay: float = 3600.0
    max_queue_age: float = 5 * 24 * 3600.0  # then a DSN, as Postfix's maximal_queue_lifetime
    timeout: float = 60.0
    require_tls: bool = False
    max_queued_messages: int = 100_000
    separate_process: bool = True
    # Delivery processes, each owning a share of the spool; "auto" in the file: one per core.
    processes: int = field(default_factory=auto_delivery_processes)
    memory_limit: int = 2 * 1024**3  # address space of each delivery process (bytes); 0: none
    message_cpu_limit: float = 60.0  # CPU seconds to rewrite a message or render one copy


@dataclass(frozen=True, slots=True)
class RewriteSettings:
    """Bounds on the work one message may cost (see relay.mime.MimeLimits)."""

    max_mime_parts: int = 1000
    max_mime_depth: int = 100
    max_html_tokens: int = 100_000
    max_tag_attributes: int = 1000
    # The relay's (or its one sender's) postal address, for accounts without their own and
    # for mail from trusted networks (CAN-SPAM 15 USC 7704(a)(5)).
    postal_address: str | None = None
    # HTML parts of at most this many characters, footer included, with no image of their
    # own get no open pixel: SpamAssassin's HTML_IMAGE_ONLY_* score an image in HTML of up
    # to 3,200 characters. 0: always a pixel.
    pixel_min_html: int = 3200

    def limits(self) -> MimeLimits:
        from .mime import MimeLimits  # the email package only where mail is handled

        return MimeLimits(
            self.max_mime_parts, self.max_mime_depth, self.max_html_tokens, self.max_tag_attributes
        )


@dataclass(frozen=True, slots=True)
class AdminUser:
    username: str
    password_hash: str = field(repr=False)  # made by `optout-relay account hash-password`


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """The dashboard; on when `[admin]` lists users (an `[admin]` without any is refused)."""

    listen: Listen = Listen("127.0.0.1", 8081)
    session_timeout: float = 8 * 3600.0
    users: tuple[AdminUser, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.users)


@dataclass(frozen=True, slots=True)
class SigningSettings:
    secret_keys: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class DkimKey:
    domain: str
    selector: str
    key_file: Path  # relative paths are under storage.dir
    second_selector: str | None = None
    second_key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class DkimSettings:
    keys: tuple[DkimKey, ...] = ()


@dataclass(frozen=True, slots=True)
class FeedbackSettings:
    """Bounces, complaints and mailto unsubscribes coming back (relay.feedback)."""

    listen: Listen | None = None  # the feedback listener (an MX); None: no intake here
    domain: str | None = None  # VERP senders, mailto: and CFBL-Address live here
    soft_bounce_limit: int = 3
    soft_bounce_window: timedelta = timedelta(days=14)
    soft_bounce_hold: timedelta = timedelta(days=7)  # how long the limit suppresses
    max_message_size: int = 10_485_760
    max_recipients: int = 50
    max_connections: int = 100
    max_connections_per_client: int = 20
    rate_per_minute: float = 600.0  # messages per client address, after a burst
    rate_burst: int = 200
    max_pending: int = 100_000  # unprocessed reports; then 451 4.3.1
    keep_reports: timedelta = timedelta(days=30)
    keep_copies: timedelta = timedelta(days=400)  # mailto: must work for a year
    policy_alert: int = 3  # policy refusals per receiving domain a day, then logged loudly

    @property
    def intake(self) -> bool:
        return self.listen is not None


@dataclass(frozen=True, slots=True)
class Settings:
    storage: StorageSettings = field(default_factory=StorageSettings)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    signing: SigningSettings = field(default_factory=SigningSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    rewrite: RewriteSettings = field(default_factory=RewriteSettings)
    dkim: DkimSettings = field(default_factory=DkimSettings)
    suppression: NormalizationPolicy = field(default_factory=NormalizationPolicy)
    retention: Retention = field(default_factory=Retention)
    accounts: tuple[Account, ...] = ()
    feedback: FeedbackSettings = field(default_factory=FeedbackSettings)
    webhooks: tuple[WebhookEndpoint, ...] = ()
    webhook_delivery: WebhookDelivery = field(default_factory=WebhookDelivery)
    admin: AdminSettings = field(default_factory=AdminSettings)

    def feedback_domains(self) -> tuple[str, ...]:
        """Every domain the feedback listener answers for: the configured one and the
        accounts' own."""
        domains = [self.feedback.domain] if self.feedback.domain else []
        domains += [a.feedback_domain for a in self.accounts if a.feedback_domain]
        return tuple(dict.fromkeys(domains))

    def tracking_modes(self) -> Modes:
        """How the relay measures opens and clicks, where an account says nothing else."""
        return Modes(self.tracking.opens, self.tracking.click_mode)

    def individual_tracking(self) -> bool:
        """Whether any mail may measure some recipient individually (the relay's modes or
        an account's): then the recipient's pages offer to withdraw."""
        relay = self.tracking_modes()
        return relay.may_name or any(a.modes(relay).may_name for a in self.accounts)

    def account_map(self) -> dict[str, Account]:
        """The accounts by username: build it once per process and share it."""
        return {account.username: account for account in self.accounts}
