"""The web console: worklist, study pages, rules editor, operations, health and metrics.

Server-rendered (Starlette + Jinja2, no front-end build); one small script
refreshes the worklist. Every page but ``/signin``, ``/healthz``, ``/readyz``,
``/metrics`` and the static CSS/JS needs a signed-in user; every POST needs the
session's CSRF token; changes and tests of changes (rules, resend) need the
admin role and changes are written to the audit log. URLs carry internal ids
only, never patient identifiers or UIDs.

One module per part: :mod:`.signin`, :mod:`.worklist`, :mod:`.study`,
:mod:`.rules_editor` (with :mod:`.rules_preview`), :mod:`.operations`; what
their endpoints share is in :mod:`.handlers`, how values are written in :mod:`.text`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import jinja2
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pe_triage_node.config import NodeConfig
from pe_triage_node.db.session import make_engine
from pe_triage_node.export.findings import label_text
from pe_triage_node.web import operations, rules_editor, signin, study, text, worklist
from pe_triage_node.web.metrics import make_registry

HERE = Path(__file__).parent


class SecurityHeaders:
    """Headers on every response: a strict CSP (no inline script/style), no sniffing, no caching of PHI."""

    HEADERS = [
        (b"content-security-policy",
         b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
         b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"),
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"no-referrer"),
    ]

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope.get("path", "").startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.extend(self.HEADERS)
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(time=text.format_time, prob=text.format_probability, bytes=text.format_bytes,
                       ago=text.format_ago, label=label_text, pn=text.format_person_name, age=text.format_age)
    return Jinja2Templates(env=env)


def create_app(cfg: NodeConfig, engine: Engine | None = None) -> Starlette:
    """The console for ``cfg``; ``engine`` defaults to one made from ``cfg.database_url``.

    The database schema must be at head (``pe-triage web`` migrates at start-up).
    """
    own_engine = engine is None
    eng = engine if engine is not None else make_engine(cfg.database_url, echo=cfg.database.echo)
    routes = [
        *signin.ROUTES, *worklist.ROUTES, *study.ROUTES, *rules_editor.ROUTES, *operations.ROUTES,
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if own_engine:
            eng.dispose()

    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(SecurityHeaders)])
    app.state.cfg = cfg
    app.state.engine = eng
    app.state.templates = _templates()
    app.state.registry = make_registry(eng)
    return app


__all__ = ["create_app"]
