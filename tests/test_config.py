"""Config: embedded defaults, the example file, and one-line errors with exit code 2."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path

import pytest

from relay.accounts import hash_password
from relay.config import load_settings, parse_settings, section_keys
from relay.cores import MAX_AUTO_PROCESSES, usable_cores
from relay.errors import ConfigError
from relay.settings import Downstream, Listen, Settings
from tests.helpers import PASSWORD, ROOT, run_cli

WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_embedded_defaults_match_the_contract() -> None:
    settings = Settings()
    assert settings.smtp.listen == Listen("127.0.0.1", 2525)
    assert settings.http.listen == Listen("127.0.0.1", 8080)
    assert settings.storage.dir == Path("optout-data")
    assert settings.delivery.downstream is None
    assert settings.signing.secret_keys is None
    assert settings.smtp.max_message_size == 26214400
    assert ipaddress.ip_address("127.0.0.1") in settings.smtp.trusted_networks[0]


def test_the_example_file_parses_and_documents_every_key() -> None:
    text = (ROOT / "config.example.toml").read_text()
    settings = load_settings(ROOT / "config.example.toml")
    assert settings == Settings()
    # Every key, the commented-out optional ones included, as `key = value` at a line start.
    setting = re.compile(r"^(# )?[a-z_]+ = ")
    uncommented = tomllib.loads(
        "\n".join(
            line.removeprefix("# ")
            for line in text.splitlines()
            if setting.match(line) or line.startswith(("[", "# ["))
        )
    )
    for section, keys in section_keys().items():
        assert set(uncommented[section]) == set(keys), section
    [account] = uncommented.pop("accounts")
    assert set(account) == {
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
    }
    [webhook] = uncommented["webhooks"]
    assert set(webhook) == {"url", "secret", "events", "previous_secret"}
    [user] = uncommented["admin"]["users"]
    assert set(user) == {"username", "password_hash"}
    user["password_hash"] = hash_password(PASSWORD)
    for needs_a_real_file in ("tls_cert", "tls_key", "implicit_tls_listen"):
        del uncommented["smtp"][needs_a_real_file]
    del uncommented["tracking"]["templates"]
    del uncommented["storage"]["database_password_file"]  # needs a real file too
    full = parse_settings(uncommented)
    assert full.storage.database == "postgresql://optout@db.example/optout?sslmode=verify-full"
    assert full.delivery.downstream == Downstream("127.0.0.1", 25)
    assert full.http.public_url == "https://mail.example.com"
    assert full.webhooks[0].events == ("unsubscribe", "complaint", "bounced")
    assert full.admin.enabled and full.admin.listen == Listen("127.0.0.1", 8081)


@pytest.mark.parametrize(
    ("document", "key"),
    [
        ({"smtp": {"lisen": "127.0.0.1:25"}}, "smtp.lisen"),
        ({"smpt": {}}, "smpt"),
        ({"storage": {"database": "mysql://db.example/optout"}}, "storage.database"),
        ({"storage": {"database": "postgresql://db:99999/x"}}, "storage.database"),
        ({"smtp": {"listen": "127.0.0.1:70000"}}, "smtp.listen"),
        ({"smtp": {"listen": "no-port"}}, "smtp.listen"),
        ({"smtp": {"max_message_size": "big"}}, "smtp.max_message_size"),
        ({"smtp": {"max_message_size": -1}}, "smtp.max_message_size"),
        ({"smtp": {"trusted_networks": ["10.0.0.0/33"]}}, "smtp.trusted_networks"),
        ({"http": {"public_url": "ftp://x"}}, "http.public_url"),
        ({"delivery": {"downstream": "http://x:25"}}, "delivery.downstream"),
        ({"delivery": {"downstream": "smtp://x:99999"}}, "delivery.downstream"),
        (
            {"delivery": {"retry_initial_delay": 10, "retry_max_delay": 5}},
            "delivery.retry_max_delay",
        ),
        ({"delivery": {"processes": "two"}}, "delivery.processes"),
        ({"delivery": {"processes": 0}}, "delivery.processes"),
        ({"http": {"processes": 0}}, "http.processes"),
        ({"http": {"processes": "many"}}, "http.processes"),
        ({"delivery": {"processes": 2, "separate_process": False}}, "delivery.processes"),
        ({"signing": {"secret_keys": ["short"]}}, "signing.secret_keys"),
        ({"signing": {"secret_keys": []}}, "signing.secret_keys"),
        ({"storage": "x"}, "storage"),
        ({"webhooks": [{"url": "ftp://crm.example/", "secret": WHSEC}]}, "webhooks[0].url"),
        ({"webhooks": [{"url": "https://crm.example/", "secret": "s3cr3t"}]}, "webhooks[0].secret"),
        ({"webhooks": [{"url": "https://crm.example/"}]}, "webhooks[0].secret"),
        (
            {"webhooks": [{"url": "https://crm.example/", "secret": WHSEC, "events": ["opne"]}]},
            "webhooks[0].events",
        ),
        (
            {"webhooks": [{"url": "https://crm.example/", "secret": WHSEC, "colour": "red"}]},
            "webhooks[0].colour",
        ),
        ({"webhooks": [{"url": "https://a.example/", "secret": WHSEC}] * 2}, "webhooks"),
        ({"webhook_delivery": {"concurrency": 1000}}, "webhook_delivery.concurrency"),
        ({"admin": {"listen": "127.0.0.1:8081"}}, "admin.users"),
        (
            {"admin": {"users": [{"username": "ops", "password_hash": "x"}]}},
            "admin.users[0].password_hash",
        ),
        ({"admin": {"users": [{"username": "ops"}]}}, "admin.users[0].password_hash"),
    ],
)
def test_bad_values_name_their_key(document: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(document)
    assert caught.value.key == key


def test_delivery_processes_auto_is_one_per_two_usable_cores(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    assert parse_settings({}).delivery.processes == max(1, min(cores // 2, MAX_AUTO_PROCESSES))
    assert parse_settings({"delivery": {"processes": "auto"}}) == parse_settings({})
    assert parse_settings({"delivery": {"processes": 3}}).delivery.processes == 3
    # Delivery on the front door's loop is one process, "auto" or not.
    alone = {"separate_process": False}
    assert parse_settings({"delivery": alone}).delivery.processes == 1
    assert parse_settings({"delivery": {**alone, "processes": "auto"}}).delivery.processes == 1
    # A container's CPU quota counts: 1.5 CPUs is two processes, at most the CPU set's.
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert usable_cores(quota) == min(cores, 2)
    quota.write_text("max 100000\n")
    assert usable_cores(quota) == cores


def test_http_processes_auto_is_one_per_usable_core_at_most_four() -> None:
    auto = parse_settings({"http": {"processes": "auto"}}).http.processes
    assert auto == max(1, min(usable_cores(), 4))
    assert parse_settings({"http": {"processes": 3}}).http.processes == 3


def test_accounts_and_dkim_keys_read_domain_names_by_one_rule(tmp_path: Path) -> None:
    (tmp_path / "tls.pem").write_text("")  # accounts need TLS; the files are read at start
    tls = {"tls_cert": str(tmp_path / "tls.pem"), "tls_key": str(tmp_path / "tls.pem")}
    account = {"username": "shop", "password_hash": hash_password("pw"), "from_domains": []}
    key = {"selector": "S2026", "key_file": "k.pem"}
    for written, meant in [
        ("Shop.Example.", "shop.example"),
        ("bücher.example", "xn--bcher-kva.example"),
    ]:
        settings = parse_settings(
            {
                "smtp": tls,
                "accounts": [{**account, "from_domains": [written]}],
                "dkim": {"keys": [{**key, "domain": written}]},
                "suppression": {"ignore_dots_domains": [written]},
            }
        )
        assert settings.accounts[0].from_domains == (meant,)
        assert settings.dkim.keys[0].domain == meant
        assert settings.dkim.keys[0].selector == "s2026"
        assert settings.suppression.ignore_dots_domains == (meant,)
    for bad in ("localhost", "shop..example", "-shop.example", "shop_example.com"):
        for document, where in [
            (
                {"smtp": tls, "accounts": [{**account, "from_domains": [bad]}]},
                "accounts[0].from_domains",
            ),
            ({"dkim": {"keys": [{**key, "domain": bad}]}}, "dkim.keys[0].domain"),
        ]:
            with pytest.raises(ConfigError) as caught:
                parse_settings(document)
            assert caught.value.key == where


def test_storage_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError) as caught:
        parse_settings({"storage": {"dir": str(tmp_path / "file")}})
    assert caught.value.key == "storage.dir"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[smtp]\nlisten = 25\n", "smtp.listen: must be a string, not an integer"),
        ("[smtp]\nlisten = '127.0.0.1:0'\n", "smtp.listen: port must be between 1 and 65535"),
        ("[smtp\nlisten=", "is not valid TOML"),
        ("[delivery]\nfoo = 1\n", "delivery.foo: unknown key"),
        (b"\xff\xfe[smtp]", "is not UTF-8"),
    ],
)
def test_serve_with_a_bad_config_is_one_line_and_exit_2(
    tmp_path: Path, content: str | bytes, expected: str
) -> None:
    config = tmp_path / "relay.toml"
    if isinstance(content, bytes):
        config.write_bytes(content)
    else:
        config.write_text(content)
    result = run_cli("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("optout-relay: error: config: ")
    assert expected in lines[0]
    assert not (tmp_path / "optout-data").exists()


def test_missing_config_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_cli("suppress", "list", "--config", str(tmp_path / "absent.toml"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "cannot read" in result.stderr


def test_port_in_use_names_the_key(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "relay.toml"
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            http_port = free.getsockname()[1]
        config.write_text(
            f'[storage]\ndir = "{tmp_path / "data"}"\n'
            f'[smtp]\nlisten = "127.0.0.1:{port}"\n[http]\nlisten = "127.0.0.1:{http_port}"\n'
        )
        result = run_cli("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"optout-relay: error: config: smtp.listen: cannot listen on 127.0.0.1:{port}")
    )
