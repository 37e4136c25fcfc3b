"""DKIM signing for the relay's outgoing copies (RFC 6376, RFC 8463) and the keys it signs with.

    signer = load_signer("example.com", "s2025", "keys/example.com.s2025.pem")
    copy = signer.sign(copy) + copy

Nothing here logs; no error message carries key material.
"""

from __future__ import annotations

import os

from .errors import DkimError, DkimKeyError, DkimMessageError
from .keys import (
    DkimTxtRecord,
    KeyAlgorithm,
    dns_record,
    generate_key,
    key_file_name,
    load_private_key,
    parse_private_key,
)
from .signer import (
    SIGNED_HEADERS,
    SIGNED_IF_PRESENT,
    DkimSigner,
    PrivateKey,
    SigningMemo,
    UnsignedField,
    UnsignedFields,
    signing_domains,
)

__all__ = [
    "SIGNED_HEADERS",
    "SIGNED_IF_PRESENT",
    "DkimError",
    "DkimKeyError",
    "DkimMessageError",
    "DkimSigner",
    "DkimTxtRecord",
    "KeyAlgorithm",
    "PrivateKey",
    "SigningMemo",
    "UnsignedField",
    "UnsignedFields",
    "dns_record",
    "generate_key",
    "key_file_name",
    "load_private_key",
    "load_signer",
    "parse_private_key",
    "signing_domains",
]


def load_signer(
    domain: str,
    selector: str,
    key_file: str | os.PathLike[str],
    *,
    second_selector: str | None = None,
    second_key_file: str | os.PathLike[str] | None = None,
) -> DkimSigner:
    """A signer for `domain` with the key in `key_file` and, when both are given, a second
    signature (typically Ed25519) with `second_key_file` under `second_selector`."""
    if (second_selector is None) != (second_key_file is None):
        raise DkimError("a second DKIM key needs both a selector and a key file")
    second = None
    if second_selector is not None and second_key_file is not None:
        second = (second_selector, load_private_key(second_key_file))
    return DkimSigner(domain, selector, load_private_key(key_file), second=second)
