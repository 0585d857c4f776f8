"""The worklist: analysed studies, most urgent first, each with its state and, when not analysed, why.

Jobs are read through :mod:`pe_triage_node.queue`; the findings' wording comes
from :mod:`pe_triage_node.export.findings`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pe_triage_node.db.models import JobKind, JobState, Rejection, Series, SeriesState, Study, TriageResult
from pe_triage_node.db.session import read_only
from pe_triage_node.export.findings import ResultFindings, finding_lines, is_positive, main_finding
from pe_triage_node.inference.labels import WINDOW_LABEL
from pe_triage_node.queue import JobView, list_jobs
from pe_triage_node.web.handlers import db_engine, node_config, render, signed_in
from pe_triage_node.web.study import export_destinations
from pe_triage_node.web.text import format_age, format_duration, format_person_name, json_value

PRIORITIES = ("STAT", "URGENT", "ROUTINE")
STATUSES = ("queued", "running", "done", "rejected", "export failed", "failed")
MAX_REASON = 300  # characters of a failure or rejection reason on the worklist
# Sort order on the worklist: STAT, URGENT, studies still in analysis, ROUTINE, the rest.
_SORT_RANK = {"STAT": 0, "URGENT": 1, None: 2, "ROUTINE": 3}
_ACTIVE = ("done", "export failed", "queued", "running")
_HEADLINE = {"queued": "in analysis", "running": "in analysis", "failed": "analysis failed", "rejected": "not analysed"}
# Not among a row's "top" probabilities: the PE probability has its own column; these two say "no".
_NOT_TOP = (WINDOW_LABEL, "negative_exam_for_pe", "rv_lv_ratio_lt_1")


@dataclass
class WorklistRow:
    study_id: int
    priority: str | None
    flags: list[str]
    status: str
    headline: str  # the main finding, or what happens to the study
    reason: str  # why it failed or was not analysed ("" otherwise)
    patient_name: str
    patient_id: str
    accession: str
    description: str
    age_sex: str
    positive: bool | None
    pe_probability: float | None
    top_probabilities: list[tuple[str, float]]
    received_at: dt.datetime
    result_at: dt.datetime | None
    time_to_result: str
    rule_name: str | None
    meaningless: bool = False  # random demo weights: the numbers mean nothing

    @property
    def sort_key(self) -> tuple[int, float]:
        rank = _SORT_RANK.get(self.priority, 2) if self.status in _ACTIVE else 4
        return (rank, self.received_at.timestamp())


@dataclass(frozen=True)
class WorklistFilter:
    priority: str | None = None
    status: str | None = None
    received: str = "7d"  # 24h / 7d / 30d / all
    date: dt.date | None = None  # one UTC day, overrides "received"

    @classmethod
    def from_query(cls, q: dict[str, str]) -> WorklistFilter:
        priority = q.get("priority") if q.get("priority") in PRIORITIES else None
        status = q.get("status") if q.get("status") in STATUSES else None
        received = q.get("received") if q.get("received") in ("24h", "7d", "30d", "all") else "7d"
        day = None
        if q.get("date"):
            try:
                day = dt.date.fromisoformat(q["date"])
            except ValueError:
                day = None
        return cls(priority, status, received or "7d", day)

    def window(self, now: dt.datetime) -> tuple[dt.datetime | None, dt.datetime | None]:
        if self.date is not None:
            start = dt.datetime.combine(self.date, dt.time(), tzinfo=dt.timezone.utc)
            return start, start + dt.timedelta(days=1)
        days = {"24h": 1, "7d": 7, "30d": 30}.get(self.received)
        return (now - dt.timedelta(days=days), None) if days else (None, None)


def _latest_by(rows: list[Any], key: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for row in rows:
        out.setdefault(getattr(row, key), row)
    return out


def _studies_with_failed_export(session: Session, uids: set[str]) -> set[str]:
    """Studies whose latest export to some destination is dead (a later delivery clears it)."""
    jobs = [j for j in list_jobs(session, kind=JobKind.export, limit=5000) if j.study_instance_uid in uids]
    if not any(j.state == JobState.dead for j in jobs):
        return set()
    dests = export_destinations(session, [j.id for j in jobs])
    latest: dict[tuple[str, str], JobView] = {}
    for j in jobs:  # newest first
        latest.setdefault((j.study_instance_uid or "", dests.get(j.id, "")), j)
    return {study for (study, _dest), j in latest.items() if j.state == JobState.dead}


@dataclass(frozen=True)
class _Refusals:
    """Why studies and series were not analysed: the latest recorded rejection, else a rejected series' reason."""

    by_study: dict[str, str]
    by_series: dict[str, str]

    @classmethod
    def read(cls, session: Session, uids: list[str]) -> _Refusals:
        by_study: dict[str, str] = {}
        by_series: dict[str, str] = {}
        for rej in session.scalars(
            select(Rejection).where(Rejection.study_instance_uid.in_(uids)).order_by(Rejection.id.desc())
        ):
            by_study.setdefault(rej.study_instance_uid or "", rej.reason)
            if rej.series_instance_uid:
                by_series.setdefault(rej.series_instance_uid, rej.reason)
        for study_uid, series_uid, reason in session.execute(
            select(Study.study_instance_uid, Series.series_instance_uid, Series.state_reason)
            .join(Series, Series.study_id == Study.id)
            .where(Study.study_instance_uid.in_(uids), Series.state == SeriesState.rejected)
        ):
            by_study.setdefault(study_uid, reason or "series rejected")
            by_series.setdefault(series_uid, reason or "series rejected")
        return cls(by_study, by_series)


def _status(result: TriageResult | None, job: JobView | None, export_dead: bool, study_uid: str,
            refusals: _Refusals) -> tuple[str, str] | None:
    """(status, reason) of a study, or ``None`` while nothing is decided yet (still receiving)."""
    if job is not None and job.state in (JobState.queued, JobState.running, JobState.failed) and (
        result is None or job.created_at > result.created_at
    ):
        retry = f"attempt {job.attempts} failed, will retry: {job.last_error}" if job.state == JobState.failed else ""
        return ("running" if job.state == JobState.running else "queued"), retry
    if result is not None:
        return ("export failed" if export_dead else "done"), ""
    if job is not None and job.state == JobState.dead:
        refused = refusals.by_series.get(job.series_instance_uid or "")
        if refused is not None:  # the worker refused the series ("not a CTPA: ...")
            return "rejected", refused
        return "failed", job.last_error or "no reason recorded"
    if study_uid in refusals.by_study:
        return "rejected", refusals.by_study[study_uid]
    return None


def worklist_rows(session: Session, flt: WorklistFilter, limit: int = 500) -> list[WorklistRow]:
    """Analysed studies (a result, an inference job or a rejection), most urgent first, then arrival."""
    now = dt.datetime.now(dt.timezone.utc)
    start, end = flt.window(now)
    query = select(Study).order_by(Study.first_received_at.desc()).limit(limit * 2)
    if start is not None:
        query = query.where(Study.first_received_at >= start)
    if end is not None:
        query = query.where(Study.first_received_at < end)
    studies = list(session.scalars(query))
    if not studies:
        return []
    uids = [s.study_instance_uid for s in studies]
    results: dict[str, TriageResult] = _latest_by(
        list(session.scalars(
            select(TriageResult).where(TriageResult.study_instance_uid.in_(uids))
            .order_by(TriageResult.created_at.desc(), TriageResult.id.desc())
        )),
        "study_instance_uid",
    )
    infer_jobs: dict[str, JobView] = _latest_by(
        [j for j in list_jobs(session, kind=JobKind.infer, limit=max(1000, limit * 4)) if j.study_instance_uid in set(uids)],
        "study_instance_uid",
    )
    export_dead = _studies_with_failed_export(session, set(uids))
    refusals = _Refusals.read(session, uids)
    series_done = {
        s.series_instance_uid: s for s in session.scalars(
            select(Series).where(Series.series_instance_uid.in_([r.series_instance_uid for r in results.values()]))
        )
    } if results else {}

    rows: list[WorklistRow] = []
    for study in studies:
        uid = study.study_instance_uid
        result = results.get(uid)
        decided = _status(result, infer_jobs.get(uid), uid in export_dead, uid, refusals)
        if decided is None:
            continue
        status, reason = decided
        summary = json_value(result.result_json, {}) if result is not None else {}
        found = (ResultFindings.from_stored(json_value(result.labels, {}), json_value(result.probabilities, {}), summary)
                 if result is not None else None)
        ttr = None
        if result is not None:
            series = series_done.get(result.series_instance_uid)
            base = series.last_received_at if series is not None else study.last_received_at
            ttr = (result.created_at - base).total_seconds()
        row = WorklistRow(
            study_id=study.id,
            priority=result.priority if result is not None else None,
            flags=[str(f) for f in json_value(result.flags, [])] if result is not None else [],
            status=status,
            headline=main_finding(found.labels) if found is not None else _HEADLINE[status],
            reason=reason[:MAX_REASON],
            patient_name=format_person_name(study.patient_name),
            patient_id=study.patient_id or "",
            accession=study.accession_number or "",
            description=study.study_description or "",
            age_sex=" ".join(x for x in (format_age(study.patient_age), study.patient_sex or "") if x),
            positive=is_positive(found.labels) if found is not None else None,
            pe_probability=found.probabilities.get(WINDOW_LABEL) if found is not None else None,
            top_probabilities=sorted(
                ((line.text, line.probability) for line in finding_lines(found)
                 if line.probability is not None and line.label not in _NOT_TOP),
                key=lambda kv: -kv[1],
            )[:3] if found is not None else [],
            received_at=study.first_received_at,
            result_at=result.created_at if result is not None else None,
            time_to_result=format_duration(ttr),
            rule_name=result.rule_name if result is not None else None,
            meaningless=bool(summary.get("meaningless")),
        )
        if flt.priority and row.priority != flt.priority:
            continue
        if flt.status and row.status != flt.status:
            continue
        rows.append(row)
    rows.sort(key=lambda r: r.sort_key)
    return rows[:limit]


def _rows_for(request: Request) -> tuple[WorklistFilter, list[WorklistRow]]:
    flt = WorklistFilter.from_query(dict(request.query_params))
    with Session(read_only(db_engine(request))) as s:
        rows = worklist_rows(s, flt, limit=node_config(request).web.worklist_limit)
    return flt, rows


@signed_in()
async def worklist_page(request: Request) -> Response:
    flt, rows = await run_in_threadpool(_rows_for, request)
    return render(request, "worklist.html", {
        "rows": rows, "flt": flt, "priorities": PRIORITIES, "statuses": STATUSES,
        "refresh_s": node_config(request).web.worklist_refresh_s, "query": request.url.query,
    })


@signed_in(fragment=True)
async def worklist_fragment(request: Request) -> Response:
    _flt, rows = await run_in_threadpool(_rows_for, request)
    return render(request, "_worklist_rows.html", {"rows": rows})


ROUTES = [
    Route("/", worklist_page, methods=["GET"]),
    Route("/worklist/rows", worklist_fragment, methods=["GET"]),
]
