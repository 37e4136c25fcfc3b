"""The template engine: parse once, personalise many.

`build_template` turns a message into the sender's bytes with holes for each recipient's
URLs; `Template.render` fills them. The tokenizer, MIME walker, encoders, footers and the
header fields the relay adds are private modules of this package.
"""

from ._bodies import BodyCache
from ._fields import (
    ReceivedClient,
    date_field,
    list_id,
    list_id_field,
    message_id,
    message_id_field,
    received_field,
)
from ._footer import PLACEHOLDER
from ._parts import Hole, HoleKey, LinkHole
from ._walk import UNTOUCHABLE_TYPES
from .template import Decorations, Template, build_template, list_unsubscribe_headers

__all__ = [
    "PLACEHOLDER",
    "UNTOUCHABLE_TYPES",
    "BodyCache",
    "Decorations",
    "Hole",
    "HoleKey",
    "LinkHole",
    "ReceivedClient",
    "Template",
    "build_template",
    "date_field",
    "list_id",
    "list_id_field",
    "list_unsubscribe_headers",
    "message_id",
    "message_id_field",
    "received_field",
]
