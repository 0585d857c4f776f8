"""Signing in and out: the sign-in form (its own CSRF cookie), password checks with lock-out, the session cookie."""

from __future__ import annotations

import logging
import secrets

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from pe_triage_node.web import auth
from pe_triage_node.web.handlers import (
    client_address,
    current_user,
    db_engine,
    form_field,
    node_config,
    render,
    session_cookie_name,
    signed_in,
)

log = logging.getLogger(__name__)

SIGNIN_CSRF_COOKIE = "petriage_signin"


def safe_next(value: str | None) -> str:
    """Only a local path may follow the sign-in (no open redirect)."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


async def signin_page(request: Request) -> Response:
    return _signin_form(request, error=None)


def _signin_form(request: Request, error: str | None, status_code: int = 200) -> Response:
    token = secrets.token_urlsafe(32)
    response = render(
        request, "signin.html",
        {"csrf_token": token, "error": error, "next": safe_next(request.query_params.get("next"))},
        status_code=status_code,
    )
    response.set_cookie(SIGNIN_CSRF_COOKIE, token, max_age=3600, httponly=True, samesite="strict",
                        secure=node_config(request).web.secure_cookies, path="/signin")
    return response


async def signin_submit(request: Request) -> Response:
    cfg = node_config(request)
    form = await request.form(max_fields=10, max_files=0)
    if not auth.tokens_match(request.cookies.get(SIGNIN_CSRF_COOKIE), form_field(form, "csrf_token", 200)):
        return _signin_form(request, "The sign-in form expired or is not from this console; try again.", 403)
    username = form_field(form, "username", 64).strip()
    password = form_field(form, "password", 1024)
    remote = client_address(request)

    def work() -> str | None:
        with Session(db_engine(request)) as s, s.begin():
            if auth.too_many_failures(s, username):
                auth.audit(s, "sign-in-failed", username=username or None, detail="too many failures: locked",
                           remote_addr=remote)
                return None
            user = auth.verify_password(s, username, password)
            if user is None:
                auth.audit(s, "sign-in-failed", username=username or None, remote_addr=remote)
                return None
            auth.audit(s, "sign-in", username=user.username, remote_addr=remote)
            return auth.start_session(s, user, cfg.web.session_max_hours)

    token = await run_in_threadpool(work)
    if token is None:
        log.info("console sign-in refused")
        return _signin_form(request, "Wrong user name or password.", 401)
    response = RedirectResponse(safe_next(form_field(form, "next", 2000)), status_code=303)
    response.set_cookie(session_cookie_name(cfg), token, max_age=cfg.web.session_max_hours * 3600, httponly=True,
                        samesite="strict", secure=cfg.web.secure_cookies, path="/")
    response.delete_cookie(SIGNIN_CSRF_COOKIE, path="/signin")
    return response


@signed_in()
async def signout(request: Request) -> Response:
    user = current_user(request)
    remote = client_address(request)

    def work() -> None:
        with Session(db_engine(request)) as s, s.begin():
            auth.end_session(s, user.session_id)
            auth.audit(s, "sign-out", username=user.username, remote_addr=remote)

    await run_in_threadpool(work)
    response = RedirectResponse("/signin", status_code=303)
    response.delete_cookie(session_cookie_name(node_config(request)), path="/")
    return response


ROUTES = [
    Route("/signin", signin_page, methods=["GET"]),
    Route("/signin", signin_submit, methods=["POST"]),
    Route("/signout", signout, methods=["POST"]),
]
