"""The web console: worklist, study pages, rules editor, operations, health and metrics.

Server-rendered (Starlette + Jinja2, no front-end build); one small script
refreshes the worklist. Every page but ``/signin``, ``/healthz``, ``/readyz``,
``/metrics`` and the static CSS/JS needs a signed-in user; every POST needs the
session's CSRF token; changes (rules, resend) need the admin role and are
written to the audit log. URLs carry internal ids only, never patient
identifiers or UIDs.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pe_triage_node.config import NodeConfig
from pe_triage_node.db.models import JobKind, JobState, RuleSetRecord, Study
from pe_triage_node.db.session import make_engine
from pe_triage_node.queue import enqueue, requeue
from pe_triage_node.rules import RulesError, parse_rules
from pe_triage_node.rules.store import RuleChangeRefused, activate, active_rule_set, history, replay, rollback
from pe_triage_node.web import auth, views
from pe_triage_node.web.metrics import make_registry

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SIGNIN_CSRF_COOKIE = "petriage_signin"
DISCLAIMER = "NOT FOR DIAGNOSTIC USE"
MAX_RULES_TEXT = 200_000
Endpoint = Callable[[Request], Awaitable[Response]]


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


# -- helpers ------------------------------------------------------------------


def _cfg(request: Request) -> NodeConfig:
    cfg: NodeConfig = request.app.state.cfg
    return cfg


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def _cookie_name(cfg: NodeConfig) -> str:
    # The __Host- prefix pins the cookie to this host and path "/" (needs Secure).
    return "__Host-petriage" if cfg.web.secure_cookies else "petriage_session"


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


def _safe_next(value: str | None) -> str:
    """Only a local path may follow the sign-in (no open redirect)."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


def _render(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
    templates: Jinja2Templates = request.app.state.templates
    base = {"disclaimer": DISCLAIMER, "user": request.scope.get("petriage_user"), "now": dt.datetime.now(dt.timezone.utc)}
    return templates.TemplateResponse(request, name, {**base, **context}, status_code=status_code)


def _refuse(request: Request, status: int, message: str) -> Response:
    return _render(request, "refused.html", {"message": message}, status_code=status)


async def _resolve(request: Request) -> auth.CurrentUser | None:
    cfg = _cfg(request)
    token = request.cookies.get(_cookie_name(cfg))
    if not token:
        return None

    def work() -> auth.CurrentUser | None:
        with Session(_engine(request)) as s, s.begin():
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
                    return _refuse(request, 403, "This form is out of date or did not come from this console "
                                   "(missing or wrong security token). Reload the page and try again.")
            if admin and not user.is_admin:
                return _refuse(request, 403, "Only administrators can do this. Nothing was changed.")
            return await endpoint(request)

        return inner

    return wrap


def _form(request: Request) -> FormData:
    form: FormData = request.scope["petriage_form"]
    return form


def _field(form: FormData, name: str, limit: int = 10_000) -> str:
    value = form.get(name)
    return value[:limit] if isinstance(value, str) else ""


def _user(request: Request) -> auth.CurrentUser:
    user: auth.CurrentUser = request.scope["petriage_user"]
    return user


# -- sign-in ------------------------------------------------------------------


async def signin_page(request: Request) -> Response:
    return _signin_form(request, error=None)


def _signin_form(request: Request, error: str | None, status_code: int = 200) -> Response:
    import secrets

    token = secrets.token_urlsafe(32)
    response = _render(
        request, "signin.html",
        {"csrf_token": token, "error": error, "next": _safe_next(request.query_params.get("next"))},
        status_code=status_code,
    )
    response.set_cookie(SIGNIN_CSRF_COOKIE, token, max_age=3600, httponly=True, samesite="strict",
                        secure=_cfg(request).web.secure_cookies, path="/signin")
    return response


async def signin_submit(request: Request) -> Response:
    cfg = _cfg(request)
    form = await request.form(max_fields=10, max_files=0)
    if not auth.tokens_match(request.cookies.get(SIGNIN_CSRF_COOKIE), _field(form, "csrf_token", 200)):
        return _signin_form(request, "The sign-in form expired or is not from this console; try again.", 403)
    username = _field(form, "username", 64).strip()
    password = _field(form, "password", 1024)
    remote = _client(request)

    def work() -> str | None:
        with Session(_engine(request)) as s, s.begin():
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
    response = RedirectResponse(_safe_next(_field(form, "next", 2000)), status_code=303)
    response.set_cookie(_cookie_name(cfg), token, max_age=cfg.web.session_max_hours * 3600, httponly=True,
                        samesite="strict", secure=cfg.web.secure_cookies, path="/")
    response.delete_cookie(SIGNIN_CSRF_COOKIE, path="/signin")
    return response


@signed_in()
async def signout(request: Request) -> Response:
    user = _user(request)
    remote = _client(request)

    def work() -> None:
        with Session(_engine(request)) as s, s.begin():
            auth.end_session(s, user.session_id)
            auth.audit(s, "sign-out", username=user.username, remote_addr=remote)

    await run_in_threadpool(work)
    response = RedirectResponse("/signin", status_code=303)
    response.delete_cookie(_cookie_name(_cfg(request)), path="/")
    return response


# -- worklist -----------------------------------------------------------------


def _worklist_rows(request: Request) -> tuple[views.WorklistFilter, list[views.WorklistRow]]:
    flt = views.WorklistFilter.from_query(dict(request.query_params))
    with Session(_engine(request)) as s:
        rows = views.worklist(s, flt, limit=_cfg(request).web.worklist_limit)
    return flt, rows


@signed_in()
async def worklist_page(request: Request) -> Response:
    flt, rows = await run_in_threadpool(_worklist_rows, request)
    return _render(request, "worklist.html", {
        "rows": rows, "flt": flt, "priorities": views.PRIORITIES, "statuses": views.STATUSES,
        "refresh_s": _cfg(request).web.worklist_refresh_s, "query": request.url.query,
    })


@signed_in(fragment=True)
async def worklist_fragment(request: Request) -> Response:
    _flt, rows = await run_in_threadpool(_worklist_rows, request)
    return _render(request, "_worklist_rows.html", {"rows": rows})


# -- study page ---------------------------------------------------------------


@signed_in()
async def study_page(request: Request) -> Response:
    study_id = int(request.path_params["study_id"])

    def work() -> views.StudyPage | None:
        with Session(_engine(request)) as s:
            page = views.study_page(s, _cfg(request), study_id)
            if page is not None:
                s.expunge_all()
            return page

    page = await run_in_threadpool(work)
    if page is None:
        return _refuse(request, 404, "No such study.")
    return _render(request, "study.html", {"p": page, "message": request.query_params.get("msg")})


@signed_in()
async def study_image(request: Request) -> Response:
    study_id = int(request.path_params["study_id"])
    name = str(request.path_params["name"])

    def work() -> Path | None:
        with Session(_engine(request)) as s:
            from pe_triage_node.db.models import TriageResult

            study = s.get(Study, study_id)
            if study is None:
                return None
            series_uid = s.scalar(
                select(TriageResult.series_instance_uid).where(TriageResult.study_instance_uid == study.study_instance_uid)
                .order_by(TriageResult.created_at.desc(), TriageResult.id.desc()).limit(1)
            )
        return views.image_path(_cfg(request), series_uid, name) if series_uid else None

    path = await run_in_threadpool(work)
    if path is None:
        return Response("not found", status_code=404, media_type="text/plain")
    headers = {"cache-control": "private, max-age=60"}
    if path.suffix == ".dcm":  # the worker's DICOM Secondary Capture, shown as PNG
        png = await run_in_threadpool(views.secondary_capture_png, path)
        if png is None:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response(png, media_type="image/png", headers=headers)
    return FileResponse(path, media_type="image/png", headers=headers)


_MESSAGES = {
    "requeued": "Export queued again.",
    "resent": "Export queued again.",
    "active": "That export is already queued or running.",
    "refused": "The queue refused to resend it (another export to that destination is active).",
}


@signed_in(admin=True)
async def resend_export(request: Request) -> Response:
    study_id = int(request.path_params["study_id"])
    job_id = int(request.path_params["job_id"])
    user = _user(request)
    remote = _client(request)

    def work() -> str | None:
        with Session(_engine(request)) as s:
            study = s.get(Study, study_id)
            found = views.export_job_for_study(s, study, job_id) if study is not None else None
        if found is None:
            return None
        job, destination, payload = found
        if job.state in (JobState.queued, JobState.running):
            return "active"
        outcome = "refused"
        if job.state in (JobState.dead, JobState.failed):
            if requeue(_engine(request), job_id, actor=user.username):
                outcome = "requeued"
        else:  # delivered before: send again as a new job with the same payload
            with Session(_engine(request)) as s, s.begin():
                new = enqueue(s, JobKind.export, priority=job.priority, study_instance_uid=job.study_instance_uid,
                              series_instance_uid=job.series_instance_uid, payload=payload,
                              dedupe_key=job.dedupe_key, max_attempts=job.max_attempts)
                outcome = "resent" if new.id != job_id else "active"
        with Session(_engine(request)) as s, s.begin():
            auth.audit(s, "export-resend", username=user.username, target=f"job {job_id}",
                       detail=f"destination {destination}: {outcome}", remote_addr=remote)
        return outcome

    outcome = await run_in_threadpool(work)
    if outcome is None:
        return _refuse(request, 404, "No such export for this study.")
    return RedirectResponse(f"/study/{study_id}?msg={outcome}#exports", status_code=303)


# -- rules --------------------------------------------------------------------


def _rules_context(request: Request, **extra: Any) -> dict[str, Any]:
    with Session(_engine(request)) as s:
        error = None
        try:
            active = active_rule_set(s)
            described = active.rules.describe()
            active_text, source = active.toml_text, active.source
        except RulesError as exc:  # the rules in force do not validate (edited file)
            described, active_text, source, error = [], "", "invalid", str(exc)
        changes = history(s, limit=50)
    ctx = {
        "active_lines": described, "active_source": source, "active_error": error,
        "editor_text": active_text, "changes": changes, "issues": None, "preview": None,
        "last_n": 100, "comment": "", "comment_error": None, "message": None,
    }
    ctx.update(extra)
    return ctx


def _study_ids(session: Session, uids: list[str]) -> dict[str, Study]:
    if not uids:
        return {}
    return {st.study_instance_uid: st for st in session.scalars(select(Study).where(Study.study_instance_uid.in_(uids)))}


@signed_in()
async def rules_page(request: Request) -> Response:
    msg = request.query_params.get("msg")
    ctx = await run_in_threadpool(lambda: _rules_context(request))
    if msg and msg.isdigit():
        ctx["message"] = f"Rule set {msg} is now in force."
    return _render(request, "rules.html", ctx)


def _rules_text(form: FormData) -> str:
    """The editor's text with the browser's CRLF line breaks (HTML form encoding) back to LF."""
    return _field(form, "toml_text", MAX_RULES_TEXT).replace("\r\n", "\n").replace("\r", "\n")


def _parse_last_n(form: FormData) -> int:
    try:
        return max(1, min(int(_field(form, "last_n", 10) or "100"), 5000))
    except ValueError:
        return 100


@signed_in()
async def rules_preview(request: Request) -> Response:
    form = _form(request)
    toml_text = _rules_text(form)
    last_n = _parse_last_n(form)
    comment = _field(form, "comment", 2000)

    def work() -> tuple[dict[str, Any], int]:
        try:
            rules = parse_rules(toml_text, "edited rules")
        except RulesError as exc:
            return _rules_context(request, editor_text=toml_text, issues=exc.issues, last_n=last_n, comment=comment), 422
        with Session(_engine(request)) as s:
            from pe_triage_node.rules.store import replay_results

            outcomes = replay_results(s, rules, last_n)
            changes = replay(s, rules, last_n)
            studies = _study_ids(s, [c.study_instance_uid for c in changes])
            s.expunge_all()
        preview = {"tested": len(outcomes), "changes": changes, "studies": studies, "lines": rules.describe()}
        return _rules_context(request, editor_text=toml_text, preview=preview, last_n=last_n, comment=comment), 200

    ctx, status = await run_in_threadpool(work)
    return _render(request, "rules.html", ctx, status_code=status)


@signed_in(admin=True)
async def rules_save(request: Request) -> Response:
    form = _form(request)
    toml_text = _rules_text(form)
    comment = _field(form, "comment", 2000).strip()
    last_n = _parse_last_n(form)
    user = _user(request)
    remote = _client(request)

    def work() -> tuple[dict[str, Any] | None, int]:
        try:
            parse_rules(toml_text, "edited rules")
        except RulesError as exc:
            return _rules_context(request, editor_text=toml_text, issues=exc.issues, last_n=last_n, comment=comment), 422
        if not comment:
            return _rules_context(request, editor_text=toml_text, last_n=last_n,
                                  comment_error="Say why you change the rules (required)."), 422
        try:
            with Session(_engine(request)) as s, s.begin():
                row = activate(s, toml_text, author=user.username, comment=comment)
                auth.audit(s, "rules-activate", username=user.username, target=f"rule set {row.id}",
                           detail=comment, remote_addr=remote)
                return None, row.id
        except (RulesError, RuleChangeRefused) as exc:
            return _rules_context(request, editor_text=toml_text, last_n=last_n, comment=comment,
                                  comment_error=str(exc)), 409

    ctx, status = await run_in_threadpool(work)
    if ctx is not None:
        return _render(request, "rules.html", ctx, status_code=status)
    return RedirectResponse(f"/rules?msg={status}#history", status_code=303)


@signed_in(admin=True)
async def rules_rollback(request: Request) -> Response:
    rule_set_id = int(request.path_params["rule_set_id"])
    comment = _field(_form(request), "comment", 2000).strip()
    user = _user(request)
    remote = _client(request)

    def work() -> tuple[dict[str, Any] | None, int]:
        if not comment:
            return _rules_context(request, message=None,
                                  comment_error=f"Rolling back to rule set {rule_set_id} needs a comment."), 422
        try:
            with Session(_engine(request)) as s, s.begin():
                if s.get(RuleSetRecord, rule_set_id) is None:
                    return _rules_context(request, comment_error=f"No rule set {rule_set_id}."), 404
                row = rollback(s, rule_set_id, author=user.username, comment=comment)
                auth.audit(s, "rules-rollback", username=user.username, target=f"rule set {row.id}",
                           detail=f"restores rule set {rule_set_id}: {comment}", remote_addr=remote)
                return None, row.id
        except (RulesError, RuleChangeRefused) as exc:
            return _rules_context(request, comment_error=str(exc)), 409

    ctx, status = await run_in_threadpool(work)
    if ctx is not None:
        return _render(request, "rules.html", ctx, status_code=status)
    return RedirectResponse(f"/rules?msg={status}#history", status_code=303)


# -- operations ---------------------------------------------------------------


@signed_in()
async def ops_page(request: Request) -> Response:
    user = _user(request)

    def work() -> tuple[views.OpsPage, list[Any]]:
        with Session(_engine(request)) as s:
            page = views.ops_page(s, _cfg(request))
            audit_rows = auth.recent_audit(s, 50) if user.is_admin else []
            s.expunge_all()
        return page, audit_rows

    page, audit_rows = await run_in_threadpool(work)
    return _render(request, "ops.html", {"o": page, "audit": audit_rows, "kinds": list(JobKind),
                                         "states": list(JobState)})


# -- health and metrics (no sign-in) ------------------------------------------


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def readiness(cfg: NodeConfig, engine: Engine) -> dict[str, dict[str, Any]]:
    """Cheap checks: database answers, spool folder writable, weights manifest and files present."""
    checks: dict[str, dict[str, Any]] = {}
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = {"ok": True}
    except Exception as exc:  # reported, not raised
        checks["database"] = {"ok": False, "detail": type(exc).__name__}
    spool = cfg.spool_dir
    try:
        with tempfile.NamedTemporaryFile(dir=spool, prefix=".readyz-"):
            pass
        checks["spool"] = {"ok": True}
    except OSError as exc:
        checks["spool"] = {"ok": False, "detail": f"spool not writable: {exc.strerror or exc}"}
    manifest, problem = views.read_manifest_cheaply(cfg)
    checks["model"] = {"ok": manifest is not None, **({"model_version": manifest.get("model_version")} if manifest else {"detail": problem})}
    return checks


async def readyz(request: Request) -> Response:
    checks = await run_in_threadpool(readiness, _cfg(request), _engine(request))
    ok = all(c["ok"] for c in checks.values())
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    body = await run_in_threadpool(generate_latest, request.app.state.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


# -- the app ------------------------------------------------------------------


def _filters(env: jinja2.Environment) -> None:
    def fmt_time(value: dt.datetime | None) -> str:
        return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M") if value else ""

    def fmt_prob(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "–"

    def fmt_bytes(value: int | None) -> str:
        if value is None:
            return "?"
        size = float(value)
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if size < 1024 or unit == "TiB":
                return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
            size /= 1024
        return str(value)

    def ago(value: dt.datetime | None) -> str:
        if value is None:
            return "never"
        s = int((dt.datetime.now(dt.timezone.utc) - value).total_seconds())
        if s < 90:
            return f"{s} s ago"
        if s < 5400:
            return f"{s // 60} min ago"
        return f"{s // 3600} h ago"

    env.filters.update(time=fmt_time, prob=fmt_prob, bytes=fmt_bytes, ago=ago, label=views.label_name,
                       pn=views.format_person_name, age=views.format_age)


def create_app(cfg: NodeConfig, engine: Engine | None = None) -> Starlette:
    """The console for ``cfg``; ``engine`` defaults to one made from ``cfg.database_url``.

    The database schema must be at head (``pe-triage web`` migrates at start-up).
    """
    own_engine = engine is None
    eng = engine if engine is not None else make_engine(cfg.database_url, echo=cfg.database.echo)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    _filters(env)
    templates = Jinja2Templates(env=env)
    routes = [
        Route("/signin", signin_page, methods=["GET"]),
        Route("/signin", signin_submit, methods=["POST"]),
        Route("/signout", signout, methods=["POST"]),
        Route("/", worklist_page, methods=["GET"]),
        Route("/worklist/rows", worklist_fragment, methods=["GET"]),
        Route("/study/{study_id:int}", study_page, methods=["GET"]),
        Route("/study/{study_id:int}/image/{name:str}", study_image, methods=["GET"]),
        Route("/study/{study_id:int}/exports/{job_id:int}/resend", resend_export, methods=["POST"]),
        Route("/rules", rules_page, methods=["GET"]),
        Route("/rules/preview", rules_preview, methods=["POST"]),
        Route("/rules/save", rules_save, methods=["POST"]),
        Route("/rules/rollback/{rule_set_id:int}", rules_rollback, methods=["POST"]),
        Route("/ops", ops_page, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
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
    app.state.templates = templates
    app.state.registry = make_registry(eng)
    return app


__all__ = ["create_app", "readiness"]
