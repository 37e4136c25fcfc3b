"""HTML pages: the templates (the operator's first, ours behind them) and how they are sent;
what the recipient's pages share (their token, the page for a client over its limit)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import jinja2
from aiohttp import web

from .errors import BadToken
from .state import TRACKING
from .tokens import Reading

log = logging.getLogger("optout.http")

NO_STORE = "no-store, no-cache, must-revalidate, max-age=0"
MAX_CACHED_PAGES = 512

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def environment(template_dir: Path | None) -> jinja2.Environment:
    """Templates by name; a file of the same name in `template_dir` replaces ours, so an
    operator can restyle base.html alone, or reword any single page."""
    ours = jinja2.PackageLoader("tracking", "templates")
    loader: jinja2.BaseLoader = ours
    if template_dir is not None:
        if not template_dir.is_dir():
            raise ValueError(f"template directory {template_dir} does not exist")
        loader = jinja2.ChoiceLoader([jinja2.FileSystemLoader(template_dir), ours])
    return jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined)


def page(
    request: web.Request,
    template: str,
    status: int = 200,
    headers: dict[str, str] | None = None,
    **context: object,
) -> web.Response:
    # Pages depend on a handful of flags and the scope only: rendered once each. This keeps a
    # flood of forged links (a page each) cheap.
    tracking = request.app[TRACKING]
    key = (template, *sorted(context.items()))
    cache = tracking.pages
    html = cache.get(key)
    if html is None:
        html = tracking.templates.get_template(template).render(
            brand=tracking.options.brand, **context
        )
        if len(cache) >= MAX_CACHED_PAGES:
            cache.clear()
        cache[key] = html
    return web.Response(
        text=html,
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": NO_STORE, **(headers or {})},
    )


def recipient_token(request: web.Request, route: str) -> Reading | None:
    """The recipient's signed token in the URL, or None (counted as a bad token of `route`)."""
    tracking = request.app[TRACKING]
    try:
        return tracking.urls.check_unsubscribe(request.match_info["token"])
    except BadToken:
        tracking.metrics.bad_tokens.labels(route).inc()
        return None


def too_many(request: web.Request, wait: float, route: str) -> web.Response:
    """429 for a client past its limit on `route`'s forms, saying when to try again."""
    tracking = request.app[TRACKING]
    tracking.metrics.rate_limited.labels(route).inc()
    return page(
        request,
        "too-many.html",
        status=429,
        headers={"Retry-After": tracking.limiter.retry_after(wait)},
    )


def guarded(where: str) -> Callable[[Handler], Handler]:
    """An unexpected failure becomes a plain error page and a counted, logged error."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def run(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except web.HTTPException:
                raise  # aiohttp's own answers: 413 for a body too large, and the like
            except Exception:
                request.app[TRACKING].metrics.errors.labels(where).inc()
                log.exception("%s failed", where)
                return error_page(request)

        return run

    return wrap


def error_page(request: web.Request) -> web.Response:
    try:
        return page(request, "error.html", status=500)
    except Exception:  # an operator's broken template must not hide the first failure
        log.exception("error page failed")
        return web.Response(status=500, text="Something went wrong. Please try again later.\n")
