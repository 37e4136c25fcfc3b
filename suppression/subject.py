"""Data-subject requests (GDPR Arts. 15 and 17): export everything held, or erase it.

Erasure keeps exactly one thing: the keyed hash, as a global suppression tombstone, so the
erased address stays suppressed (design rule 8) while no plain address is left behind. The
suppression store does its own part; every other store (events, spool, outbox) takes part
through a `DataHolder`, so this package needs to know nothing about them.
"""

from __future__ import annotations

import contextlib
import unicodedata
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import audit
from .addresses import digest_texts, normalize_address
from .database import utc_now, zeroing
from .engine import Connection
from .entries import Entry, Outcome, apply_entries
from .errors import InvalidAddress
from .reasons import Reason
from .scopes import GLOBAL
from .store import SuppressionStore, subject_record


def caseless(text: str) -> str:
    """Text compared without case in any script (not only ASCII, as bytes.lower() and
    SQLite's lower() do) and in one Unicode normal form."""
    return text.lower() if text.isascii() else unicodedata.normalize("NFC", text).casefold()


@dataclass(frozen=True, slots=True)
class Subject:
    """The person a request is about, as every store can find them."""

    address: str  # as the request gave it
    normalized: str
    address_hash: str
    keys: tuple[str, ...]  # the keyed hash, then md5/sha256 keys of hashed lists
    # The store's normalisation (its policy), so that holders compare as the store does.
    normalize: Callable[[str], str] = field(default=normalize_address, compare=False)

    def mentioned_in(self, text: str) -> bool:
        """Whether `text` (a Message-ID, say) contains this person's address in one of its
        usual spellings, without regard to case."""
        folded = caseless(text)
        return any(spelling in folded for spelling in self.spellings())

    def spellings(self) -> list[str]:
        """How the address may be written: as given, normalised, with the domain in IDNA or
        Unicode form; caseless (see `caseless`)."""
        texts = [self.address.strip().strip("<>"), self.normalized]
        with contextlib.suppress(InvalidAddress):
            texts.extend(digest_texts(self.address))
        return list(dict.fromkeys(caseless(text) for text in texts))

    def matches(self, address: str) -> bool:
        """Whether `address`, however spelt (case, IDNA or Unicode domain, NFC or not), is
        this person's: compared in the normalised form, never by SQLite's ASCII lower()."""
        try:
            return self.normalize(address) == self.normalized
        except InvalidAddress:
            return False


# What a holder's erasure did: a count of what it names `effect`, or counts by effect.
Erased = int | Mapping[str, int]


@dataclass(frozen=True, slots=True)
class DataHolder:
    """A store holding personal data: what it has about a subject, and how to delete it.

    `effect` says what `erase` did to what it counts ("deleted", "anonymised"), for the
    report, when it returns a plain count.
    """

    name: str
    export: Callable[[Subject], Awaitable[Any]]
    erase: Callable[[Subject], Awaitable[Erased]]
    effect: str = "removed"


@dataclass(slots=True)
class ErasureReport:
    address_hash: str
    tombstone: Outcome
    suppressions_kept: int  # entries still in force, now without the plain address
    contact_deleted: bool
    erased: dict[str, int] = field(default_factory=dict)  # per holder: everything it changed
    effects: dict[str, dict[str, int]] = field(default_factory=dict)  # per holder, by effect
    checkpointed: bool = False  # False: a reader kept old pages in the WAL; run again


def subject_of(store: SuppressionStore, address: str) -> Subject:
    keys = store.hasher.lookup_keys(address)
    return Subject(address, store.hasher.normalize(address), keys[0], keys, store.hasher.normalize)


async def export_subject(
    store: SuppressionStore, address: str, holders: Sequence[DataHolder], *, actor: str | None
) -> dict[str, Any]:
    """Everything held about `address`, as JSON-ready data. The request itself is audited."""
    subject = subject_of(store, address)
    record = await store.database.read(
        lambda db: subject_record(db, subject.normalized, subject.keys)
    )
    document: dict[str, Any] = {
        "address": subject.normalized,
        "address_hash": subject.address_hash,
        "exported_at": utc_now(),
        "suppressions": [entry.as_dict() for entry in record.suppressions],
        "suppression_history": [change.as_dict() for change in record.history],
        "contact": (
            None
            if record.contact_first_seen_at is None
            else {"address": subject.normalized, "first_seen_at": record.contact_first_seen_at}
        ),
        "erased_at": record.erased_at,
    }
    for holder in holders:
        document[holder.name] = await holder.export(subject)
    await store.database.write(
        lambda db: audit.record(
            db,
            "subject-export",
            address_hash=subject.address_hash,
            source="subject-request",
            actor=actor,
            detail={"parts": ["suppressions", *(h.name for h in holders)]},
        )
    )
    return document


async def erase_subject(
    store: SuppressionStore, address: str, holders: Sequence[DataHolder], *, actor: str | None
) -> ErasureReport:
    """Delete the personal data of `address` everywhere; keep it suppressed by hash.

    Safe to run again: a second run finds nothing more to delete and changes nothing else.
    """
    subject = subject_of(store, address)
    # First the tombstone and our own plain copies, in one transaction: whatever fails later,
    # the person is already suppressed and their address gone from this store.
    report = await store.database.write(lambda db: _erase_own(db, subject, actor))
    for holder in holders:
        done = await holder.erase(subject)
        effects = {holder.effect: done} if isinstance(done, int) else dict(done)
        report.effects[holder.name] = effects
        report.erased[holder.name] = sum(effects.values())
    await store.database.write(
        lambda db: audit.record(
            db,
            "erase",
            address_hash=subject.address_hash,
            scope=GLOBAL,
            source="subject-request",
            actor=actor,
            detail={
                "suppressions_kept": report.suppressions_kept,
                "contact_deleted": report.contact_deleted,
                **{f"{name}_erased": count for name, count in report.erased.items()},
                "effects": report.effects,
            },
        )
    )
    # The WAL still holds page images from before the erasure until it is checkpointed.
    report.checkpointed = await store.database.checkpoint()
    return report


def _erase_own(db: Connection, subject: Subject, actor: str | None) -> ErasureReport:
    now = utc_now()
    with zeroing(db):
        db.execute(
            "INSERT INTO suppression_erasures (address_hash, erased_at) VALUES (?, ?)"
            " ON CONFLICT DO NOTHING",
            [subject.address_hash, now],
        )
        tombstone = Entry(subject.address_hash, GLOBAL, Reason.MANUAL, "erasure")
        [outcome] = apply_entries(db, [tombstone], actor=actor, now=now)
        db.execute(
            "UPDATE suppressions SET address = NULL, updated_at = ?"
            " WHERE address_hash = ? AND address IS NOT NULL",
            [now, subject.address_hash],
        )
        kept = db.execute(
            "SELECT COUNT(*) FROM suppressions WHERE address_hash = ?", [subject.address_hash]
        ).fetchone()[0]
        deleted = db.execute(
            "DELETE FROM contacts WHERE address_hash = ?", [subject.address_hash]
        ).rowcount
    return ErasureReport(subject.address_hash, outcome, int(kept), bool(deleted))
