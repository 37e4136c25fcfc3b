"""Processing what the feedback listener accepted: from the reports table, in batches.

Reading a report (MIME parsing, the bounce detectors) runs in a thread; its effects are
written by `effects.apply_report`, one job per report, which the database commits in groups.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections import defaultdict, deque

from tracking.errors import BadToken
from tracking.tokens import UNSUBSCRIBE_PATH, TrackingUrls

from ..settings import FeedbackSettings
from .addresses import Destination, FeedbackAddresses
from .effects import DONE, Examined, Result, Rules, Target, apply_report
from .reading import read_report
from .store import FeedbackStore, Report
from .tokens import TokenKind

log = logging.getLogger("optout.feedback")

BATCH = 200
IDLE_POLL = 5.0
RETRY_AFTER_FAILURE = 5.0
PURGE_EVERY = 3600.0
RECOUNT_EVERY = 30.0
POLICY_WINDOW = 86_400.0
_UNSUBSCRIBE_TOKEN = re.compile(re.escape(UNSUBSCRIBE_PATH) + r"([A-Za-z0-9_\-.]+)")
# How each of our tokens is named in the detail of what it matched.
_HOW = {
    TokenKind.RETURN_PATH: "return-path",
    TokenKind.MAILTO: "mailto",
    TokenKind.REFERENCE: "reference",
}


def examine(report: Report, addresses: FeedbackAddresses, urls: TrackingUrls) -> Examined:
    """Read a report and check every token of ours it carries (CPU work, no database)."""
    reading = read_report(report.content, report.mail_from)
    return_paths: list[Target] = []
    mailtos: list[Target] = []
    roles: list[str] = []
    for address in report.recipients:
        recipient = addresses.classify(address)
        token = recipient.token
        if recipient.destination is Destination.RETURN_PATH and token is not None:
            return_paths.append(Target("return-path", token.key_id, token.copy_id))
        elif recipient.destination is Destination.MAILTO and token is not None:
            mailtos.append(Target("mailto", token.key_id, token.copy_id))
        elif recipient.destination is Destination.ROLE:
            roles.append(recipient.local_part)
    return Examined(
        report,
        reading,
        tuple(return_paths),
        tuple(mailtos),
        _returned_targets(reading.returned_headers, addresses, urls),
        tuple(roles),
    )


def _returned_targets(
    headers: str, addresses: FeedbackAddresses, urls: TrackingUrls
) -> tuple[Target, ...]:
    """Our tokens in the headers a report returned: the reference header and the return
    path name the copy, the List-Unsubscribe URL names the recipient itself."""
    if not headers:
        return ()
    found: list[Target] = []
    seen: set[bytes] = set()
    for line in headers.splitlines():
        for kind in (TokenKind.REFERENCE, TokenKind.RETURN_PATH, TokenKind.MAILTO):
            token = addresses.tokens.find(line, kind)
            if token is not None and token.copy_id not in seen:
                seen.add(token.copy_id)
                found.append(Target(_HOW[kind], token.key_id, token.copy_id))
        for match in _UNSUBSCRIBE_TOKEN.finditer(line):
            with contextlib.suppress(BadToken):
                reading = urls.check_unsubscribe(match.group(1))
                found.append(Target("list-unsubscribe", reading.key_id, ref=reading.ref))
    # The reference header first: it is there for this purpose and names the copy exactly.
    order = {"reference": 0, "return-path": 1, "mailto": 2, "list-unsubscribe": 3}
    return tuple(sorted(found, key=lambda t: order[t.how]))


class FeedbackRunner:
    """Takes waiting reports from the table and acts on them; a restart carries on."""

    def __init__(
        self,
        store: FeedbackStore,
        addresses: FeedbackAddresses,
        urls: TrackingUrls,
        settings: FeedbackSettings,
    ) -> None:
        self._store = store
        self._addresses = addresses
        self._urls = urls
        self._settings = settings
        self._rules = Rules(
            settings.soft_bounce_limit, settings.soft_bounce_window, settings.soft_bounce_hold
        )
        self._wakeup = asyncio.Event()
        self.waiting = 0
        self._policy: defaultdict[str, deque[float]] = defaultdict(deque)

    def accepted(self) -> None:
        """The listener committed a report: count it and process it soon."""
        self.waiting += 1
        self._wakeup.set()

    async def run(self) -> None:
        self.waiting = await self._store.count_pending()
        purger = asyncio.create_task(self._purge_hourly(), name="feedback-purge")
        try:
            while True:
                try:
                    done = await self.process_waiting()
                except Exception:
                    log.exception("feedback processing failed; trying again shortly")
                    await asyncio.sleep(RETRY_AFTER_FAILURE)
                    continue
                if not done:
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), IDLE_POLL)
        finally:
            purger.cancel()

    async def process_waiting(self) -> int:
        """One batch of waiting reports; how many were processed."""
        reports = await self._store.pending(BATCH)
        if not reports:
            self.waiting = 0
            return 0
        examined = await asyncio.to_thread(
            lambda: [examine(r, self._addresses, self._urls) for r in reports]
        )
        database = self._store.database
        results = await asyncio.gather(
            *(
                database.write(functools.partial(apply_report, examined=e, rules=self._rules))
                for e in examined
            ),
            return_exceptions=True,
        )
        for item, result in zip(examined, results, strict=True):
            if isinstance(result, BaseException):
                log.error("report %d: not processed: %s", item.report.id, result)
                raise result
            self._log(item, result)
        self.waiting = max(0, self.waiting - len(reports))
        return len(reports)

    def _log(self, item: Examined, result: Result) -> None:
        if result.already_done:
            return
        report = item.report
        extra = {"queue_id": result.queue_id} if result.queue_id else {}
        fields = {
            "report": report.id,
            "action": result.action,
            "state": result.state,
            "nature": str(item.reading.nature),
        }
        if result.state == DONE:
            log.info(
                "report %d from=<%s>: %s%s%s",
                report.id,
                report.mail_from,
                result.action,
                f" ({result.why})" if result.why else "",
                ", suppressed" if result.suppressed else "",
                extra={**extra, "fields": fields},
            )
        else:
            log.warning(
                "report %d from=<%s> kept for the operator: %s",
                report.id,
                report.mail_from,
                result.why,
                extra={**extra, "fields": fields},
            )
        if result.policy_domain is not None or result.action == "policy-refusal":
            self._count_policy(result.policy_domain or "unknown", result)

    def _count_policy(self, domain: str, result: Result) -> None:
        now = time.monotonic()
        seen = self._policy[domain]
        seen.append(now)
        while seen and now - seen[0] > POLICY_WINDOW:
            seen.popleft()
        if len(seen) >= self._settings.policy_alert:
            log.error(
                "%d policy refusals from %s in 24 h (latest: %s): receivers are refusing"
                " this sender; check its authentication, reputation and blocklists",
                len(seen),
                domain,
                result.detail.get("status"),
            )

    async def _purge_hourly(self) -> None:
        while True:
            try:
                reports, copies = await self._store.purge(
                    self._settings.keep_reports, self._settings.keep_copies
                )
                if reports or copies:
                    log.info("feedback purge: %d reports, %d copy records", reports, copies)
            except Exception:
                log.exception("feedback purge failed; trying again in an hour")
            await asyncio.sleep(PURGE_EVERY)
