"""What comes back: bounces (RFC 3464 DSNs and older text forms), complaint reports
(RFC 5965 ARF) and mailto: unsubscribes, taken by an SMTP listener of the relay's own and
turned into suppressions and events.

- `tokens`: the compact signed addresses (VERP return path, mailto:) and reference that
  name one copy; `store`: the copies they name and the reports taken;
- `door`, `listener`: the SMTP side (imported only when the listener runs);
- `reading`: what a report is; `effects`: what it does, in one transaction; `runner`: the
  loop between them.

This face stays light: the delivery processes use the tokens and the copy records, and
import no SMTP server.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .outgoing import CopyMarks, FeedbackMarks
    from .store import CopyRecord, FeedbackStore
    from .tokens import CopyTokens, TokenKind, copy_id
else:
    from suppression._faces import names_on_first_use

    __getattr__ = names_on_first_use(
        __name__,
        {
            "CopyMarks": ".outgoing",
            "FeedbackMarks": ".outgoing",
            "CopyRecord": ".store",
            "FeedbackStore": ".store",
            "CopyTokens": ".tokens",
            "TokenKind": ".tokens",
            "copy_id": ".tokens",
        },
    )

__all__ = [
    "CopyMarks",
    "CopyRecord",
    "CopyTokens",
    "FeedbackMarks",
    "FeedbackStore",
    "TokenKind",
    "copy_id",
]
