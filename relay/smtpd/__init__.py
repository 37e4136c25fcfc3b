"""The front door: the SMTP listener marketing tools submit to.

`FrontDoor` is the aiosmtpd handler (who may submit, who may receive, 250 only once the
spool has the message); `RelaySMTP` the session (enhanced status codes, connection limits,
AUTH off the event loop, DATA read in chunks and spilled to a directory when big);
`AuthPolicy` who may log in.
"""

from .auth import AuthPolicy, AuthThrottle
from .door import FrontDoor
from .server import ConnectionLimits, RelaySMTP, is_localhost, reload_certificate, tls_context

__all__ = [
    "AuthPolicy",
    "AuthThrottle",
    "ConnectionLimits",
    "FrontDoor",
    "RelaySMTP",
    "is_localhost",
    "reload_certificate",
    "tls_context",
]
