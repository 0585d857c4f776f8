"""The priority rules page: the rules in force and their history for everyone; for administrators,
editing with a preview of the effect on recent studies, saving with a comment, and rollback.

Testing edited rules runs them over stored results; that is bounded (time,
patterns, results) by :mod:`pe_triage_node.web.rules_preview` and only
administrators, who may change the rules anyway, can do it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from pe_triage_node.db.models import RuleSetRecord, Study
from pe_triage_node.db.session import read_only
from pe_triage_node.rules import RulesError, RuleSet, parse_rules
from pe_triage_node.rules.store import RuleChangeRefused, activate, active_rule_set, history, rollback
from pe_triage_node.web import auth
from pe_triage_node.web.handlers import (
    client_address,
    current_user,
    db_engine,
    form_field,
    posted_form,
    render,
    signed_in,
)
from pe_triage_node.web.rules_preview import MAX_RESULTS, Replayed, ReplayRefused, replay_bounded

MAX_RULES_TEXT = 100_000  # characters of the rules text
DEFAULT_LAST_N = 100


@dataclass(frozen=True)
class _Edit:
    """What the editor's form posted."""

    toml_text: str
    too_long: bool
    last_n: int
    comment: str

    @classmethod
    def read(cls, form: FormData) -> _Edit:
        raw = form.get("toml_text")
        text = raw if isinstance(raw, str) else ""
        try:
            last_n = max(1, min(int(form_field(form, "last_n", 10) or DEFAULT_LAST_N), MAX_RESULTS))
        except ValueError:
            last_n = DEFAULT_LAST_N
        return cls(
            # The browser's CRLF line breaks (HTML form encoding) back to LF.
            toml_text=text[:MAX_RULES_TEXT].replace("\r\n", "\n").replace("\r", "\n"),
            too_long=len(text) > MAX_RULES_TEXT,
            last_n=last_n,
            comment=form_field(form, "comment", 2000).strip(),
        )


def _rules_context(request: Request, **extra: Any) -> dict[str, Any]:
    with Session(read_only(db_engine(request))) as s:
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
        "editor_text": active_text, "changes": changes, "issues": None, "refusal": None, "preview": None,
        "last_n": DEFAULT_LAST_N, "max_results": MAX_RESULTS, "comment": "", "comment_error": None, "message": None,
    }
    ctx.update(extra)
    return ctx


def _edit_context(request: Request, edit: _Edit, **extra: Any) -> dict[str, Any]:
    return _rules_context(request, editor_text=edit.toml_text, last_n=edit.last_n, comment=edit.comment, **extra)


class _Refused(Exception):
    """The edited rules are not tested or saved: the page to show instead, and its status."""

    def __init__(self, context: dict[str, Any], status: int) -> None:
        super().__init__(status)
        self.context, self.status = context, status


def _parsed(request: Request, edit: _Edit) -> RuleSet:
    if edit.too_long:
        raise _Refused(_edit_context(request, edit, refusal=f"The rules text is longer than {MAX_RULES_TEXT} "
                                                            "characters; nothing was changed."), 413)
    try:
        return parse_rules(edit.toml_text, "edited rules")
    except RulesError as exc:
        raise _Refused(_edit_context(request, edit, issues=exc.issues), 422) from exc


def _replayed(request: Request, edit: _Edit, rules: RuleSet) -> Replayed:
    try:
        return replay_bounded(db_engine(request), rules, edit.last_n)
    except ReplayRefused as exc:
        raise _Refused(_edit_context(request, edit, refusal=str(exc)), 422) from exc


@signed_in()
async def rules_page(request: Request) -> Response:
    msg = request.query_params.get("msg")
    ctx = await run_in_threadpool(lambda: _rules_context(request))
    if msg and msg.isdigit():
        ctx["message"] = f"Rule set {msg} is now in force."
    return render(request, "rules.html", ctx)


@signed_in(admin=True)
async def rules_preview(request: Request) -> Response:
    edit = _Edit.read(posted_form(request))

    def work() -> tuple[dict[str, Any], int]:
        try:
            rules = _parsed(request, edit)
            replayed = _replayed(request, edit, rules)
        except _Refused as refused:
            return refused.context, refused.status
        uids = [c.study_instance_uid for c in replayed.changes]
        with Session(read_only(db_engine(request))) as s:
            studies = {st.study_instance_uid: st for st in s.scalars(select(Study).where(Study.study_instance_uid.in_(uids)))}
            s.expunge_all()
        preview = {"tested": replayed.tested, "changes": replayed.changes, "studies": studies, "lines": rules.describe()}
        return _edit_context(request, edit, preview=preview), 200

    ctx, status = await run_in_threadpool(work)
    return render(request, "rules.html", ctx, status_code=status)


@signed_in(admin=True)
async def rules_save(request: Request) -> Response:
    edit = _Edit.read(posted_form(request))
    user = current_user(request)
    remote = client_address(request)

    def work() -> tuple[dict[str, Any] | None, int]:
        try:
            rules = _parsed(request, edit)
            if not edit.comment:
                raise _Refused(_edit_context(request, edit, comment_error="Say why you change the rules (required)."), 422)
            _replayed(request, edit, rules)  # rules that stall a replay would stall the worker too
        except _Refused as refused:
            return refused.context, refused.status
        try:
            with Session(db_engine(request)) as s, s.begin():
                row = activate(s, edit.toml_text, author=user.username, comment=edit.comment)
                auth.audit(s, "rules-activate", username=user.username, target=f"rule set {row.id}",
                           detail=edit.comment, remote_addr=remote)
                return None, row.id
        except (RulesError, RuleChangeRefused) as exc:
            return _edit_context(request, edit, comment_error=str(exc)), 409

    ctx, status = await run_in_threadpool(work)
    if ctx is not None:
        return render(request, "rules.html", ctx, status_code=status)
    return RedirectResponse(f"/rules?msg={status}#history", status_code=303)


@signed_in(admin=True)
async def rules_rollback(request: Request) -> Response:
    rule_set_id = int(request.path_params["rule_set_id"])
    comment = form_field(posted_form(request), "comment", 2000).strip()
    user = current_user(request)
    remote = client_address(request)

    def work() -> tuple[dict[str, Any] | None, int]:
        if not comment:
            return _rules_context(request, comment_error=f"Rolling back to rule set {rule_set_id} needs a comment."), 422
        try:
            with Session(db_engine(request)) as s, s.begin():
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
        return render(request, "rules.html", ctx, status_code=status)
    return RedirectResponse(f"/rules?msg={status}#history", status_code=303)


ROUTES = [
    Route("/rules", rules_page, methods=["GET"]),
    Route("/rules/preview", rules_preview, methods=["POST"]),
    Route("/rules/save", rules_save, methods=["POST"]),
    Route("/rules/rollback/{rule_set_id:int}", rules_rollback, methods=["POST"]),
]
