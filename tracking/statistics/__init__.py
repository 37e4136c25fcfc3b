"""Campaign statistics: counts rolled up as events are written, read back with rates and
warnings (`optout-relay stats`, the dashboard)."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
else:
    from suppression._faces import names_on_first_use

    __getattr__ = names_on_first_use(
        __name__,
        {
            "COMPLAINT_LIMIT": ".report",
            "COMPLAINT_TARGET": ".report",
            "DAY": ".report",
            "HARD_BOUNCE_LIMIT": ".report",
            "HOUR": ".report",
            "MEASURED": ".report",
            "SERIES": ".report",
            "WHOLE": ".report",
            "CampaignStats": ".report",
            "CountRow": ".report",
            "CountSource": ".report",
            "GroupBy": ".report",
            "Selection": ".report",
            "Series": ".report",
            "Statistics": ".report",
            "aggregate_counts": ".report",
            "rollup_counts": ".report",
            "totals": ".report",
            "ROLLUP_MIGRATION": ".rollup",
            "count_events": ".rollup",
            "forget_reach": ".rollup",
            "purge_reach": ".rollup",
        },
    )

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
