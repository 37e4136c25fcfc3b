"""Secrets generated on first start into the data dir, readable by the owner only."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from .errors import ConfigError

SIGNING_KEY_FILE = "signing.key"
HASH_KEY_FILE = "address-hash.key"


def load_or_create_secret(path: Path) -> str:
    """The secret in `path`, created (mode 0600, 256 random bits) when it does not exist."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_secret(path)
    except OSError as exc:
        raise ConfigError("storage.dir", f"cannot create {path}: {exc.strerror}") from None
    secret = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as file:
        file.write(secret + "\n")
        file.flush()
        os.fsync(file.fileno())
    return secret


def _read_secret(path: Path) -> str:
    try:
        secret = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("storage.dir", f"cannot read key file {path}: {exc}") from None
    if len(secret) < 16:
        raise ConfigError("storage.dir", f"key file {path} is empty or too short")
    return secret


def ensure_private_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("storage.dir", f"cannot create {path}: {exc.strerror}") from None
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise ConfigError("storage.dir", f"{path} is not readable and writable")
