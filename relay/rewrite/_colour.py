"""The footer's text colour: readable on the sender's background (WCAG 2 AA, 4.5:1).

The footer goes just before `</body>`, outside the sender's wrapper tables, so it sits on the
body's own background: the `<body>` tag's style, a `body { ... }` rule of the document's style
sheets, or its `bgcolor` (in that order of precedence, as browsers apply them). CSS is read
with tinycss2 (a CSS Syntax Level 3 parser): declarations and colours have too many forms for
a pattern to read them right (named colours, rgb(), shorthands, comments, !important).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import tinycss2
import tinycss2.color3

RGB = tuple[float, float, float]
AA_CONTRAST = 4.5  # WCAG 2.x success criterion 1.4.3, for text under 18pt
DEFAULT = "#666666"  # 5.7:1 on white: the footer's colour where the background allows it
_WHITE: RGB = (1.0, 1.0, 1.0)
_LEGACY_HEX = re.compile(r"[0-9a-fA-F]{6}|[0-9a-fA-F]{3}")


def footer_colour(background: RGB | None, text: RGB | None) -> str:
    """#666666 where it keeps 4.5:1 against the background; else the body's own text colour
    where that does; else the grey nearest #666666 that does."""
    ground = background or _WHITE
    if contrast(_parse_hex(DEFAULT), ground) >= AA_CONTRAST:
        return DEFAULT
    if text is not None and contrast(text, ground) >= AA_CONTRAST:
        return _hex(text)
    lighter = range(0x66, 0x100)
    darker = range(0x66, -1, -1)
    # Towards white first on a dark ground, towards black on a light one.
    order = (lighter, darker) if _luminance(ground) < 0.18 else (darker, lighter)
    for levels in order:
        for level in levels:
            grey = (level / 255,) * 3
            if contrast(grey, ground) >= AA_CONTRAST:
                return _hex((grey[0], grey[0], grey[0]))
    return "#000000" if contrast((0.0, 0.0, 0.0), ground) >= contrast(_WHITE, ground) else "#ffffff"


def contrast(a: RGB, b: RGB) -> float:
    """The WCAG contrast ratio of two colours, 1 to 21."""
    high, low = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def _luminance(colour: RGB) -> float:
    def linear(channel: float) -> float:
        return channel / 12.92 if channel <= 0.04045 else ((channel + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in colour)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _hex(colour: RGB) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in colour)


def _parse_hex(value: str) -> RGB:
    found = parse_colour(value)
    assert found is not None
    return found


def parse_colour(value: str) -> RGB | None:
    """A CSS colour or a legacy HTML one (`bgcolor="111111"`); None for anything else, and
    for colours that are not opaque (what shows through is unknown)."""
    value = value.strip()
    if _LEGACY_HEX.fullmatch(value):
        value = "#" + value
    return _opaque(tinycss2.color3.parse_color(value))


def _opaque(parsed: object) -> RGB | None:
    if isinstance(parsed, tinycss2.color3.RGBA) and parsed.alpha == 1:
        return (parsed.red, parsed.green, parsed.blue)
    return None


def declared_colours(css: str) -> tuple[RGB | None, RGB | None]:
    """(background, text colour) set by a declaration list (a style attribute's value);
    the last declaration of each wins, as in CSS."""
    background = text = None
    for declaration in tinycss2.parse_blocks_contents(css, skip_whitespace=True):
        if declaration.type != "declaration":
            continue
        name = declaration.lower_name
        if name in ("background", "background-color"):
            found = _first_colour(declaration.value)
            if found is not None or name == "background-color":
                background = found
        elif name == "color":
            text = _first_colour(declaration.value)
    return background, text


def body_rules(stylesheet: str) -> Iterable[str]:
    """The declaration lists of a style sheet's rules that select the body element."""
    for rule in tinycss2.parse_stylesheet(stylesheet, skip_whitespace=True, skip_comments=True):
        if rule.type != "qualified-rule":
            continue
        selectors = tinycss2.serialize(rule.prelude).lower().split(",")
        if any(selector.strip() == "body" for selector in selectors):
            yield tinycss2.serialize(rule.content)


def _first_colour(tokens: list[object]) -> RGB | None:
    for token in tokens:
        found = _opaque(tinycss2.color3.parse_color(token))
        if found is not None:
            return found
    return None
