"""The one signing primitive: itsdangerous, a namespace per token kind, rotating keys.

Tokens are in itsdangerous' `URLSafeTimedSerializer` format (newest key). `Signer.sign`
makes them as it does, byte for byte, with the keyed HMAC states made once: every copy of a
message carries two or three tokens, and itsdangerous derives the key and keys a new HMAC
for each, twice the cost of the rest. They are checked by `Signer.open`, which reads the
same format with itsdangerous' own key derivation but is stricter (canonical base64 only, so
a token has exactly one spelling) and about five times faster: the open pixel verifies a
token on every request, and itsdangerous' general-purpose path costs more than the rest of
the request. A self-test at construction refuses to run if either ever disagrees with
itsdangerous on a token.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any

from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from .errors import BadToken

# Links must keep working for at least a year (law asks 30-60 days); two years of slack.
DEFAULT_MAX_AGE = timedelta(days=730)
# Longer than any token the relay makes (a click token carries a URL of at most 2 KB).
MAX_TOKEN_LENGTH = 4096
# A truncated MAC is still 2^-64 per forgery attempt at its shortest; at most the digest.
MIN_SHORT_MAC = 8
SHORT_MAC_LIMIT = 20
# JSON shorter than this is not tried with zlib: its six bytes of framing leave nothing to
# gain (none of 2,000 recipient tokens was compressed by itsdangerous), and setting up a
# compressor (zeroing its 256 KiB of state) costs twice the rest of the token.
COMPRESS_FROM = 100
_JSON = json.JSONDecoder()
_JSON_OUT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # itsdangerous' own
_TO_STANDARD = bytes.maketrans(b"-_+/", b"+/-_")  # "+" and "/" must not pass as themselves
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_PADS = {0: b"", 1: b"", 2: b"==", 3: b"="}


class Namespace(StrEnum):
    """Token kinds; a token signed for one never verifies as another."""

    UNSUBSCRIBE = "optout.unsubscribe"
    OPEN = "optout.open"
    CLICK = "optout.click"  # the recipient half of a click URL
    LINK = "optout.link"  # the link half: one destination URL of one message
    # Compact MACs (`Signer.short_mac`) over a copy id, for addresses at the feedback domain
    # and the reference header: each kind its own, so one never passes as another.
    RETURN_PATH = "optout.return-path"  # the per-copy envelope sender (VERP)
    MAILTO = "optout.mailto"  # the List-Unsubscribe mailto: address
    FEEDBACK_REF = "optout.feedback-ref"  # CFBL-Feedback-ID, for complaint reports


@dataclass(frozen=True, slots=True)
class Verified:
    """A genuine token: what it says, when it was signed, and which key signed it."""

    payload: Any
    signed_at: int  # Unix time, whole seconds (itsdangerous' timestamp)
    key_id: str


def key_id(key: bytes) -> str:
    """A short public name for a key: an HMAC of a fixed label under the key, never the key.

    It tells the operator which listed key verified a token (to know when an old key can be
    retired) and leaks nothing a token's own signature does not.
    """
    return hmac.new(key, b"optout-relay key id", hashlib.sha256).hexdigest()[:10]


class Signer:
    """Signs JSON payloads; the first key signs, every key verifies (rotation)."""

    def __init__(
        self, secret_keys: Sequence[str | bytes], *, max_age: timedelta = DEFAULT_MAX_AGE
    ) -> None:
        if not secret_keys:
            raise ValueError("at least one signing key is needed")
        keys = [k.encode() if isinstance(k, str) else k for k in secret_keys]
        self._keys = tuple(keys)
        self._max_age = int(max_age.total_seconds())
        self.key_ids = tuple(key_id(k) for k in keys)
        # Keys newest first, with itsdangerous' derivation: keyed HMAC states made once and
        # copied per token (cheaper than keying a new HMAC each time). The first signs.
        self._macs: dict[Namespace, list[tuple[Any, str]]] = {}
        for ns in Namespace:
            signer = TimestampSigner(keys[0], salt=ns.value)
            digest = signer.digest_method
            self._macs[ns] = [
                (hmac.new(signer.derive_key(k), digestmod=digest), kid)
                for k, kid in zip(keys, self.key_ids, strict=True)
            ]
        self._self_test()

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickling hands the same keys to the app's own event process over a private socket;
        # the keyed HMAC states cannot be pickled, so they are made again from the keys there.
        return (_rebuilt_signer, (self._keys, self._max_age))

    def sign(self, namespace: Namespace, payload: Any) -> str:
        return self.sign_at(namespace, payload, int(time.time()))

    def sign_at(self, namespace: Namespace, payload: Any, at: int) -> str:
        """As `sign`, with the time `at` (Unix seconds) in the token instead of now: the
        same payload and time always make the same token, whenever it is made (the one URL
        of every copy of a message, made again for a retry). Made as itsdangerous'
        URLSafeTimedSerializer.dumps makes it: compact JSON, compressed when that saves
        more than one byte, the time, the newest key's MAC; only a payload too short to
        gain from compression is not tried (see COMPRESS_FROM)."""
        text = _JSON_OUT.encode(payload).encode("utf-8")
        body = _b64encode(text)
        if len(text) >= COMPRESS_FROM:
            compressed = zlib.compress(text)
            if len(compressed) < len(text) - 1:
                body = b"." + _b64encode(compressed)
        value = body + b"." + _b64encode(at.to_bytes(8, "big").lstrip(b"\x00"))
        state = self._macs[namespace][0][0].copy()
        state.update(value)
        return (value + b"." + _b64encode(state.digest())).decode("ascii")

    def verify(self, namespace: Namespace, token: str) -> Any:
        """The payload of a genuine, unexpired token of `namespace`; BadToken otherwise."""
        return self.open(namespace, token).payload

    def open(self, namespace: Namespace, token: str) -> Verified:
        """A genuine, unexpired token of `namespace`, with its time and key; else BadToken."""
        if len(token) > MAX_TOKEN_LENGTH or not token.isascii():
            raise BadToken("not a token")
        raw = token.encode("ascii")
        value, dot, mac_part = raw.rpartition(b".")
        payload_part, dot2, stamp_part = value.rpartition(b".")
        if not dot or not dot2:
            raise BadToken("not a token")
        mac = _b64decode(mac_part)
        signed_by = None
        for keyed, kid in self._macs[namespace]:
            state = keyed.copy()
            state.update(value)
            # compare_digest: the time taken says nothing about how much of a forgery matched.
            if hmac.compare_digest(state.digest(), mac):
                signed_by = kid
                break
        if signed_by is None:
            raise BadToken("bad signature")
        # Only signed bytes from here on: the rest cannot be attacker-chosen.
        signed_at = int.from_bytes(_b64decode(stamp_part), "big")
        age = int(time.time()) - signed_at
        if age > self._max_age or age < 0:
            raise BadToken("expired")
        return Verified(_load(payload_part), signed_at, signed_by)

    def short_mac(self, namespace: Namespace, value: bytes, size: int) -> bytes:
        """The first `size` octets of the newest key's MAC of `value` in `namespace`: the
        same key derivation as the tokens, for places too small for a whole token (an
        address's local part has 64 octets, RFC 5321 §4.5.3.1.1)."""
        if not MIN_SHORT_MAC <= size <= SHORT_MAC_LIMIT:
            raise ValueError(f"a short MAC has {MIN_SHORT_MAC} to {SHORT_MAC_LIMIT} octets")
        state = self._macs[namespace][0][0].copy()
        state.update(value)
        return bytes(state.digest()[:size])

    def check_short_mac(self, namespace: Namespace, value: bytes, mac: bytes) -> str | None:
        """The id of the listed key whose short MAC of `value` is `mac`; None for a forgery."""
        if not MIN_SHORT_MAC <= len(mac) <= SHORT_MAC_LIMIT:
            return None
        for keyed, kid in self._macs[namespace]:
            state = keyed.copy()
            state.update(value)
            if hmac.compare_digest(state.digest()[: len(mac)], mac):
                return str(kid)
        return None

    def _self_test(self) -> None:
        probes = (["self-test", None, "\u00e9" * 40], ["short", 1])  # compressed, and not
        at = 1_700_000_000
        for ns in Namespace:
            for probe in probes:
                theirs = URLSafeTimedSerializer(
                    list(reversed(self._keys)),  # itsdangerous signs with the last
                    salt=ns.value,
                    signer=_SignedAt,
                    signer_kwargs={"at": at},
                ).dumps(probe)
                if self.sign_at(ns, probe, at) != theirs:
                    raise RuntimeError(f"tokens made unlike itsdangerous' for {ns}")
                if self.open(ns, self.sign(ns, probe)).payload != probe:
                    raise RuntimeError(f"token check disagrees with itsdangerous for {ns}")


class _SignedAt(TimestampSigner):
    """itsdangerous' timestamp signer with a given time instead of the clock's."""

    def __init__(self, *args: Any, at: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._at = at

    def get_timestamp(self) -> int:
        return self._at


def _rebuilt_signer(keys: tuple[bytes, ...], max_age: int) -> Signer:
    return Signer(keys, max_age=timedelta(seconds=max_age))


def _b64encode(data: bytes) -> bytes:
    """Unpadded URL-safe base64, as itsdangerous writes it."""
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=")


def _b64decode(part: bytes) -> bytes:
    """Unpadded URL-safe base64, in its one canonical spelling only."""
    try:
        data = binascii.a2b_base64(part.translate(_TO_STANDARD) + _PADS[len(part) % 4])
    except (binascii.Error, ValueError):
        raise BadToken("bad base64") from None
    # Re-encoding must give back exactly the input: no characters outside the URL-safe
    # alphabet ("+", "/", "=", whitespace are skipped or accepted by the decoder) and no
    # spare bits set in the last character (other spellings of the same bytes).
    if binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=") != part:
        raise BadToken("bad base64")
    return data


def _load(part: bytes) -> Any:
    """The payload of a token whose signature was checked: only our own bytes get here, so
    there is no inflating a hostile zip bomb."""
    compressed = part.startswith(b".")
    data = _b64decode(part[1:] if compressed else part)
    try:
        if compressed:
            data = zlib.decompress(data)
        return _JSON.decode(data.decode("utf-8"))
    except (zlib.error, ValueError, UnicodeDecodeError):
        raise BadToken("bad payload") from None
