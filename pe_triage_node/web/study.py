"""One study: its findings line by line with where the model looked, the rendered images, its series
(and why some were not analysed), its exports to PACS with a resend, and its jobs' history."""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Route

from pe_triage_node.config import NodeConfig
from pe_triage_node.db.models import Job, JobKind, JobState, Rejection, Series, Study, TriageResult
from pe_triage_node.db.session import read_only
from pe_triage_node.dicom.uids import is_valid_uid
from pe_triage_node.export.findings import ResultFindings, finding_lines, is_positive, main_finding
from pe_triage_node.inference.labels import WINDOW_LABEL
from pe_triage_node.queue import JobEventView, JobView, enqueue, get_job, job_history, list_jobs, requeue
from pe_triage_node.web import auth
from pe_triage_node.web.handlers import client_address, current_user, db_engine, node_config, refuse, render, signed_in
from pe_triage_node.web.text import as_dict, as_number, json_value

log = logging.getLogger(__name__)

_PNG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.png")
_DCM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.dcm")
_SC_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage (and multi-frame SCs)
RESEND_MESSAGES = {
    "requeued": "Export queued again.",
    "resent": "Export queued again.",
    "active": "That export is already queued or running.",
    "refused": "The queue refused to resend it (another export to that destination is active).",
}


@dataclass
class LabelLine:
    label: str
    name: str
    probability: float | None
    threshold: float | None
    value: bool  # the consistent label
    changed: bool  # flipped by the consistency correction
    attention: list[float]  # per window, feet to head
    strip_is_probability: bool = False  # the window label's strip shows each window's probability


@dataclass
class ExportLine:
    job: JobView
    destination: str
    can_resend: bool


@dataclass
class StudyPage:
    study: Study
    series: list[Series]
    rejections: list[Rejection]
    result: TriageResult | None
    result_data: dict[str, Any]
    labels: list[LabelLine]
    positive: bool | None
    headline: str | None  # the main finding; None without a result
    images: list[str]
    infer_jobs: list[tuple[JobView, list[JobEventView]]]
    exports: list[ExportLine]
    export_history: list[tuple[JobView, list[JobEventView]]]

    @property
    def meaningless(self) -> bool:
        return bool(self.result_data.get("meaningless"))

    @property
    def timings(self) -> dict[str, float]:
        t = self.result_data.get("timings_s")
        return {str(k): float(v) for k, v in t.items() if as_number(v) is not None} if isinstance(t, dict) else {}

    @property
    def gradcam(self) -> list[dict[str, Any]]:
        g = self.result_data.get("gradcam")
        return [x for x in g if isinstance(x, dict)] if isinstance(g, list) else []


# -- rendered images ----------------------------------------------------------


def output_dir(cfg: NodeConfig, series_uid: str) -> Path | None:
    """``<export.outputs_dir>/<series uid>``, or ``None`` when the UID is not a valid UID."""
    if not is_valid_uid(series_uid):
        return None
    return cfg.resolve(cfg.export.outputs_dir) / series_uid


def _is_secondary_capture(path: Path) -> bool:
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # not DICOM, unreadable: not shown
        return False
    return str(getattr(ds, "SOPClassUID", "")).startswith(_SC_PREFIX)


def output_images(cfg: NodeConfig, series_uid: str) -> list[str]:
    """Names of the rendered images for a series, summary first.

    PNG files when the worker rendered them; otherwise its DICOM Secondary
    Captures (``*.dcm``), converted to PNG when requested.
    """
    folder = output_dir(cfg, series_uid)
    if folder is None or not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.is_file())
    names = [p.name for p in files if _PNG_RE.fullmatch(p.name)]
    if not names:
        names = [p.name for p in files if _DCM_RE.fullmatch(p.name) and _is_secondary_capture(p)][:24]
    return sorted(names, key=lambda n: (0 if "summary" in n.lower() else 1, n))


def image_path(cfg: NodeConfig, series_uid: str, name: str) -> Path | None:
    """The file behind an image URL, after checking UID and name (no path built from raw input)."""
    folder = output_dir(cfg, series_uid)
    if folder is None or not (_PNG_RE.fullmatch(name) or _DCM_RE.fullmatch(name)):
        return None
    path = folder / name
    return path if path.is_file() else None


def secondary_capture_png(path: Path) -> bytes | None:
    """A Secondary Capture's pixels as PNG bytes (RGB or 8-bit grey), or ``None`` when not renderable."""
    try:
        import numpy as np
        import pydicom
        from PIL import Image

        ds = pydicom.dcmread(path)
        if not str(getattr(ds, "SOPClassUID", "")).startswith(_SC_PREFIX):
            return None
        arr = ds.pixel_array
        if arr.ndim == 4 or (arr.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1):
            arr = arr[0]
        if arr.dtype != np.uint8:
            lo, hi = float(arr.min()), float(arr.max())
            arr = ((arr - lo) / (hi - lo or 1.0) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()
    except Exception:  # a broken file is "not found", never a crash
        log.warning("cannot render an output image as PNG", exc_info=True)
        return None


# -- exports ------------------------------------------------------------------


def export_destinations(session: Session, job_ids: list[int]) -> dict[int, str]:
    """Destination of each export job from its payload (``destination``/``name``/``ae_title``)."""
    if not job_ids:
        return {}
    out: dict[int, str] = {}
    for job_id, payload in session.execute(select(Job.id, Job.payload).where(Job.id.in_(job_ids))):
        data = json_value(payload, {})
        if data.get("type") == "webhook":
            out[job_id] = "webhook"
            continue
        dest = data.get("destination") or data.get("destination_name") or data.get("name") or data.get("ae_title")
        if isinstance(dest, dict):
            dest = dest.get("name") or dest.get("ae_title")
        out[job_id] = str(dest) if dest else "(default)"
    return out


def export_job_for_study(session: Session, study: Study, job_id: int) -> tuple[JobView, str, dict[str, Any]] | None:
    """The export job ``job_id`` if it belongs to ``study``, with its destination and payload."""
    job = get_job(session, job_id)
    if job is None or job.kind != JobKind.export:
        return None
    series_uids = set(session.scalars(select(Series.series_instance_uid).where(Series.study_id == study.id)))
    if job.study_instance_uid != study.study_instance_uid and job.series_instance_uid not in series_uids:
        return None
    payload = json_value(session.scalar(select(Job.payload).where(Job.id == job_id)), {})
    return job, export_destinations(session, [job_id]).get(job_id, "(default)"), payload


def _export_jobs(session: Session, study_uid: str, series_uids: set[str]) -> list[JobView]:
    by_id: dict[int, JobView] = {}
    for uid in series_uids:
        for j in list_jobs(session, kind=JobKind.export, series_instance_uid=uid):
            by_id[j.id] = j
    for j in list_jobs(session, kind=JobKind.export, limit=2000):
        if j.study_instance_uid == study_uid:
            by_id[j.id] = j
    return sorted(by_id.values(), key=lambda j: j.id, reverse=True)


# -- the page -----------------------------------------------------------------


def _label_lines(found: ResultFindings, data: dict[str, Any]) -> list[LabelLine]:
    """The findings in their words, with the correction and the attention over windows from the result."""
    window_probs = [w for w in (as_number(x) for x in data.get("window_probabilities") or []) if w is not None]
    attention = as_dict(data.get("attention"))
    corrected = as_dict(data.get("consistency")).get("changed")
    changed = {str(c) for c in corrected} if isinstance(corrected, list) else set()
    lines = []
    for line in finding_lines(found):
        att = attention.get(line.label)
        per_window_probability = line.label == WINDOW_LABEL and not att
        if per_window_probability:
            att = window_probs
        lines.append(LabelLine(
            label=line.label,
            name=line.text,
            probability=line.probability,
            threshold=line.threshold,
            value=line.present,
            changed=line.label in changed,
            attention=[float(a) for a in att if as_number(a) is not None] if isinstance(att, list) else [],
            strip_is_probability=per_window_probability,
        ))
    return lines


def load_study_page(session: Session, cfg: NodeConfig, study_id: int) -> StudyPage | None:
    study = session.get(Study, study_id)
    if study is None:
        return None
    uid = study.study_instance_uid
    series = list(session.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.series_number, Series.id)))
    rejections = list(session.scalars(
        select(Rejection).where(Rejection.study_instance_uid == uid).order_by(Rejection.id.desc()).limit(100)
    ))
    result = session.scalars(
        select(TriageResult).where(TriageResult.study_instance_uid == uid)
        .order_by(TriageResult.created_at.desc(), TriageResult.id.desc()).limit(1)
    ).first()
    data: dict[str, Any] = json_value(result.result_json, {}) if result is not None else {}
    found = (ResultFindings.from_stored(json_value(result.labels, {}), json_value(result.probabilities, {}), data)
             if result is not None else None)

    series_uids = {s.series_instance_uid for s in series}
    infer = sorted((j for u in series_uids for j in list_jobs(session, kind=JobKind.infer, series_instance_uid=u)),
                   key=lambda j: j.id, reverse=True)
    exports = _export_jobs(session, uid, series_uids)
    dests = export_destinations(session, [j.id for j in exports])
    # Newest job per destination is its status; resend allowed when not already active.
    latest: dict[str, JobView] = {}
    for j in exports:
        latest.setdefault(dests.get(j.id, "(default)"), j)
    image_uid = result.series_instance_uid if result is not None else None
    return StudyPage(
        study=study,
        series=series,
        rejections=rejections,
        result=result,
        result_data=data,
        labels=_label_lines(found, data) if found is not None else [],
        positive=is_positive(found.labels) if found is not None else None,
        headline=main_finding(found.labels) if found is not None else None,
        images=output_images(cfg, image_uid) if image_uid else [],
        infer_jobs=[(j, job_history(session, j.id)) for j in infer[:5]],
        exports=[ExportLine(j, d, j.state not in (JobState.queued, JobState.running)) for d, j in sorted(latest.items())],
        export_history=[(j, job_history(session, j.id)) for j in exports[:10]],
    )


# -- endpoints ----------------------------------------------------------------


@signed_in()
async def study_page(request: Request) -> Response:
    study_id = int(request.path_params["study_id"])

    def work() -> StudyPage | None:
        with Session(read_only(db_engine(request))) as s:
            page = load_study_page(s, node_config(request), study_id)
            if page is not None:
                s.expunge_all()
            return page

    page = await run_in_threadpool(work)
    if page is None:
        return refuse(request, 404, "No such study.")
    message = RESEND_MESSAGES.get(request.query_params.get("msg") or "")
    return render(request, "study.html", {"p": page, "message": message})


@signed_in()
async def study_image(request: Request) -> Response:
    study_id = int(request.path_params["study_id"])
    name = str(request.path_params["name"])

    def work() -> Path | None:
        with Session(read_only(db_engine(request))) as s:
            study = s.get(Study, study_id)
            if study is None:
                return None
            series_uid = s.scalar(
                select(TriageResult.series_instance_uid).where(TriageResult.study_instance_uid == study.study_instance_uid)
                .order_by(TriageResult.created_at.desc(), TriageResult.id.desc()).limit(1)
            )
        return image_path(node_config(request), series_uid, name) if series_uid else None

    path = await run_in_threadpool(work)
    if path is None:
        return Response("not found", status_code=404, media_type="text/plain")
    headers = {"cache-control": "private, max-age=60"}
    if path.suffix == ".dcm":  # the worker's DICOM Secondary Capture, shown as PNG
        png = await run_in_threadpool(secondary_capture_png, path)
        if png is None:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response(png, media_type="image/png", headers=headers)
    return FileResponse(path, media_type="image/png", headers=headers)


@signed_in(admin=True)
async def resend_export(request: Request) -> Response:
    study_id = int(request.path_params["study_id"])
    job_id = int(request.path_params["job_id"])
    user = current_user(request)
    remote = client_address(request)
    engine = db_engine(request)

    def work() -> str | None:
        with Session(engine) as s:
            study = s.get(Study, study_id)
            found = export_job_for_study(s, study, job_id) if study is not None else None
        if found is None:
            return None
        job, destination, payload = found
        if job.state in (JobState.queued, JobState.running):
            return "active"
        outcome = "refused"
        if job.state in (JobState.dead, JobState.failed):
            if requeue(engine, job_id, actor=user.username):
                outcome = "requeued"
        else:  # delivered before: send again as a new job with the same payload
            with Session(engine) as s, s.begin():
                new = enqueue(s, JobKind.export, priority=job.priority, study_instance_uid=job.study_instance_uid,
                              series_instance_uid=job.series_instance_uid, payload=payload,
                              dedupe_key=job.dedupe_key, max_attempts=job.max_attempts)
                outcome = "resent" if new.id != job_id else "active"
        with Session(engine) as s, s.begin():
            auth.audit(s, "export-resend", username=user.username, target=f"job {job_id}",
                       detail=f"destination {destination}: {outcome}", remote_addr=remote)
        return outcome

    outcome = await run_in_threadpool(work)
    if outcome is None:
        return refuse(request, 404, "No such export for this study.")
    return RedirectResponse(f"/study/{study_id}?msg={outcome}#exports", status_code=303)


ROUTES = [
    Route("/study/{study_id:int}", study_page, methods=["GET"]),
    Route("/study/{study_id:int}/image/{name:str}", study_image, methods=["GET"]),
    Route("/study/{study_id:int}/exports/{job_id:int}/resend", resend_export, methods=["POST"]),
]
