"""A private Postfix instance for integration tests: its own config, queue and Maildir.

See ../shared/notes/postfix-private-instance.md for why each setting is here.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
GLOBAL_MAIN_CF = Path("/etc/postfix/main.cf")


def unavailable_reason() -> str | None:
    if not Path(POSTFIX).exists():
        return "Debian's postfix is not installed (apt-get install postfix; .ci/run does)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "the postfix user does not exist"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _inline(table: Mapping[str, str]) -> str:
    """A Postfix inline: lookup table (no spaces, so it fits a master.cf -o value); an entry
    whose value holds commas goes in braces of its own."""
    entries = [
        f"{{{key}={value}}}" if "," in value else f"{key}={value}" for key, value in table.items()
    ]
    return "inline:{" + ",".join(entries) + "}"


def _master_cf(port: int, smtp_aliases: Mapping[str, str]) -> str:
    lines = []
    for line in Path("/etc/postfix/master.cf").read_text().splitlines():
        fields = line.split()
        if line and not line[0].isspace() and not line.startswith("#") and len(fields) >= 8:
            if fields[0] == "smtp" and fields[1] == "inet":
                fields[0] = str(port)
                if smtp_aliases:
                    fields.append("-o cleanup_service_name=smtpcleanup")
            fields[4] = "n"  # no chroot: the queue lives in a temp dir without a chroot jail
            line = "  ".join(fields)
        lines.append(line)
    if smtp_aliases:
        # Mail received over SMTP is cleaned up by a service of its own, with aliases of
        # its own instead of those for the mail Postfix makes itself.
        lines.append(
            f"smtpcleanup unix n - n - 0 cleanup -o virtual_alias_maps={_inline(smtp_aliases)}"
        )
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _allowed_config_directory(conf: Path) -> Iterator[None]:
    """Postfix only accepts a config dir that the default main.cf names."""
    original = GLOBAL_MAIN_CF.read_text() if GLOBAL_MAIN_CF.exists() else None
    text = original or ""
    match = re.search(r"^alternate_config_directories\s*=(.*)$", text, re.MULTILINE)
    if match:
        text = text.replace(match.group(0), f"{match.group(0)} {conf}")
    else:
        text += f"\nalternate_config_directories = {conf}\n"
    GLOBAL_MAIN_CF.write_text(text)
    try:
        yield
    finally:
        if original is None:
            GLOBAL_MAIN_CF.unlink()
        else:
            GLOBAL_MAIN_CF.write_text(original)


class Postfix:
    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.conf = root / "conf"
        self.maildir = root / "mail" / "catchall"

    def delivered(self) -> list[bytes]:
        new = self.maildir / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def control(self, action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.conf), action],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


@contextlib.contextmanager
def running_postfix(
    domains: tuple[str, ...] = ("example.org",),
    extra: tuple[str, ...] = (),
    *,
    mailboxes: tuple[str, ...] | None = None,
    transports: Mapping[str, str] | None = None,
    aliases: Mapping[str, str] | None = None,
    smtp_aliases: Mapping[str, str] | None = None,
) -> Iterator[Postfix]:
    """A private instance delivering `domains` into one Maildir.

    `extra`: main.cf lines after the defaults (a later setting wins in Postfix).
    `mailboxes`: the only addresses that exist; mail to others is accepted and then bounced,
    as a real MTA bounces after the fact. `transports`: domain -> next hop, e.g.
    "smtp:[127.0.0.1]:2525". `aliases`: address -> addresses (comma-separated; the address
    itself may be one of them), for the mail Postfix makes itself (its bounces).
    `smtp_aliases`: the same for mail that arrives over SMTP, which then ignores `aliases`.
    """
    user = pwd.getpwnam("postfix")
    root = Path(tempfile.mkdtemp(prefix="optout-postfix-"))
    root.chmod(0o755)
    port = _free_port()
    instance = Postfix(root, port)
    instance.conf.mkdir()
    (root / "queue").mkdir(mode=0o755)  # postfix start fills it, but will not create it
    for owned in (root / "data", root / "mail"):
        owned.mkdir()
        os.chown(owned, user.pw_uid, user.pw_gid)
    (instance.conf / "master.cf").write_text(_master_cf(port, smtp_aliases or {}))
    maps = []
    if mailboxes is not None:
        maps += [
            f"virtual_mailbox_maps = {_inline(dict.fromkeys(mailboxes, 'catchall/'))}",
            "smtpd_reject_unlisted_recipient = no",
        ]
    else:
        maps.append("virtual_mailbox_maps = static:catchall/")
    if transports:
        maps.append(f"transport_maps = {_inline(transports)}")
    if aliases:
        maps.append(f"virtual_alias_maps = {_inline(aliases)}")
    (instance.conf / "main.cf").write_text(
        "\n".join(
            [
                "compatibility_level = 3.6",
                f"queue_directory = {root / 'queue'}",
                f"data_directory = {root / 'data'}",
                "mail_owner = postfix",
                "setgid_group = postdrop",
                "myhostname = postfix.test",
                "inet_interfaces = 127.0.0.1",
                "inet_protocols = ipv4",
                "mynetworks = 127.0.0.0/8",
                "mydestination =",
                "alias_maps =",
                "alias_database =",
                f"virtual_mailbox_domains = {' '.join(domains)}",
                f"virtual_mailbox_base = {root / 'mail'}",
                *maps,
                f"virtual_uid_maps = static:{user.pw_uid}",
                f"virtual_gid_maps = static:{user.pw_gid}",
                f"maillog_file = {root / 'maillog'}",
                f"maillog_file_prefixes = /var, /dev/stdout, {root}",
                "smtpd_banner = $myhostname ESMTP",
                *extra,
                "",
            ]
        )
    )
    with _allowed_config_directory(instance.conf):
        started = instance.control("start")
        if started.returncode != 0:
            raise RuntimeError(f"postfix start failed: {started.stderr}{instance.log()}")
        try:
            _wait_listening(port)
            yield instance
        finally:
            instance.control("stop")
            _wait_closed(port)
            shutil.rmtree(root, ignore_errors=True)


def _wait_listening(port: int, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        time.sleep(0.05)
    raise RuntimeError(f"postfix is not listening on {port}")


def _wait_closed(port: int, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return
        time.sleep(0.05)
