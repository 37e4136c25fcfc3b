"""Charts as inline SVG drawn on the server by pygal: no JavaScript, no fetch.

pygal (LGPL-3.0+, maintained by Kozea, releases through 2026) draws with SVG shapes and CSS
alone; its tooltips are the only thing that needs its script. So no `js` URLs are given
(nothing is fetched), and the one inline <script> it always writes (its config for those
tooltips) is taken out of the element tree before the SVG is serialised. The page's CSP
allows no script in any case.

Importing pygal appends an old-style finder to sys.meta_path (for its map plugins, which we
do not use); on Python 3.11 it makes every later failed import warn (ImportWarning), so it is
taken off again here.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ElementTree

import pygal
from markupsafe import Markup
from pygal.style import Style

from ..statistics import Series

sys.meta_path[:] = [
    finder for finder in sys.meta_path if not isinstance(finder, pygal.PluginImportFixer)
]

# One colour per line, readable on a light and on a dark background alike; the chart's own
# background is transparent, its text a grey between the two schemes.
_STYLE = Style(
    background="transparent",
    plot_background="transparent",
    foreground="#8a8f98",
    foreground_strong="#8a8f98",
    foreground_subtle="rgba(138,143,152,0.25)",
    opacity="0.9",
    stroke_width="3",
    stroke_width_hover="3",
    stroke_opacity="1",
    stroke_opacity_hover="1",
    guide_stroke_color="rgba(138,143,152,0.5)",
    major_guide_stroke_color="rgba(138,143,152,0.5)",
    opacity_hover="1",
    transition="0s",
    font_family="system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif",
    label_font_size=13,
    major_label_font_size=13,
    legend_font_size=14,
    title_font_size=15,
    colors=("#2f7ed8", "#a0a7b4", "#2ca02c", "#ff7f0e", "#9467bd", "#d62728"),
)
# Drawn at about the width of a phone, so its text stays legible there; it scales up.
WIDTH = 520
HEIGHT = 340
MAX_LABELS = 6


def line_chart(series: Series, title: str) -> Markup:
    """An SVG line chart of `series`, one line per metric, as markup to put in a page."""
    chart = pygal.Line(
        style=_STYLE,
        width=WIDTH,
        height=HEIGHT,
        js=[],
        disable_xml_declaration=True,
        show_dots=len(series.buckets) <= 31,
        dots_size=3,
        legend_at_bottom=True,
        legend_at_bottom_columns=2,
        x_label_rotation=0,
        show_minor_x_labels=False,
        truncate_label=-1,
        min_scale=2,
        max_scale=6,
        no_data_text="No events yet",
        title=title,
        include_x_axis=True,
        explicit_size=False,
    )
    chart.x_labels = [_label(bucket) for bucket in series.buckets]
    step = max(1, len(series.buckets) // MAX_LABELS)
    chart.x_labels_major = chart.x_labels[::step]
    for name, values in series.lines.items():
        chart.add(name, values)
    root = chart.render_tree()
    for parent in list(root.iter()):
        for child in list(parent):
            if isinstance(child.tag, str) and child.tag.rpartition("}")[2] == "script":
                parent.remove(child)
    svg = ElementTree.tostring(root, encoding="unicode")
    return Markup(svg)  # noqa: S704 - pygal's own SVG, every label escaped by ElementTree


def _label(bucket: str) -> str:
    """2026-10-03 -> 10-03; 2026-10-03T14 -> 10-03 14h."""
    if "T" in bucket:
        day, _, hour = bucket.partition("T")
        return f"{day[5:]} {hour}h"
    return bucket[5:]
