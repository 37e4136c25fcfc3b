"""The TOML config file, read into the frozen settings of `relay.settings`; every key
optional, and an unusable one a ConfigError naming it."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import fields
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from suppression import InvalidAge, NormalizationPolicy, parse_age
from tracking.modes import MODES, Mode, click_mode
from tracking.retention import Retention
from tracking.webhooks import (
    WebhookConfigError,
    WebhookDelivery,
    WebhookEndpoint,
    check_secret,
    check_types,
    check_url,
)

from .accounts import CATEGORIES, Account, PasswordHashError, check_password_hash
from .cores import auto_delivery_processes, auto_http_processes
from .errors import ConfigError
from .names import domain_name, selector_name
from .settings import (
    AdminSettings,
    AdminUser,
    DeliverySettings,
    DkimKey,
    DkimSettings,
    Downstream,
    FeedbackSettings,
    HttpSettings,
    IPNetwork,
    Listen,
    RewriteSettings,
    Settings,
    SigningSettings,
    SmtpSettings,
    StorageSettings,
    TrackingSettings,
)


def _policy_domains(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, f"must be an array of domains, not {_type_name(value)}")
    return tuple(_domain(v, key) for v in value)


def _domain(value: Any, key: str) -> str:
    try:
        return domain_name(_string(value, key))
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None


def _duration(value: Any, key: str) -> timedelta:
    try:
        return parse_age(_string(value, key))
    except InvalidAge as exc:  # one line listing the units
        raise ConfigError(key, str(exc)) from None


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


def _mode(value: Any, key: str) -> Mode:
    if not isinstance(value, str) or value not in MODES:
        raise ConfigError(key, f"must be one of {', '.join(MODES)} (got {value!r})")
    return Mode(value)


def _click_mode(value: Any, key: str) -> Mode:
    """`clicks`: the booleans it always took (false: off; true: individual), or a mode."""
    if isinstance(value, bool):
        return click_mode(value)
    if not isinstance(value, str) or value not in MODES:
        raise ConfigError(key, f"must be false, true or one of {', '.join(MODES)} (got {value!r})")
    return Mode(value)


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"must be an integer, not {_type_name(value)}")
    if value <= 0:
        raise ConfigError(key, f"must be greater than 0 (got {value})")
    return value


AUTO = 0  # `_processes`' "auto", resolved once the section is read


def _processes(value: Any, key: str) -> int:
    """A positive count, or "auto" (AUTO): one per core where delivery runs apart."""
    if value == "auto":
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f'must be an integer or "auto", not {_type_name(value)}')
    return _positive_int(value, key)


def _postal_address(value: Any, key: str) -> str:
    """A postal address for the footer: one or more lines of printable text."""
    text = _string(value, key).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or not all(line.isprintable() for line in lines):
        raise ConfigError(key, "must be a postal address: lines of printable text")
    if len(text) > 500:
        raise ConfigError(key, "is longer than 500 characters")
    return "\n".join(lines)


def _non_negative_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(key, f"must be a whole number, 0 or more (got {value!r})")
    return value


def _choice(*allowed: str) -> Parser:
    def parse(value: Any, key: str) -> str:
        text = _string(value, key)
        if text not in allowed:
            raise ConfigError(key, f"must be one of {', '.join(allowed)} (got {text!r})")
        return text

    return parse


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


def _database_url(value: Any, key: str) -> str:
    """A PostgreSQL URL (libpq's); its password, if any, never appears in an error."""
    text = _string(value, key)
    url = urlsplit(text)
    if url.scheme not in ("postgresql", "postgres"):
        raise ConfigError(key, "must be a postgresql://USER@HOST/DATABASE URL")
    try:
        url.port  # noqa: B018 - parsing it is the check
    except ValueError:
        raise ConfigError(key, "port must be between 1 and 65535") from None
    return text


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
        domain = _domain(entry["domain"], f"{where}.domain")
        selectors = {}
        for name in ("selector", "second_selector"):
            if name in entry:
                try:
                    selectors[name] = selector_name(_string(entry[name], f"{where}.{name}"))
                except ValueError as exc:
                    raise ConfigError(f"{where}.{name}", str(exc)) from None
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


def _tables(
    value: Any, key: str, *, known: tuple[str, ...], required: tuple[str, ...]
) -> list[tuple[str, dict[str, Any]]]:
    """An array of tables (`[[key]]`), each entry with its place for errors (`key[N]`):
    every entry a table, of known keys only, with the required ones."""
    if not isinstance(value, list):
        raise ConfigError(key, f"must be [[{key}]] tables, not {_type_name(value)}")
    entries = []
    for index, entry in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(where, f"must be a table, not {_type_name(entry)}")
        for name in entry:
            if name not in known:
                raise ConfigError(f"{where}.{name}", "unknown key")
        for name in required:
            if name not in entry:
                raise ConfigError(f"{where}.{name}", "is required")
        entries.append((where, entry))
    return entries


def _password_hash(entry: dict[str, Any], where: str) -> str:
    password_hash = _string(entry["password_hash"], f"{where}.password_hash")
    try:
        check_password_hash(password_hash)
    except PasswordHashError as exc:
        raise ConfigError(f"{where}.password_hash", str(exc)) from None
    return password_hash


def _accounts(value: Any, key: str) -> tuple[Account, ...]:
    accounts = []
    for where, entry in _tables(
        value,
        key,
        known=(
            "username",
            "password_hash",
            "from_domains",
            "topic",
            "tracking",
            "opens",
            "clicks",
            "consent_header",
            "feedback_domain",
            "category",
            "postal_address",
        ),
        required=("username", "password_hash", "from_domains"),
    ):
        password_hash = _password_hash(entry, where)
        domains = entry["from_domains"]
        if not isinstance(domains, list) or not domains:
            raise ConfigError(f"{where}.from_domains", "must be a non-empty array of domains")
        topic = entry.get("topic")
        tracking = entry.get("tracking", True)
        category = entry.get("category", "marketing")
        track = _boolean(tracking, f"{where}.tracking")
        for name in ("opens", "clicks"):
            if not track and name in entry:
                raise ConfigError(f"{where}.{name}", "conflicts with tracking = false")
        if category not in CATEGORIES:
            raise ConfigError(
                f"{where}.category", f"must be one of {', '.join(CATEGORIES)} (got {category!r})"
            )
        accounts.append(
            Account(
                username=_string(entry["username"], f"{where}.username"),
                password_hash=password_hash,
                from_domains=tuple(_domain(d, f"{where}.from_domains") for d in domains),
                topic=None if topic is None else _string(topic, f"{where}.topic"),
                track_opens=track,
                opens=_mode(entry["opens"], f"{where}.opens") if "opens" in entry else None,
                clicks=(
                    _click_mode(entry["clicks"], f"{where}.clicks") if "clicks" in entry else None
                ),
                consent_header=_boolean(
                    entry.get("consent_header", False), f"{where}.consent_header"
                ),
                feedback_domain=(
                    _domain(entry["feedback_domain"], f"{where}.feedback_domain")
                    if "feedback_domain" in entry
                    else None
                ),
                category=category,
                postal_address=(
                    _postal_address(entry["postal_address"], f"{where}.postal_address")
                    if "postal_address" in entry
                    else None
                ),
            )
        )
    names = [a.username for a in accounts]
    if len(set(names)) != len(names):
        raise ConfigError(key, "a username appears twice")
    return tuple(accounts)


def _webhooks(value: Any, key: str) -> tuple[WebhookEndpoint, ...]:
    endpoints = []
    for where, entry in _tables(
        value,
        key,
        known=("url", "secret", "events", "previous_secret"),
        required=("url", "secret"),
    ):
        events = entry.get("events")
        if events is not None and (not isinstance(events, list) or not events):
            raise ConfigError(f"{where}.events", "must be a non-empty array of event types")
        # Each value checked on its own, so the error names its key (never the secret).
        checks: list[tuple[str, Callable[[Any], object]]] = [
            ("url", check_url),
            ("secret", check_secret),
            ("previous_secret", check_secret),
            ("events", check_types),
        ]
        for name, check in checks:
            if entry.get(name) is None:
                continue
            raw = entry[name]
            if name == "events":
                raw = [_string(item, f"{where}.events") for item in raw]
            else:
                raw = _string(raw, f"{where}.{name}")
            try:
                check(raw)
            except WebhookConfigError as exc:
                raise ConfigError(f"{where}.{name}", str(exc)) from None
        endpoints.append(
            WebhookEndpoint(
                url=entry["url"],
                secret=entry["secret"],
                events=None if events is None else tuple(dict.fromkeys(events)),
                previous_secret=entry.get("previous_secret"),
            )
        )
    urls = [endpoint.url for endpoint in endpoints]
    if len(set(urls)) != len(urls):
        raise ConfigError(key, "a url appears twice")
    return tuple(endpoints)


def _admin_users(value: Any, key: str) -> tuple[AdminUser, ...]:
    users = []
    for where, entry in _tables(
        value, key, known=("username", "password_hash"), required=("username", "password_hash")
    ):
        username = _string(entry["username"], f"{where}.username")
        if not username or not username.isprintable() or username != username.strip():
            raise ConfigError(f"{where}.username", "must be printable, without outer spaces")
        users.append(AdminUser(username, _password_hash(entry, where)))
    names = [user.username for user in users]
    if len(set(names)) != len(names):
        raise ConfigError(key, "a username appears twice")
    return tuple(users)


def _concurrency(value: Any, key: str) -> int:
    count = _positive_int(value, key)
    if count > 64:
        raise ConfigError(key, f"at most 64 (got {count})")
    return count


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
    "storage": (
        StorageSettings,
        {
            "dir": _directory,
            "reserve": _non_negative_int,
            "database": _database_url,
            "database_password_file": _readable_file,
        },
    ),
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
            "transactional_listen": _listen,
            "max_connections": _positive_int,
            "max_connections_per_client": _positive_int,
            "idle_timeout": _positive_number,
            "received_client": _choice("full", "network", "omitted"),
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
            "processes": _processes,
            "max_connections": _positive_int,
            "max_connections_per_client": _positive_int,
            "header_timeout": _positive_number,
            "body_timeout": _positive_number,
        },
    ),
    "tracking": (
        TrackingSettings,
        {
            "opens": _mode,
            "clicks": _click_mode,
            "keep_last_open_only": _boolean,
            "store_ip": _boolean,
            "store_user_agent": _boolean,
            "durable_events": _boolean,
            "templates": _template_dir,
            "brand": _string,
            "undo_window": _positive_number,
            "machine_seconds": _positive_number,
            "rate_per_minute": _positive_number,
            "rate_burst": _positive_int,
            "fetch_rate_per_minute": _positive_number,
            "fetch_rate_burst": _positive_int,
            "repeat_window": _positive_number,
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
            "processes": _processes,
            "memory_limit": _non_negative_int,
            "message_cpu_limit": _positive_number,
        },
    ),
    "rewrite": (
        RewriteSettings,
        {
            "max_mime_parts": _positive_int,
            "max_mime_depth": _positive_int,
            "max_html_tokens": _positive_int,
            "max_tag_attributes": _positive_int,
            "postal_address": _postal_address,
            "pixel_min_html": _non_negative_int,
        },
    ),
    "signing": (SigningSettings, {"secret_keys": _secret_keys}),
    "feedback": (
        FeedbackSettings,
        {
            "listen": _listen,
            "domain": _domain,
            "soft_bounce_limit": _positive_int,
            "soft_bounce_window": _duration,
            "soft_bounce_hold": _duration,
            "max_message_size": _positive_int,
            "max_recipients": _positive_int,
            "max_connections": _positive_int,
            "max_connections_per_client": _positive_int,
            "rate_per_minute": _positive_number,
            "rate_burst": _positive_int,
            "fetch_rate_per_minute": _positive_number,
            "fetch_rate_burst": _positive_int,
            "repeat_window": _positive_number,
            "max_pending": _positive_int,
            "keep_reports": _duration,
            "keep_copies": _duration,
            "policy_alert": _positive_int,
        },
    ),
    "admin": (
        AdminSettings,
        {"listen": _listen, "session_timeout": _positive_number, "users": _admin_users},
    ),
    "webhook_delivery": (
        WebhookDelivery,
        {
            "timeout": _positive_number,
            "first_retry": _positive_number,
            "give_up_after": _positive_number,
            "concurrency": _concurrency,
        },
    ),
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
        if name == "webhooks":
            sections[name] = _webhooks(value, name)
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
        if name == "delivery" and values.get("processes", AUTO) == AUTO:
            # One process per core when delivery runs apart; on the front door's loop
            # (separate_process = false) there is only that one.
            separate = values.get("separate_process", True)
            values["processes"] = auto_delivery_processes() if separate else 1
        if name == "http" and values.get("processes") == AUTO:
            values["processes"] = auto_http_processes()
        sections[name] = cls(**values)
    settings = Settings(**sections)
    if "admin" in document and not settings.admin.users:
        # A dashboard nobody can log in to is a mistake, not a choice.
        raise ConfigError(
            "admin.users",
            "[admin] needs at least one [[admin.users]] (username, and a password_hash"
            " from `optout-relay account hash-password`)",
        )
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
    if settings.feedback.listen is not None and not settings.feedback_domains():
        raise ConfigError("feedback.domain", "the feedback listener needs a domain to answer for")


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
