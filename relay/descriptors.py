"""File descriptors: the soft limit raised to the hard one at start, then shared out so that no
listener can take what another needs. Before this, 300 slow HTTP clients took the whole
limit: the SMTP greeting stopped too, and every failed accept logged a traceback.

Each SMTP connection may hold two descriptors (its socket and the file a big message is
spilled to), and asyncio's server may accept up to its backlog in one turn of the loop before
a session over the cap is refused; the HTTP listener (tracking.listener) never accepts past
its cap. What is left after SMTP, the feedback listener, the dashboard's small fixed share,
what the process already holds and a spare is the HTTP listener's, unless
`http.max_connections` says less; a configuration that does not fit is refused at start,
naming the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tracking.listener import RETRY_AFTER_FAILURE, AcceptFailures, descriptor_hint

from .errors import ConfigError
from .settings import Settings

log = logging.getLogger("optout.serve")

# asyncio.Server's default backlog: how many connections it may accept in one turn.
SERVER_BACKLOG = 100
# Descriptors kept for everything else: databases, the event and delivery processes' pipes,
# outbox files, certificate reloads, DNS.
SPARE = 64
# The HTTP listener's share when not configured: what is left, up to this.
HTTP_DEFAULT_MAX = 4096
HTTP_MINIMUM = 16
ADMIN_CONNECTIONS = 64  # the dashboard's listener, when on: a few operators
_UNLIMITED_TARGET = 1 << 20


def raise_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (systemd and most shells start services
    at 1024 with a far higher hard limit); the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:  # a hard limit above the kernel's nr_open
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, exc)
        else:
            soft = target
    return int(soft)


def descriptors_open() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listing them
    except OSError:
        return 32  # a guess, for systems without /proc


@dataclass(frozen=True, slots=True)
class Budget:
    limit: int
    in_use: int
    smtp: int  # descriptors SMTP listeners may hold at most
    feedback: int
    admin: int
    http_connections: int

    def describe(self) -> str:
        return (
            f"file descriptors: limit {self.limit}; up to {self.smtp} for SMTP,"
            f" {self.feedback} for feedback, {self.admin} for the dashboard,"
            f" {self.http_connections} HTTP connections, {self.in_use} in use and {SPARE} spare"
        )


def plan(settings: Settings, limit: int, in_use: int) -> Budget:
    """How the `limit` is shared; ConfigError when the configured caps do not fit."""
    smtp = settings.smtp
    listeners = 1 + sum(
        1 for extra in (smtp.implicit_tls_listen, smtp.transactional_listen) if extra
    )
    smtp_share = listeners * SERVER_BACKLOG + 2 * smtp.max_connections
    feedback = settings.feedback
    feedback_share = SERVER_BACKLOG + 2 * feedback.max_connections if feedback.intake else 0
    admin_share = ADMIN_CONNECTIONS + 1 if settings.admin.enabled else 0
    # Each HTTP listener may hold one more socket for a moment: one it is refusing.
    left = limit - in_use - SPARE - smtp_share - feedback_share - admin_share - 1
    parts = (
        f"SMTP may hold {smtp_share} ({listeners} listener(s), smtp.max_connections"
        f" {smtp.max_connections} with a spill file each), feedback {feedback_share},"
        f" the dashboard {admin_share}, this process {in_use} and {SPARE} spare"
    )
    wanted = settings.http.max_connections
    if wanted is None:
        if left < HTTP_MINIMUM:
            raise ConfigError(
                "smtp.max_connections",
                f"the open-files limit is {limit}: {parts}, which leaves {max(left, 0)} for"
                " HTTP connections; lower smtp.max_connections or raise the limit (ulimit -n,"
                " systemd LimitNOFILE=)",
            )
        http = min(HTTP_DEFAULT_MAX, left)
    elif wanted > left:
        raise ConfigError(
            "http.max_connections",
            f"{wanted} connections do not fit in the open-files limit of {limit}: {parts},"
            f" which leaves {max(left, 0)}; lower a max_connections or raise the limit"
            " (ulimit -n, systemd LimitNOFILE=)",
        )
    else:
        http = wanted
    return Budget(limit, in_use, smtp_share, feedback_share, admin_share, http)


class QuietAcceptErrors:
    """The event loop's exception handler, for asyncio's own servers (SMTP, feedback): a
    failed accept is logged when the failures start and when they stop, per listener, not
    once per attempt with a traceback; everything else goes to the loop's default handler.

    asyncio retries a failed accept every second while it fails: no failure for a few
    seconds means the listener accepts again."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._failing: dict[str, tuple[AcceptFailures, float]] = {}
        self._check: asyncio.TimerHandle | None = None
        self._previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None = (
            loop.get_exception_handler()
        )

    def install(self) -> None:
        self._loop.set_exception_handler(self)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if context.get("message") != "socket.accept() out of system resource" or not isinstance(
            error, OSError
        ):
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        name = "smtp"
        with contextlib.suppress(Exception):
            host, port = context["socket"].getsockname()[:2]
            name = f"smtp listener {host}:{port}"
        failures, _ = self._failing.get(name, (None, 0.0))
        if failures is None:
            failures = AcceptFailures(name, log)
        failures.failed(error, descriptor_hint())
        self._failing[name] = (failures, time.monotonic())
        if self._check is None:
            self._check = loop.call_later(3 * RETRY_AFTER_FAILURE, self._recovered)

    def _recovered(self) -> None:
        self._check = None
        now = time.monotonic()
        for name, (failures, last) in list(self._failing.items()):
            if now - last >= 2 * RETRY_AFTER_FAILURE:
                failures.succeeded()
                del self._failing[name]
        if self._failing:
            self._check = self._loop.call_later(RETRY_AFTER_FAILURE, self._recovered)
