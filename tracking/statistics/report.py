"""Campaign statistics from the rollup: counts, rates and Gmail's warning lines.

The numbers come from count sources: functions that give (group, bucket, metric, n) rows
for a selection, summed over whole periods as asked (all of it, days or hours): the event
rollup (`rollup_counts`), and the opens and clicks counted without naming anyone
(`aggregate_counts`, tracking.aggregate: per day, as `*_aggregate` metrics). The contract's
`opens_human` and the rest are the two together; `*_individual` and `*_aggregate` say which
part is which.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from suppression import Connection, Engine, format_time

from .rollup import NO_CAMPAIGN, UNKNOWN_DOMAIN

GroupBy = Literal["campaign", "domain"]


@dataclass(frozen=True, slots=True)
class Selection:
    """Which counts: one campaign or all (None), from an hour on or all time."""

    group_by: GroupBy = "campaign"
    campaign: str | None = None  # '' is mail without a campaign
    since_hour: str | None = None  # YYYY-MM-DDTHH, inclusive

    @classmethod
    def since(
        cls, moment: datetime | None, campaign: str | None = None, group_by: GroupBy = "campaign"
    ) -> Selection:
        hour = None if moment is None else format_time(moment)[:13]
        return cls(group_by, campaign, hour)


# Buckets: how much of YYYY-MM-DDTHH names one. WHOLE sums the whole selection.
WHOLE, DAY, HOUR = 0, 10, 13
# (group key: campaign or domain, bucket, metric, n)
CountRow = tuple[str, str, str, int]
CountSource = Callable[[Connection, Selection, int], Iterable[CountRow]]


def rollup_counts(db: Connection, selection: Selection, bucket: int) -> Iterable[CountRow]:
    """From `stats_counts`, summed in SQLite per group, bucket and metric: a report over
    everything returns a row per campaign and metric, not one per hour."""
    column = "campaign" if selection.group_by == "campaign" else "domain"
    where, params = ["TRUE"], []
    if selection.campaign is not None:
        where.append("campaign = ?")
        params.append(selection.campaign)
    if selection.since_hour is not None:
        where.append("hour >= ?")
        params.append(selection.since_hour)
    return db.execute(
        f"SELECT {column}, substr(hour, 1, ?), metric, SUM(n) FROM stats_counts"  # noqa: S608
        f" WHERE {' AND '.join(where)} GROUP BY 1, 2, 3",
        [bucket, *params],
    ).fetchall()


def aggregate_counts(db: Connection, selection: Selection, bucket: int) -> Iterable[CountRow]:
    """From `aggregate_counts` (per day: an hourly bucket is the day's first hour), as
    `open_human_aggregate` and the like."""
    column = "campaign" if selection.group_by == "campaign" else "domain"
    where, params = ["TRUE"], []
    if selection.campaign is not None:
        where.append("campaign = ?")
        params.append(selection.campaign)
    if selection.since_hour is not None:
        where.append("day >= ?")
        params.append(selection.since_hour[:10])
    return db.execute(
        f"SELECT {column}, substr(day || 'T00', 1, ?), metric || '_aggregate', SUM(n)"  # noqa: S608
        f" FROM aggregate_counts WHERE {' AND '.join(where)} GROUP BY 1, 2, 3",
        [bucket, *params],
    ).fetchall()


# Opens and clicks: (JSON key, metric of the recipients counted once, metric counted in
# aggregate). The key is the two together; `_individual` and `_aggregate` are each part.
MEASURED = (
    ("opens_human", "open_human_unique", "open_human_aggregate"),
    ("opens_machine", "open_machine_unique", "open_machine_aggregate"),
    ("clicks_human", "click_human_unique", "click_human_aggregate"),
    ("clicks_machine", "click_machine_unique", "click_machine_aggregate"),
)

# Gmail's bulk-sender lines: keep complaints under 0.1%, never reach 0.3%. Hard bounces
# over 2% mean a list that needs cleaning.
COMPLAINT_TARGET = 0.001
COMPLAINT_LIMIT = 0.003
HARD_BOUNCE_LIMIT = 0.02


def _share(part: int, whole: int) -> float | None:
    return None if whole <= 0 else round(part / whole, 6)


def _percent(rate: float) -> str:
    return f"{rate * 100:.2f}%"


@dataclass(slots=True)
class CampaignStats:
    """One campaign's (or sending domain's) numbers; `counts` are the rollup's metrics."""

    campaign: str | None
    domain: str | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, metric: str) -> int:
        return self.counts.get(metric, 0)

    def measured(self, key: str) -> int:
        """Opens or clicks (`opens_human`, ...): recipients counted once each where they
        are measured individually, plus the fetches counted in aggregate."""
        for name, individual, aggregate in MEASURED:
            if name == key:
                return self.count(individual) + self.count(aggregate)
        raise KeyError(key)

    # ---- the contract's numbers

    @property
    def sent(self) -> int:
        """Copies the downstream MTA took or refused: each gets one of these."""
        return self.count("delivered") + self.count("bounced_hard") + self.count("bounced_soft")

    @property
    def delivered(self) -> int:
        """Taken by the MTA and not bounced back later."""
        late = self.count("bounced_hard_late") + self.count("bounced_soft_late")
        return max(0, self.count("delivered") - late)

    @property
    def bounced_hard(self) -> int:
        return self.count("bounced_hard") + self.count("bounced_hard_late")

    @property
    def bounced_soft(self) -> int:
        return self.count("bounced_soft") + self.count("bounced_soft_late")

    def rates(self) -> dict[str, float | None]:
        sent, delivered = self.sent, self.delivered
        return {
            "delivery_rate": _share(delivered, sent),
            "hard_bounce_rate": _share(self.bounced_hard, sent),
            "soft_bounce_rate": _share(self.bounced_soft, sent),
            "complaint_rate": _share(self.count("complaint"), delivered),
            "unsubscribe_rate": _share(self.count("unsubscribe"), delivered),
            "open_rate_human": _share(self.measured("opens_human"), delivered),
            "click_rate_human": _share(self.measured("clicks_human"), delivered),
        }

    def warnings(self) -> list[str]:
        rates = self.rates()
        found = []
        complaints = rates["complaint_rate"]
        if complaints is not None and complaints >= COMPLAINT_LIMIT:
            found.append(f"complaint rate {_percent(complaints)} is at or above Gmail's 0.3% limit")
        elif complaints is not None and complaints >= COMPLAINT_TARGET:
            found.append(f"complaint rate {_percent(complaints)} is above Gmail's 0.1% target")
        hard = rates["hard_bounce_rate"]
        if hard is not None and hard > HARD_BOUNCE_LIMIT:
            found.append(f"hard bounce rate {_percent(hard)} is above 2%")
        return found

    def as_dict(self) -> dict[str, Any]:
        """The `stats --format json` object (contract keys first)."""
        return {
            "campaign": self.campaign,
            "domain": self.domain,
            "sent": self.sent,
            "delivered": self.delivered,
            "deferred": self.count("deferred"),
            "bounced_hard": self.bounced_hard,
            "bounced_soft": self.bounced_soft,
            "complaints": self.count("complaint"),
            "unsubscribes": self.count("unsubscribe"),
            **{name: self.measured(name) for name, _, _ in MEASURED},
            "suppressed": self.count("suppressed"),
            **self.rates(),
            "warnings": self.warnings(),
            # Which part of the opens and clicks is which: recipients measured one by one,
            # and fetches counted in aggregate (naming nobody).
            **{f"{name}_individual": self.count(one) for name, one, _ in MEASURED},
            **{f"{name}_aggregate": self.count(all_) for name, _, all_ in MEASURED},
        }


# What a chart draws per day (or hour), and what each line is called.
SERIES = {
    "opens (human)": "open_human_unique",
    "opens (human, aggregate)": "open_human_aggregate",
    "opens (machine)": "open_machine_unique",
    "clicks (human)": "click_human_unique",
    "clicks (human, aggregate)": "click_human_aggregate",
    "unsubscribes": "unsubscribe",
    "bounces": "bounced",
    "complaints": "complaint",
}


@dataclass(frozen=True, slots=True)
class Series:
    """Counts per time bucket (a day, YYYY-MM-DD, or an hour, YYYY-MM-DDTHH), oldest first."""

    buckets: list[str]
    lines: dict[str, list[int]]

    @property
    def empty(self) -> bool:
        return not any(any(values) for values in self.lines.values())


class Statistics:
    """Read-only: `report` for the table, `series` for a chart."""

    def __init__(
        self, db: Engine, sources: Sequence[CountSource] = (rollup_counts, aggregate_counts)
    ) -> None:
        self._db = db
        self._sources = tuple(sources)

    async def report(self, selection: Selection = Selection()) -> list[CampaignStats]:
        """One entry per campaign (or domain) with any count, by name."""
        rows = await self._db.read(lambda db: self._rows(db, selection, WHOLE))
        groups: dict[str, CampaignStats] = {}
        for key, _hour, metric, n in rows:
            stats = groups.get(key)
            if stats is None:
                stats = groups[key] = _new(key, selection.group_by)
            stats.counts[metric] = stats.counts.get(metric, 0) + int(n)
        return [groups[key] for key in sorted(groups)]

    async def series(self, selection: Selection = Selection(), hourly: bool = False) -> Series:
        """Each chart line per day (or hour) over every group selected; days without any
        count are left out."""
        width = HOUR if hourly else DAY
        rows = await self._db.read(lambda db: self._rows(db, selection, width))
        per_bucket: dict[str, dict[str, int]] = {}
        for _key, when, metric, n in rows:
            name = "bounced" if metric.startswith("bounced_") else metric
            bucket = per_bucket.setdefault(when, {})
            bucket[name] = bucket.get(name, 0) + int(n)
        buckets = sorted(per_bucket)
        lines = {
            label: [per_bucket[b].get(metric, 0) for b in buckets]
            for label, metric in SERIES.items()
        }
        # The aggregate lines only where something was measured so: most charts have none.
        return Series(
            buckets,
            {
                label: values
                for label, values in lines.items()
                if any(values) or not SERIES[label].endswith("_aggregate")
            },
        )

    async def campaigns(self) -> list[str]:
        """Every campaign name with a count ('' for mail without one)."""
        return await self._db.read(
            lambda db: [
                row[0]
                for row in db.execute(
                    "SELECT campaign FROM stats_counts UNION SELECT campaign FROM aggregate_counts"
                )
            ]
        )

    def _rows(self, db: Connection, selection: Selection, bucket: int) -> list[CountRow]:
        return [row for source in self._sources for row in source(db, selection, bucket)]


def _new(key: str, group_by: GroupBy) -> CampaignStats:
    if group_by == "campaign":
        return CampaignStats(campaign=None if key == NO_CAMPAIGN else key)
    return CampaignStats(campaign=None, domain=None if key == UNKNOWN_DOMAIN else key)


def totals(stats: Iterable[CampaignStats]) -> CampaignStats:
    """All of them together (the dashboard's first line)."""
    whole = CampaignStats(campaign=None)
    for one in stats:
        for metric, n in one.counts.items():
            whole.counts[metric] = whole.counts.get(metric, 0) + n
    return whole
