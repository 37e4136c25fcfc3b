"""Opening what the relay keeps in its data dir: the stores, the secrets, the DKIM signers.

Every file name under `storage.dir` is named here once. Nothing here imports aiohttp,
aiosmtpd or the delivery machinery: the CLI and a delivery process both start from it.

With `storage.database`, the stores are in that PostgreSQL database instead of optout.db,
and so are the keys every node must agree on (the address-hash key, the signing key when
none is configured): made once by the first node, read by the others, never logged."""

from __future__ import annotations

import functools
import os
import secrets
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from suppression import MIGRATIONS as SUPPRESSION_MIGRATIONS
from suppression import (
    AddressHasher,
    Connection,
    ConsentStore,
    Database,
    Engine,
    EngineSpec,
    SuppressionError,
    SuppressionStore,
)
from suppression.database import utc_now
from suppression.errors import SchemaMissing
from tracking.events import MIGRATIONS as EVENT_MIGRATIONS
from tracking.events import EventStore
from tracking.signing import Signer
from tracking.statistics import Statistics
from tracking.tokens import TrackingUrls
from tracking.webhooks import MIGRATIONS as WEBHOOK_MIGRATIONS
from tracking.webhooks import WebhookOutbox

from .errors import ConfigError, MissingStore, RelayError
from .feedback.schema import MIGRATIONS as FEEDBACK_MIGRATIONS
from .feedback.store import FeedbackStore
from .settings import Settings

if TYPE_CHECKING:
    from .dkim import DkimSigner

STORE_FILE = "optout.db"
SPOOL_FILE = "spool.db"
PENDING_EVENTS_FILE = "pending-events.db"
OUTBOX_DIR = "outbox"
SIGNING_KEY_FILE = "signing.key"
HASH_KEY_FILE = "address-hash.key"
# Their names in a shared store's `shared_keys` table.
HASH_KEY = "address-hash"
SIGNING_KEY = "signing"
STORE_MIGRATIONS = (
    SUPPRESSION_MIGRATIONS + EVENT_MIGRATIONS + FEEDBACK_MIGRATIONS + WEBHOOK_MIGRATIONS
)


class Stores:
    """The suppression list, the event log and the webhook outbox, opened from the data dir
    (async context)."""

    def __init__(self, settings: Settings, *, create: bool = True) -> None:
        """`create`: make the data dir, store and keys when missing; else MissingStore
        (a command that only reads must not leave an empty store behind)."""
        self.settings = settings
        self._create = create
        self._db: Engine | None = None
        self._signing_keys: tuple[str, ...] | None = None

    @property
    def database(self) -> Engine:
        assert self._db is not None
        return self._db

    def signer(self) -> Signer:
        """The one signing primitive: the configured keys, else the generated one (in the
        shared database, or in the data dir)."""
        if self._signing_keys is not None:
            return Signer(self._signing_keys)
        return signer(self.settings)

    async def __aenter__(self) -> Stores:
        if self.settings.storage.database is not None:
            hasher = await self._open_shared(self.settings.storage.database)
        else:
            hasher = await self._open_local()
        assert self._db is not None
        self.suppressions = SuppressionStore(self._db, hasher)
        self.consents = ConsentStore(self._db, hasher)  # to individual tracking
        self.events = EventStore(self._db)
        # Both filled as events and suppression changes are written, in their transactions.
        self.webhooks = WebhookOutbox(self._db)
        self.statistics = Statistics(self._db)
        self.feedback = FeedbackStore(self._db)
        try:
            # A changed normalisation would silently stop old entries matching: refuse it.
            await self.suppressions.verify_normalization()
        except SuppressionError as exc:
            await self._db.close()
            raise ConfigError("suppression", str(exc)) from None
        return self

    async def _open_shared(self, url: str) -> AddressHasher:
        spec = engine_spec(self.settings)
        try:
            self._db = await spec.open(STORE_MIGRATIONS, create=self._create)
        except SchemaMissing:
            raise MissingStore(self._db_location(url)) from None
        try:
            hash_key = await self._db.write(
                functools.partial(shared_secret, name=HASH_KEY, create=self._create)
            )
            if not self.settings.signing.secret_keys:
                signing_key = await self._db.write(
                    functools.partial(shared_secret, name=SIGNING_KEY, create=True)
                )
                self._signing_keys = (signing_key,)
        except BaseException:
            await self._db.close()
            raise
        return AddressHasher(hash_key.encode(), policy=self.settings.suppression)

    @staticmethod
    def _db_location(url: str) -> str:
        from suppression.postgres import redacted

        return redacted(url)

    async def _open_local(self) -> AddressHasher:
        data_dir = self.settings.storage.dir
        if (data_dir / STORE_FILE).is_file():
            if not (data_dir / HASH_KEY_FILE).is_file():
                # A new key would silently stop every stored suppression matching.
                raise ConfigError(
                    "storage.dir",
                    f"{data_dir / HASH_KEY_FILE} is missing beside {STORE_FILE}: restore it"
                    " from a backup (the stored suppressions are keyed by it)",
                )
        elif not self._create:
            raise MissingStore(data_dir)
        ensure_private_dir(data_dir)
        hasher = AddressHasher(
            load_or_create_secret(data_dir / HASH_KEY_FILE).encode(),
            policy=self.settings.suppression,
        )
        self._db = await Database.open(data_dir / STORE_FILE, STORE_MIGRATIONS)
        return hasher

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._db is not None:
            await self._db.close()

    async def quick_check(self) -> list[str]:
        """What SQLite's quick_check finds wrong with the store's file ([] if nothing; a
        shared PostgreSQL store's files are its server's to check)."""
        if isinstance(self._db, Database):
            return await self._db.quick_check()
        return []

    async def probe_write(self) -> None:
        """Raises when the store cannot take a write now."""
        if isinstance(self._db, Database):
            await self._db.probe_write()
        else:
            await self.database.write(lambda db: db.execute("SELECT 1").fetchone())


def engine_spec(settings: Settings) -> EngineSpec:
    """Where the stores are: the shared database (with its password file read), or
    optout.db in the data dir."""
    storage = settings.storage
    if storage.database is None:
        return EngineSpec(path=storage.dir / STORE_FILE)
    password = None
    if storage.database_password_file is not None:
        try:
            lines = storage.database_password_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("storage.database_password_file", f"cannot read it: {exc}") from None
        password = lines[0] if lines else ""
    return EngineSpec(url=storage.database, password=password)


class MissingSharedKey(RelayError):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"the shared database holds suppressions but no {name} key: restore the"
            " shared_keys table from a backup (the stored suppressions are keyed by it)"
        )


def shared_secret(db: Connection, *, name: str, create: bool) -> str:
    """A shared store's key `name`, made now (256 random bits) if no node made it yet: in a
    write transaction, so nodes starting together agree on one. The address-hash key is
    never made again for a store that already has entries (they would stop matching)."""
    row = db.execute("SELECT value FROM shared_keys WHERE name = ?", [name]).fetchone()
    if row is not None:
        return str(row[0])
    if name == HASH_KEY:
        used = db.execute(
            "SELECT EXISTS (SELECT 1 FROM suppressions) OR EXISTS (SELECT 1 FROM contacts)"
        ).fetchone()[0]
        if used:
            raise MissingSharedKey(name)
    if not create:
        raise MissingStore("the shared database (it has no keys yet)")
    value = secrets.token_urlsafe(32)
    db.execute(
        "INSERT INTO shared_keys (name, value, created_at) VALUES (?, ?, ?)",
        [name, value, utc_now()],
    )
    return value


def signer(settings: Settings) -> Signer:
    """The one signing primitive, with the configured keys or the generated one."""
    keys = settings.signing.secret_keys or (
        load_or_create_secret(settings.storage.dir / SIGNING_KEY_FILE),
    )
    return Signer(keys)


def tracking_urls(settings: Settings, signed_by: Signer | None = None) -> TrackingUrls:
    public_url = settings.http.public_url or f"http://{settings.http.listen}"
    return TrackingUrls(public_url, signed_by or signer(settings))


def load_dkim_signers(settings: Settings) -> dict[str, DkimSigner]:
    """A signer per configured domain; a missing or unsafe key file is a config error."""
    # Imported here: every CLI command opens the stores, none signs, and the cryptography
    # package is a sixth of the CLI's start-up.
    from .dkim import DkimError, load_signer

    base = settings.storage.dir

    def under_storage(path: Path) -> Path:
        return path if path.is_absolute() else base / path

    signers = {}
    for index, key in enumerate(settings.dkim.keys):
        try:
            signers[key.domain] = load_signer(
                key.domain,
                key.selector,
                under_storage(key.key_file),
                second_selector=key.second_selector,
                second_key_file=(
                    under_storage(key.second_key_file) if key.second_key_file else None
                ),
            )
        except DkimError as exc:
            raise ConfigError(f"dkim.keys[{index}]", str(exc)) from None
    return signers


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
