"""DKIM private keys on disk (PEM, owner-only) and the DNS TXT records that publish them."""

from __future__ import annotations

import base64
import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from suppression import fsync_directory

from .errors import DkimKeyError
from .signer import PrivateKey, algorithm_of, check_domain, check_selector

KeyAlgorithm = Literal["rsa", "ed25519"]
PublicKey = rsa.RSAPublicKey | ed25519.Ed25519PublicKey

MAX_KEY_FILE_SIZE = 64 * 1024
DNS_STRING_MAX = 255  # one <character-string> of a TXT record (RFC 1035 section 3.3)


@dataclass(frozen=True, slots=True)
class DkimTxtRecord:
    """The TXT record that publishes a DKIM public key: `text` at `name`."""

    name: str  # selector._domainkey.domain
    text: str  # v=DKIM1; k=...; p=...

    @property
    def strings(self) -> tuple[str, ...]:
        """`text` cut into the <= 255-character strings one TXT record is made of; resolvers
        join them back without separators."""
        cut = DNS_STRING_MAX
        return tuple(self.text[i : i + cut] for i in range(0, len(self.text), cut))

    def zone_entry(self) -> str:
        """The record as a line of a BIND-style zone file."""
        quoted = " ".join(f'"{s}"' for s in self.strings)
        return f"{self.name}. IN TXT ( {quoted} )"

    def __str__(self) -> str:
        return self.zone_entry()


def dns_record(domain: str, selector: str, key: PrivateKey | PublicKey) -> DkimTxtRecord:
    """The TXT record (RFC 6376 section 3.6.1, RFC 8463) publishing `key`'s public half."""
    public: PublicKey | object = key
    if isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        text = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    elif isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        text = f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    else:
        raise DkimKeyError(f"{type(public).__name__} keys cannot be published for DKIM")
    name = f"{check_selector(selector)}._domainkey.{check_domain(domain)}"
    return DkimTxtRecord(name, text)


def parse_private_key(pem: bytes, source: str = "the key") -> PrivateKey:
    """An unencrypted PEM private key (PKCS#8 or PKCS#1), RSA of at least 1024 bits or Ed25519."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise DkimKeyError(
            f"{source} is encrypted; store DKIM keys unencrypted, readable by the owner only"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise DkimKeyError(f"{source} is not a PEM private key (RSA or Ed25519)") from None
    if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise DkimKeyError(f"{source} holds a key DKIM cannot use; use RSA or Ed25519")
    try:
        algorithm_of(key)
    except DkimKeyError as exc:
        raise DkimKeyError(f"{source}: {exc}") from None
    return key


def load_private_key(path: str | os.PathLike[str]) -> PrivateKey:
    """The private key in the PEM file `path`, which only its owner may read or write."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise DkimKeyError(f"DKIM key file {path} does not exist") from None
    except OSError as exc:
        raise DkimKeyError(f"cannot open DKIM key file {path}: {exc.strerror}") from None
    info = os.fstat(fd)  # the file opened, not whatever the path names now
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise DkimKeyError(f"DKIM key file {path} is not a regular file")
    with os.fdopen(fd, "rb") as file:
        if info.st_mode & 0o077:
            mode = stat.S_IMODE(info.st_mode)
            raise DkimKeyError(
                f"DKIM key file {path} is open to group or others (mode {mode:04o}); "
                f"make it owner-only: chmod 600 {path}"
            )
        if info.st_size > MAX_KEY_FILE_SIZE:
            raise DkimKeyError(f"DKIM key file {path} is too large to be a private key")
        try:
            pem = file.read(MAX_KEY_FILE_SIZE + 1)
        except OSError as exc:
            raise DkimKeyError(f"cannot read DKIM key file {path}: {exc.strerror}") from None
    return parse_private_key(pem, f"DKIM key file {path}")


def key_file_name(domain: str, selector: str) -> str:
    return f"{check_domain(domain)}.{check_selector(selector)}.pem"


def generate_key(
    domain: str,
    selector: str,
    directory: str | os.PathLike[str],
    algorithm: KeyAlgorithm = "rsa",
    *,
    bits: int = 2048,
) -> tuple[Path, DkimTxtRecord]:
    """A new key for `selector._domainkey.domain`, written to `directory/domain.selector.pem`
    (created with mode 0600, never overwriting a file), and the TXT record to publish for it."""
    file_name = key_file_name(domain, selector)
    if algorithm == "rsa":
        if not 2048 <= bits <= 8192:
            raise DkimKeyError(f"RSA DKIM keys are generated with 2048 to 8192 bits, not {bits}")
        key: PrivateKey = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    elif algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise DkimKeyError(f"unknown DKIM key algorithm {algorithm!r}; use 'rsa' or 'ed25519'")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    folder = Path(directory)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise DkimKeyError(f"cannot create key directory {folder}: {exc.strerror}") from None
    path = folder / file_name
    _write_new_private_file(path, pem)
    return path, dns_record(domain, selector, key)


def _write_new_private_file(path: Path, data: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise DkimKeyError(
            f"{path} already exists; not overwriting a key that may be published"
        ) from None
    except OSError as exc:
        raise DkimKeyError(f"cannot create DKIM key file {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise DkimKeyError(f"cannot write DKIM key file {path}: {exc.strerror}") from None
    # The key itself is on disk; a folder that cannot be fsynced is no reason to refuse it.
    with contextlib.suppress(OSError):
        fsync_directory(path.parent)
