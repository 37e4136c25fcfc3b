"""Header fields the relay adds as a submission server (RFC 6409 section 8, RFC 5321 section
4.4) and as a list (RFC 2919): Received, Date, Message-ID, List-Id. Each is CRLF-terminated,
folded under 78 characters where it can be, ASCII only."""

from __future__ import annotations

import hashlib
import ipaddress
import re
import unicodedata
from datetime import UTC, datetime
from email.utils import format_datetime
from enum import StrEnum

from tracking.network import parse_ip, truncated

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_CLIENT = re.compile(r"(?P<helo>.*)\[(?P<ip>[^\[\]]*)\]")
_LABEL_JUNK = re.compile(r"[^a-z0-9]+")
_QTEXT_UNSAFE = re.compile(r'["\\]')
FOLD_AT = 78
MAX_LABEL = 63  # one DNS label: RFC 2919 list-ids look like domain names


class ReceivedClient(StrEnum):
    """What the relay's Received field says about the client that submitted the message."""

    FULL = "full"  # its HELO name and its IP address
    NETWORK = "network"  # its HELO name and its /24 (IPv4) or /48 (IPv6) network
    OMITTED = "omitted"  # nothing: the queue id leads to the log line that names it


def rfc5322_date(moment: float) -> str:
    return format_datetime(datetime.fromtimestamp(moment, UTC))


def date_field(moment: float) -> bytes:
    return f"Date: {rfc5322_date(moment)}\r\n".encode("ascii")


def message_id(queue_id: str, moment: float, hostname: str) -> str:
    """A Message-ID for a submission without one, as Postfix makes them: the arrival time and
    the queue id at the relay's name. The same on every retry of the same message."""
    stamp = datetime.fromtimestamp(moment, UTC).strftime("%Y%m%d%H%M%S")
    return f"<{stamp}.{queue_id}@{_host(hostname)}>"


def message_id_field(value: str) -> bytes:
    return f"Message-ID: {value}\r\n".encode("ascii")


def received_field(
    *,
    client: str | None,
    hostname: str,
    queue_id: str,
    moment: float,
    authenticated: bool,
    mode: ReceivedClient,
) -> bytes:
    """The relay's own hop (RFC 5321 section 4.4). `client` is the spool's `HELO[IP]`."""
    helo, address = _client(client)
    if mode is ReceivedClient.OMITTED or (helo is None and address is None):
        source = ""
    elif mode is ReceivedClient.NETWORK:
        source = f"from {helo or 'unknown'}"
        if address is not None:
            source += f" ({truncated(address)})"
    else:
        source = f"from {helo or 'unknown'}"
        if address is not None:
            literal = f"IPv6:{address}" if address.version == 6 else str(address)
            source += f" ([{literal}])"
    protocol = "ESMTPSA" if authenticated else "ESMTP"
    by = f"by {_host(hostname)} (optout-relay) with {protocol} id {queue_id};"
    lines = [source, by] if source else [by]
    return ("Received: " + "\r\n\t".join(lines) + f"\r\n\t{rfc5322_date(moment)}\r\n").encode(
        "ascii"
    )


def _client(
    client: str | None,
) -> tuple[str | None, ipaddress.IPv4Address | ipaddress.IPv6Address | None]:
    """(HELO name, address) from the spool's `HELO[IP]`. A HELO that is no domain name is
    left out (an address literal too: it would give away what the mode leaves out)."""
    found = _CLIENT.fullmatch(client or "")
    if found is None:
        return None, None
    helo = found.group("helo").strip()
    name = helo if _DOMAIN.fullmatch(helo) and len(helo) <= 253 and helo != "unknown" else None
    return name, parse_ip(found.group("ip"))


def _host(hostname: str) -> str:
    return hostname if _DOMAIN.fullmatch(hostname) else "localhost"


def list_id(campaign: str, domain: str) -> str | None:
    """`<label.domain>` for a campaign (RFC 2919): the campaign's name made a DNS-style label
    (accents dropped, other characters as hyphens; a hash when nothing is left) under the
    sender's domain. None when the domain cannot be written in ASCII."""
    try:
        ascii_domain = domain.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    if not ascii_domain or not _DOMAIN.fullmatch(ascii_domain):
        return None
    folded = unicodedata.normalize("NFKD", campaign).encode("ascii", "ignore").decode()
    label = _LABEL_JUNK.sub("-", folded.lower()).strip("-")[:MAX_LABEL].strip("-")
    if not label:
        label = "c-" + hashlib.sha256(campaign.encode("utf-8")).hexdigest()[:12]
    return f"<{label}.{ascii_domain}>"


def list_id_field(campaign: str, identifier: str) -> bytes:
    """List-Id with the campaign's name as its phrase when that is printable ASCII."""
    name = campaign[:60].strip()
    value = identifier
    if name and name.isascii() and name.isprintable():
        phrase = '"' + _QTEXT_UNSAFE.sub(lambda m: "\\" + m.group(), name) + '"'
        joined = f"{phrase} {identifier}"
        fits = len("List-Id: ") + len(joined) <= FOLD_AT
        value = joined if fits else f"{phrase}\r\n {identifier}"
    return f"List-Id: {value}\r\n".encode("ascii")
