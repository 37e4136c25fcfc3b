"""Retention: how long each kind of event (and an unused contact address) is kept, and the
purge that applies it (`serve` hourly, `optout-relay purge` on demand)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from suppression import InvalidAge, format_age, parse_age

from .signing import DEFAULT_MAX_AGE as TOKEN_MAX_AGE

if TYPE_CHECKING:
    from suppression import SuppressionStore

    from .events import EventStore

FOREVER = "forever"  # a retention value: never purged
_DAY = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Retention:
    """How long each kind of event, and a contact address no event uses, is kept; None:
    for ever. `other` covers every event type without a key of its own (warnings, and kinds
    added later), so that nothing is kept for ever by default.

    The field names are the keys of the `[retention]` config section, values like "180d".
    The defaults: opens and clicks (personal, the most numerous) half a year; proof of an
    opt-out five years; delivery outcomes a year and a month (a year-on-year comparison).
    """

    open: timedelta | None = 180 * _DAY
    click: timedelta | None = 180 * _DAY
    unsubscribe: timedelta | None = 5 * 365 * _DAY
    delivered: timedelta | None = 400 * _DAY
    deferred: timedelta | None = 30 * _DAY
    bounced: timedelta | None = 400 * _DAY
    suppressed: timedelta | None = 400 * _DAY
    other: timedelta | None = 400 * _DAY
    contacts: timedelta | None = 2 * 365 * _DAY

    @classmethod
    def parse(cls, table: Mapping[str, object], base: Retention | None = None) -> Retention:
        """`base` (default: the embedded defaults) with the ages of `table`, e.g.
        `{"open": "180d", "click": "forever"}`; ValueError naming the key for anything else."""
        known = [f.name for f in fields(cls)]
        ages: dict[str, timedelta | None] = {}
        for key, value in table.items():
            if key not in known:
                raise ValueError(f"retention.{key}: unknown key (one of {', '.join(known)})")
            if not isinstance(value, str):
                raise ValueError(f'retention.{key}: must be a string such as "180d"')
            if value.strip().lower() == FOREVER:
                ages[key] = None
                continue
            try:
                ages[key] = parse_age(value)
            except InvalidAge as exc:
                raise ValueError(f'retention.{key}: {exc}, or "{FOREVER}"') from None
        return dataclasses.replace(base or cls(), **ages)

    def event_ages(self) -> dict[str, timedelta | None]:
        """Each event kind's age (None: kept for ever), `other` last."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "contacts"}

    def own_kinds(self) -> tuple[str, ...]:
        return tuple(kind for kind in self.event_ages() if kind != "other")


@dataclass(slots=True)
class PurgeReport:
    """What a purge removed (or, for a dry run, would remove), per kind."""

    retention: Retention
    dry_run: bool = False
    events: dict[str, int] = field(default_factory=dict)
    contacts: int = 0
    expired_suppressions: int = 0

    @property
    def total(self) -> int:
        return sum(self.events.values()) + self.contacts + self.expired_suppressions

    def summary(self) -> str:
        """One line: "purged 120 events (100 open, 20 click), 0 contacts, 3 lapsed
        suppressions", or that there was nothing to purge."""
        verb = "would purge" if self.dry_run else "purged"
        if not self.total:
            return f"{verb} nothing"
        removed = {kind: n for kind, n in self.events.items() if n}
        count = sum(removed.values())
        events = f"{count} event{'' if count == 1 else 's'}"
        if removed:
            events += " (" + ", ".join(f"{n} {kind}" for kind, n in removed.items()) + ")"
        return (
            f"{verb} {events}, {self.contacts} contact{'' if self.contacts == 1 else 's'},"
            f" {self.expired_suppressions} lapsed suppression"
            f"{'' if self.expired_suppressions == 1 else 's'}"
        )

    def table(self) -> list[str]:
        """One line per kind: how many, and the age past which they go."""
        ages: dict[str, timedelta | None] = {
            **self.retention.event_ages(),
            "contacts": self.retention.contacts,
        }
        lines = []
        for kind, age in ages.items():
            if age is None:
                lines.append(f"  {kind:<20} {'-':>8}  kept for ever")
                continue
            count = self.contacts if kind == "contacts" else self.events.get(kind, 0)
            rule = "unused for" if kind == "contacts" else "older than"
            lines.append(f"  {kind:<20} {count:>8}  {rule} {format_age(age)}")
        lines.append(f"  {'lapsed suppressions':<20} {self.expired_suppressions:>8}")
        return lines

    def fields(self) -> dict[str, Any]:
        """The counts as JSON log fields."""
        return {
            "dry_run": self.dry_run,
            "events_purged": dict(self.events),
            "contacts_purged": self.contacts,
            "suppressions_lapsed": self.expired_suppressions,
        }


async def purge(
    events: EventStore,
    suppressions: SuppressionStore,
    retention: Retention,
    now: datetime | None = None,
    *,
    dry_run: bool = False,
    keep_last_open_only: bool = False,
) -> PurgeReport:
    """Delete what the retention policy no longer allows to keep; `serve` runs this hourly.
    `dry_run`: count it, delete nothing.

    Lapsed suppressions are always removed (they no longer stop mail, and still hold an
    address); events and contacts by their configured ages. `keep_last_open_only`
    (tracking.keep_last_open_only): each recipient's opens of a campaign come down to one
    event with the day of the last; those deleted count as purged opens.
    """
    from .events import Others  # here: reading the config must not load the event log

    moment = now or datetime.now(UTC)
    report = PurgeReport(retention, dry_run)
    if keep_last_open_only:
        report.events["open"] = await events.keep_last_opens(dry_run=dry_run)
    for kind, age in retention.event_ages().items():
        if age is None:
            continue
        which = Others(retention.own_kinds()) if kind == "other" else kind
        purged = await events.purge(which, moment - age, dry_run=dry_run)
        report.events[kind] = report.events.get(kind, 0) + purged
        if kind in ("open", "click") and not dry_run:
            # Whose first open (click) the statistics counted goes with those events.
            await events.purge_firsts(kind, moment - age)
    if retention.contacts is not None:
        report.contacts = await events.purge_contacts(moment - retention.contacts, dry_run=dry_run)
    if dry_run:
        report.expired_suppressions = await suppressions.count_expired(moment)
        return report
    report.expired_suppressions = await suppressions.purge_expired(moment)
    await events.purge_message_ids(moment - TOKEN_MAX_AGE)
    return report
