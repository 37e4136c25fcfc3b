"""Campaign statistics: counts rolled up as events are written, read back with rates and
warnings (`optout-relay stats`, the dashboard)."""

from .report import (
    COMPLAINT_LIMIT,
    COMPLAINT_TARGET,
    DAY,
    HARD_BOUNCE_LIMIT,
    HOUR,
    MEASURED,
    SERIES,
    WHOLE,
    CampaignStats,
    CountRow,
    CountSource,
    GroupBy,
    Selection,
    Series,
    Statistics,
    aggregate_counts,
    rollup_counts,
    totals,
)
from .rollup import ROLLUP_MIGRATION, count_events, forget_reach, purge_reach

__all__ = [
    "COMPLAINT_LIMIT",
    "COMPLAINT_TARGET",
    "DAY",
    "HARD_BOUNCE_LIMIT",
    "HOUR",
    "MEASURED",
    "ROLLUP_MIGRATION",
    "SERIES",
    "WHOLE",
    "CampaignStats",
    "CountRow",
    "CountSource",
    "GroupBy",
    "Selection",
    "Series",
    "Statistics",
    "aggregate_counts",
    "count_events",
    "forget_reach",
    "purge_reach",
    "rollup_counts",
    "totals",
]
