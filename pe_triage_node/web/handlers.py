"""What every console endpoint shares: the app's configuration and database, rendering, refusals,
the signed-in user with the role and CSRF checks, and form fields."""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import Engine
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from pe_triage_node.config import NodeConfig
from pe_triage_node.web import auth

log = logging.getLogger(__name__)

DISCLAIMER = "NOT FOR DIAGNOSTIC USE"
Endpoint = Callable[[Request], Awaitable[Response]]


def node_config(request: Request) -> NodeConfig:
    cfg: NodeConfig = request.app.state.cfg
    return cfg


def db_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def session_cookie_name(cfg: NodeConfig) -> str:
    # The __Host- prefix pins the cookie to this host and path "/" (needs Secure).
    return "__Host-petriage" if cfg.web.secure_cookies else "petriage_session"


def client_address(request: Request) -> str | None:
    return request.client.host if request.client else None


def render(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
    templates: Jinja2Templates = request.app.state.templates
    base = {"disclaimer": DISCLAIMER, "user": request.scope.get("petriage_user"), "now": dt.datetime.now(dt.timezone.utc)}
    return templates.TemplateResponse(request, name, {**base, **context}, status_code=status_code)


def refuse(request: Request, status: int, message: str) -> Response:
    return render(request, "refused.html", {"message": message}, status_code=status)


async def _resolve(request: Request) -> auth.CurrentUser | None:
    cfg = node_config(request)
    token = request.cookies.get(session_cookie_name(cfg))
    if not token:
        return None

    def work() -> auth.CurrentUser | None:
        with Session(db_engine(request)) as s, s.begin():
            return auth.resolve_session(s, token, cfg.web.session_idle_minutes)

    return await run_in_threadpool(work)


def signed_in(*, admin: bool = False, fragment: bool = False) -> Callable[[Endpoint], Endpoint]:
    """Endpoint decorator: needs a session (GET: redirect to sign-in), the CSRF token on POST, the role."""

    def wrap(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def inner(request: Request) -> Response:
            user = await _resolve(request)
            if user is None:
                if fragment or request.method != "GET":
                    return Response("sign in first", status_code=401, media_type="text/plain")
                nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse("/signin?" + urlencode({"next": nxt}), status_code=303)
            request.scope["petriage_user"] = user
            if request.method == "POST":
                form = await request.form(max_fields=50, max_files=0)
                request.scope["petriage_form"] = form
                given = form.get("csrf_token")
                if not auth.tokens_match(user.csrf_token, given if isinstance(given, str) else None):
                    log.warning("form refused: missing or wrong CSRF token on %s", request.url.path)
                    return refuse(request, 403, "This form is out of date or did not come from this console "
                                  "(missing or wrong security token). Reload the page and try again.")
            if admin and not user.is_admin:
                return refuse(request, 403, "Only administrators can do this. Nothing was changed.")
            return await endpoint(request)

        return inner

    return wrap


def posted_form(request: Request) -> FormData:
    """The form :func:`signed_in` read and checked."""
    form: FormData = request.scope["petriage_form"]
    return form


def form_field(form: FormData, name: str, limit: int = 10_000) -> str:
    value = form.get(name)
    return value[:limit] if isinstance(value, str) else ""


def current_user(request: Request) -> auth.CurrentUser:
    user: auth.CurrentUser = request.scope["petriage_user"]
    return user
