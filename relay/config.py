"""The TOML config file, read into typed, frozen settings; every key optional."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from suppression import NormalizationPolicy
from tracking.events import Retention

from .accounts import Account, PasswordHashError, check_password_hash
from .errors import ConfigError

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
        return f"{'smtps' if self.implicit_tls else 'smtp'}://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class StorageSettings:
    dir: Path = Path("optout-data")


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
    max_connections: int = 200
    max_connections_per_client: int = 20
    idle_timeout: float = 300.0


LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True, slots=True)
class HttpSettings:
    listen: Listen = Listen("127.0.0.1", 8080)
    public_url: str | None = None  # default: http:// and the listen address
    trusted_proxies: tuple[str, ...] = LOOPBACK_NETWORKS  # whose X-Forwarded-For is believed
    metrics_from: tuple[str, ...] = LOOPBACK_NETWORKS  # who may read /metrics
    event_process: bool = True  # opens and clicks checked and written by a child process


@dataclass(frozen=True, slots=True)
class TrackingSettings:
    clicks: bool = False
    store_ip: bool = False  # then only the /24 (IPv4) or /48 (IPv6) network
    store_user_agent: bool = False
    durable_events: bool = False
    templates: Path | None = None
    brand: str | None = None
    undo_window: float = 3600.0
    machine_seconds: float = 10.0
    rate_per_minute: float = 60.0
    rate_burst: int = 20


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    downstream: Downstream | None = None
    workers: int = 4
    retry_initial_delay: float = 60.0
    retry_max_delay: float = 3600.0
    max_queue_age: float = 5 * 24 * 3600.0  # then a DSN, as Postfix's maximal_queue_lifetime
    timeout: float = 60.0
    require_tls: bool = False
    max_queued_messages: int = 100_000
    separate_process: bool = True
    processes: int = 1  # delivery processes, each owning a share of the spool


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


def _policy_domains(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, f"must be an array of domains, not {_type_name(value)}")
    domains = tuple(_string(v, key).lower().rstrip(".") for v in value)
    for domain in domains:
        if not _DOMAIN.match(domain):
            raise ConfigError(key, f"{domain!r} is not a domain name")
    return domains


def _retention(value: Any, key: str) -> Retention:
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a table, not {_type_name(value)}")
    try:
        return Retention.parse(value)
    except ValueError as exc:
        message = str(exc)
        named, _, problem = message.partition(": ")
        if named.startswith("retention.") and problem:
            raise ConfigError(named, problem) from None
        raise ConfigError(key, message) from None


@dataclass(frozen=True, slots=True)
class Settings:
    storage: StorageSettings = field(default_factory=StorageSettings)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    signing: SigningSettings = field(default_factory=SigningSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    dkim: DkimSettings = field(default_factory=DkimSettings)
    suppression: NormalizationPolicy = field(default_factory=NormalizationPolicy)
    retention: Retention = field(default_factory=Retention)
    accounts: tuple[Account, ...] = ()

    def account(self, username: str) -> Account | None:
        return next((a for a in self.accounts if a.username == username), None)


# ---- value parsers: each takes the raw TOML value and the dotted key for its errors ----

Parser = Callable[[Any, str], Any]


def _type_name(value: Any) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, not {_type_name(value)}")
    return value


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, not {_type_name(value)}")
    return value


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"must be an integer, not {_type_name(value)}")
    if value <= 0:
        raise ConfigError(key, f"must be greater than 0 (got {value})")
    return value


def _positive_number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, f"must be a number, not {_type_name(value)}")
    if value <= 0:
        raise ConfigError(key, f"must be greater than 0 (got {value})")
    return float(value)


def _host_port(text: str, key: str) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(key, f"must be HOST:PORT (got {text!r})")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(key, f"port must be between 1 and 65535 (got {port!r})")
    return host, int(port)


def _listen(value: Any, key: str) -> Listen:
    host, port = _host_port(_string(value, key), key)
    return Listen(host, port)


def _networks(value: Any, key: str) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, f"must be an array of networks, not {_type_name(value)}")
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(_string(item, key)))
        except ValueError as exc:
            raise ConfigError(key, f"{item!r} is not a network: {exc}") from None
    return tuple(networks)


def _network_strings(value: Any, key: str) -> tuple[str, ...]:
    return tuple(str(network) for network in _networks(value, key))


def _template_dir(value: Any, key: str) -> Path:
    path = Path(_string(value, key)).expanduser()
    if not path.is_dir():
        raise ConfigError(key, f"{path} is not a directory")
    return path


def _public_url(value: Any, key: str) -> str:
    url = urlsplit(_string(value, key))
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(key, f"must be an http(s) URL with a host (got {value!r})")
    if url.query or url.fragment:
        raise ConfigError(key, "must not have a query or fragment")
    return str(value).rstrip("/")


def _downstream(value: Any, key: str) -> Downstream:
    url = urlsplit(_string(value, key))
    if url.scheme not in ("smtp", "smtps"):
        raise ConfigError(key, f"must be smtp://HOST:PORT or smtps://HOST:PORT (got {value!r})")
    try:
        port = url.port
    except ValueError:
        raise ConfigError(key, f"port must be between 1 and 65535 (got {value!r})") from None
    if not url.hostname or url.path not in ("", "/"):
        raise ConfigError(key, f"must be smtp://HOST:PORT (got {value!r})")
    implicit_tls = url.scheme == "smtps"
    return Downstream(url.hostname, port or (465 if implicit_tls else 25), implicit_tls)


def _secret_keys(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(key, "must be a non-empty array of strings, newest first")
    keys = tuple(_string(item, key) for item in value)
    if any(len(k) < 16 for k in keys):
        raise ConfigError(key, "every key must be at least 16 characters long")
    return keys


_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
_SELECTOR = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,62})$", re.IGNORECASE)


def _dkim_keys(value: Any, key: str) -> tuple[DkimKey, ...]:
    if not isinstance(value, list):
        raise ConfigError(
            key, f"must be an array of tables ([[dkim.keys]]), not {_type_name(value)}"
        )
    keys = []
    for index, entry in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(where, f"must be a table, not {_type_name(entry)}")
        allowed = {"domain", "selector", "key_file", "second_selector", "second_key_file"}
        for name in entry:
            if name not in allowed:
                raise ConfigError(f"{where}.{name}", "unknown key")
        for name in ("domain", "selector", "key_file"):
            if name not in entry:
                raise ConfigError(f"{where}.{name}", "is required")
        domain = _string(entry["domain"], f"{where}.domain").lower().rstrip(".")
        if not _DOMAIN.match(domain):
            raise ConfigError(f"{where}.domain", f"{domain!r} is not a domain name")
        selectors = {}
        for name in ("selector", "second_selector"):
            if name in entry:
                selector = _string(entry[name], f"{where}.{name}")
                if not _SELECTOR.match(selector):
                    raise ConfigError(f"{where}.{name}", f"{selector!r} is not a DKIM selector")
                selectors[name] = selector
        if ("second_selector" in entry) != ("second_key_file" in entry):
            raise ConfigError(f"{where}.second_key_file", "goes with second_selector, both or none")
        second_file = entry.get("second_key_file")
        keys.append(
            DkimKey(
                domain=domain,
                selector=selectors["selector"],
                key_file=Path(_string(entry["key_file"], f"{where}.key_file")),
                second_selector=selectors.get("second_selector"),
                second_key_file=(
                    Path(_string(second_file, f"{where}.second_key_file")) if second_file else None
                ),
            )
        )
    domains = [k.domain for k in keys]
    if len(set(domains)) != len(domains):
        raise ConfigError(key, "a domain appears twice")
    return tuple(keys)


def _readable_file(value: Any, key: str) -> Path:
    path = Path(_string(value, key)).expanduser()
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ConfigError(key, f"{path} is not a readable file")
    return path


def _accounts(value: Any, key: str) -> tuple[Account, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, f"must be [[accounts]] tables, not {_type_name(value)}")
    accounts = []
    for index, entry in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(where, f"must be a table, not {_type_name(entry)}")
        for name in entry:
            if name not in ("username", "password_hash", "from_domains", "topic", "tracking"):
                raise ConfigError(f"{where}.{name}", "unknown key")
        for name in ("username", "password_hash", "from_domains"):
            if name not in entry:
                raise ConfigError(f"{where}.{name}", "is required")
        password_hash = _string(entry["password_hash"], f"{where}.password_hash")
        try:
            check_password_hash(password_hash)
        except PasswordHashError as exc:
            raise ConfigError(f"{where}.password_hash", str(exc)) from None
        domains = entry["from_domains"]
        if not isinstance(domains, list) or not domains:
            raise ConfigError(f"{where}.from_domains", "must be a non-empty array of domains")
        for domain in domains:
            if not _DOMAIN.match(_string(domain, f"{where}.from_domains").lower()):
                raise ConfigError(f"{where}.from_domains", f"{domain!r} is not a domain name")
        topic = entry.get("topic")
        tracking = entry.get("tracking", True)
        accounts.append(
            Account(
                username=_string(entry["username"], f"{where}.username"),
                password_hash=password_hash,
                from_domains=tuple(d.lower().rstrip(".") for d in domains),
                topic=None if topic is None else _string(topic, f"{where}.topic"),
                track_opens=_boolean(tracking, f"{where}.tracking"),
            )
        )
    names = [a.username for a in accounts]
    if len(set(names)) != len(names):
        raise ConfigError(key, "a username appears twice")
    return tuple(accounts)


def _directory(value: Any, key: str) -> Path:
    path = Path(_string(value, key)).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == path and not path.is_dir():
        raise ConfigError(key, f"{path} is not a directory")
    if not os.access(existing, os.R_OK | os.W_OK | os.X_OK):
        raise ConfigError(key, f"{existing} is not readable and writable")
    return path


_SCHEMA: dict[str, tuple[type[Any], dict[str, Parser]]] = {
    "storage": (StorageSettings, {"dir": _directory}),
    "smtp": (
        SmtpSettings,
        {
            "listen": _listen,
            "trusted_networks": _networks,
            "max_message_size": _positive_int,
            "max_recipients": _positive_int,
            "hostname": _string,
            "tls_cert": _readable_file,
            "tls_key": _readable_file,
            "implicit_tls_listen": _listen,
            "max_connections": _positive_int,
            "max_connections_per_client": _positive_int,
            "idle_timeout": _positive_number,
        },
    ),
    "http": (
        HttpSettings,
        {
            "listen": _listen,
            "public_url": _public_url,
            "trusted_proxies": _network_strings,
            "metrics_from": _network_strings,
            "event_process": _boolean,
        },
    ),
    "tracking": (
        TrackingSettings,
        {
            "clicks": _boolean,
            "store_ip": _boolean,
            "store_user_agent": _boolean,
            "durable_events": _boolean,
            "templates": _template_dir,
            "brand": _string,
            "undo_window": _positive_number,
            "machine_seconds": _positive_number,
            "rate_per_minute": _positive_number,
            "rate_burst": _positive_int,
        },
    ),
    "delivery": (
        DeliverySettings,
        {
            "downstream": _downstream,
            "workers": _positive_int,
            "retry_initial_delay": _positive_number,
            "retry_max_delay": _positive_number,
            "max_queue_age": _positive_number,
            "timeout": _positive_number,
            "require_tls": _boolean,
            "max_queued_messages": _positive_int,
            "separate_process": _boolean,
            "processes": _positive_int,
        },
    ),
    "signing": (SigningSettings, {"secret_keys": _secret_keys}),
    "dkim": (DkimSettings, {"keys": _dkim_keys}),
    "suppression": (
        NormalizationPolicy,
        {
            "fold_local_part": _boolean,
            "strip_subaddress": _boolean,
            "ignore_dots_domains": _policy_domains,
        },
    ),
}


def parse_settings(document: Mapping[str, Any]) -> Settings:
    """Settings from a parsed TOML document; ConfigError names the first bad key."""
    sections: dict[str, Any] = {}
    for name, value in document.items():
        if name == "accounts":
            sections[name] = _accounts(value, name)
            continue
        if name == "retention":
            sections[name] = _retention(value, name)
            continue
        if name not in _SCHEMA:
            raise ConfigError(name, "unknown section")
        if not isinstance(value, dict):
            raise ConfigError(name, f"must be a table, not {_type_name(value)}")
        cls, parsers = _SCHEMA[name]
        values = {}
        for key, raw in value.items():
            dotted = f"{name}.{key}"
            if key not in parsers:
                raise ConfigError(dotted, "unknown key")
            values[key] = parsers[key](raw, dotted)
        sections[name] = cls(**values)
    settings = Settings(**sections)
    _check_consistency(settings)
    return settings


def _check_consistency(settings: Settings) -> None:
    delivery = settings.delivery
    smtp = settings.smtp
    if (smtp.tls_cert is None) != (smtp.tls_key is None):
        raise ConfigError("smtp.tls_key", "goes with smtp.tls_cert: both or neither")
    if smtp.implicit_tls_listen is not None and smtp.tls_cert is None:
        raise ConfigError("smtp.implicit_tls_listen", "needs smtp.tls_cert and smtp.tls_key")
    if settings.accounts and smtp.tls_cert is None:
        raise ConfigError("accounts", "AUTH is only offered over TLS: set smtp.tls_cert/tls_key")
    if delivery.processes > 16:
        raise ConfigError("delivery.processes", f"at most 16 (got {delivery.processes})")
    if delivery.processes > 1 and not delivery.separate_process:
        raise ConfigError("delivery.processes", "more than 1 needs separate_process = true")
    if delivery.require_tls and delivery.downstream is None:
        raise ConfigError("delivery.require_tls", "needs delivery.downstream")
    if delivery.retry_max_delay < delivery.retry_initial_delay:
        raise ConfigError(
            "delivery.retry_max_delay", "must not be less than delivery.retry_initial_delay"
        )


def load_settings(path: Path | None) -> Settings:
    """Read `path`, or the embedded defaults when there is no file."""
    if path is None:
        return Settings()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "is not UTF-8 text") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"is not valid TOML: {exc}") from None
    return parse_settings(document)


def section_keys() -> dict[str, list[str]]:
    """Every documented key per section (used to check config.example.toml stays complete)."""
    return {name: [f.name for f in fields(cls)] for name, (cls, _) in _SCHEMA.items()}
