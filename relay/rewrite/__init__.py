"""The template engine: parse once, personalise many.

`build_template` turns a message into the sender's bytes with holes for each recipient's
URLs; `Template.render` fills them. The tokenizer, MIME walker, encoders and footers are
private modules of this package.
"""

from ._footer import PLACEHOLDER
from ._parts import Hole, HoleKey, LinkHole
from ._walk import UNTOUCHABLE_TYPES
from .template import Decorations, Template, build_template, list_unsubscribe_headers

__all__ = [
    "PLACEHOLDER",
    "UNTOUCHABLE_TYPES",
    "Decorations",
    "Hole",
    "HoleKey",
    "LinkHole",
    "Template",
    "build_template",
    "list_unsubscribe_headers",
]
