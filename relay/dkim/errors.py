"""The DKIM module's exceptions. Messages name files and fields, never key material."""

from __future__ import annotations

from ..errors import RelayError


class DkimError(RelayError):
    """Base of every error the DKIM module raises on purpose."""


class DkimKeyError(DkimError):
    """A private key file that is missing, unreadable, too open, malformed or unsupported."""


class DkimMessageError(DkimError):
    """A message that cannot be signed as it is (no From field, a malformed header block)."""
