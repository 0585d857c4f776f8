"""What the console's pages show, read from the node's database (no HTTP here).

Jobs are read through :mod:`pe_triage_node.queue` (``list_jobs``, ``job_history``);
only an export job's destination is read from ``jobs.payload`` directly, since
``JobView`` does not carry the payload.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pe_triage_node.config import NodeConfig
from pe_triage_node.db.models import (
    Association,
    Instance,
    Job,
    JobKind,
    JobState,
    Rejection,
    Series,
    SeriesState,
    Study,
    TriageResult,
)
from pe_triage_node.queue import JobEventView, JobView, job_history, list_jobs, queue_counts

log = logging.getLogger(__name__)

PRIORITIES = ("STAT", "URGENT", "ROUTINE")
STATUSES = ("queued", "running", "done", "rejected", "export failed", "failed")
WINDOW_LABEL = "pe_present_on_image"
LABEL_NAMES: dict[str, str] = {
    "pe_present_on_image": "PE (any image)",
    "pe_present": "PE present",
    "acute_pe": "Acute PE",
    "negative_exam_for_pe": "Negative exam",
    "indeterminate": "Indeterminate quality",
    "chronic_pe": "Chronic PE",
    "acute_and_chronic_pe": "Acute on chronic PE",
    "central_pe": "Central PE",
    "leftsided_pe": "Left-sided PE",
    "rightsided_pe": "Right-sided PE",
    "rv_lv_ratio_gte_1": "RV/LV \u2265 1",
    "rv_lv_ratio_lt_1": "RV/LV < 1",
}
LABEL_ORDER = tuple(LABEL_NAMES)
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_PNG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.png$")
_DCM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.dcm$")
_SC_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage (and multi-frame SCs)
# Sort order on the worklist: STAT, URGENT, studies still in analysis, ROUTINE, the rest.
_SORT_RANK = {"STAT": 0, "URGENT": 1, None: 2, "ROUTINE": 3}


def label_name(label: str) -> str:
    return LABEL_NAMES.get(label, label.replace("_", " "))


def valid_uid(uid: str | None) -> bool:
    """PS3.5 9.1: digits and dots, no leading zeros, at most 64 characters."""
    return uid is not None and len(uid) <= 64 and _UID_RE.match(uid) is not None


def format_person_name(pn: str | None) -> str:
    """DICOM PN ``FAMILY^GIVEN^MIDDLE`` as ``FAMILY, Given Middle`` (alphabetic group only)."""
    if not pn:
        return ""
    parts = [p for p in pn.split("=")[0].split("^")]
    family = parts[0].strip()
    rest = " ".join(p.strip() for p in parts[1:3] if p.strip())
    return f"{family}, {rest}" if rest else family


def format_age(age: str | None) -> str:
    """DICOM AS ``043Y`` as ``43 y`` (days, weeks, months: d, w, m)."""
    m = re.match(r"^\s*(\d{1,3})\s*([DWMY])\s*$", age or "")
    return f"{int(m[1])} {m[2].lower()}" if m else (age or "").strip()


def _json(text: str | None, default: Any) -> Any:
    try:
        value = json.loads(text or "")
    except (json.JSONDecodeError, TypeError):
        return default
    return value if isinstance(value, type(default)) else default


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _num(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def pe_probability(probabilities: dict[str, Any], result: dict[str, Any]) -> float | None:
    """The study's PE probability: ``pe_present``, else ``pe_present_on_image``, else the top window."""
    for key in ("pe_present", WINDOW_LABEL):
        p = _num(probabilities.get(key))
        if p is not None:
            return p
    windows = [w for w in (_num(x) for x in result.get("window_probabilities") or []) if w is not None]
    return max(windows) if windows else None


def main_findings(labels: dict[str, Any]) -> tuple[bool | None, list[str]]:
    """(PE positive?, short findings in the radiologist's words) from consistent labels."""
    positive: bool | None = None
    for key in ("pe_present", WINDOW_LABEL):
        if isinstance(labels.get(key), bool):
            positive = labels[key]
            break
    if positive is None and labels.get("negative_exam_for_pe") is True:
        positive = False
    out: list[str] = []
    if positive:
        where = [w for k, w in (("central_pe", "central"), ("rightsided_pe", "right"), ("leftsided_pe", "left")) if labels.get(k)]
        out.append("PE" + (f" ({', '.join(where)})" if where else ""))
        if labels.get("acute_and_chronic_pe"):
            out.append("acute on chronic")
        elif labels.get("chronic_pe"):
            out.append("chronic")
        if labels.get("rv_lv_ratio_gte_1"):
            out.append("RV/LV \u2265 1")
    elif positive is False:
        out.append("No PE")
    if labels.get("indeterminate"):
        out.append("indeterminate quality")
    return positive, out


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return ""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


# -- worklist -----------------------------------------------------------------


@dataclass
class WorklistRow:
    study_id: int
    priority: str | None
    flags: list[str]
    status: str
    patient_name: str
    patient_id: str
    accession: str
    description: str
    age_sex: str
    findings: list[str]
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
        rank = _SORT_RANK.get(self.priority, 2) if self.status in ("done", "export failed", "queued", "running") else 4
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
        k = getattr(row, key)
        if k not in out:
            out[k] = row
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


def worklist(session: Session, flt: WorklistFilter, limit: int = 500) -> list[WorklistRow]:
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
    results = _latest_by(
        list(session.scalars(
            select(TriageResult).where(TriageResult.study_instance_uid.in_(uids))
            .order_by(TriageResult.created_at.desc(), TriageResult.id.desc())
        )),
        "study_instance_uid",
    )
    infer_jobs = _latest_by(
        [j for j in list_jobs(session, kind=JobKind.infer, limit=max(1000, limit * 4)) if j.study_instance_uid in set(uids)],
        "study_instance_uid",
    )
    export_dead = _studies_with_failed_export(session, set(uids))
    rejected = set(session.scalars(
        select(Rejection.study_instance_uid).where(Rejection.study_instance_uid.in_(uids)).distinct()
    )) | set(session.scalars(
        select(Study.study_instance_uid).join(Series, Series.study_id == Study.id)
        .where(Study.study_instance_uid.in_(uids), Series.state == SeriesState.rejected).distinct()
    ))
    series_done = {
        s.series_instance_uid: s for s in session.scalars(
            select(Series).where(Series.series_instance_uid.in_([r.series_instance_uid for r in results.values()]))
        )
    } if results else {}

    rows: list[WorklistRow] = []
    for study in studies:
        uid = study.study_instance_uid
        result = results.get(uid)
        job = infer_jobs.get(uid)
        status: str | None = None
        if job is not None and job.state in (JobState.queued, JobState.running, JobState.failed) and (
            result is None or job.created_at > result.created_at
        ):
            status = "running" if job.state == JobState.running else "queued"
        elif result is not None:
            status = "export failed" if uid in export_dead else "done"
        elif job is not None and job.state == JobState.dead:
            status = "failed"
        elif uid in rejected:
            status = "rejected"
        if status is None:
            continue  # still receiving, nothing decided yet
        labels: dict[str, Any] = {}
        probabilities: dict[str, Any] = {}
        full: dict[str, Any] = {}
        if result is not None:
            labels = _json(result.labels, {})
            probabilities = _json(result.probabilities, {})
            full = _json(result.result_json, {})
        positive, findings = main_findings(labels) if result is not None else (None, [])
        if status == "rejected" and not findings:
            findings = ["not analysed"]
        top = sorted(
            ((label_name(k), float(v)) for k, v in probabilities.items()
             if _num(v) is not None and k not in ("negative_exam_for_pe", "rv_lv_ratio_lt_1")),
            key=lambda kv: -kv[1],
        )[:3]
        ttr = None
        if result is not None:
            series = series_done.get(result.series_instance_uid)
            base = series.last_received_at if series is not None else study.last_received_at
            ttr = (result.created_at - base).total_seconds()
        row = WorklistRow(
            study_id=study.id,
            priority=result.priority if result is not None else None,
            flags=[str(f) for f in _json(result.flags, [])] if result is not None else [],
            status=status,
            patient_name=format_person_name(study.patient_name),
            patient_id=study.patient_id or "",
            accession=study.accession_number or "",
            description=study.study_description or "",
            age_sex=" ".join(x for x in (format_age(study.patient_age), study.patient_sex or "") if x),
            findings=findings,
            positive=positive,
            pe_probability=pe_probability(probabilities, full) if result is not None else None,
            top_probabilities=top,
            received_at=study.first_received_at,
            result_at=result.created_at if result is not None else None,
            time_to_result=_duration(ttr),
            rule_name=result.rule_name if result is not None else None,
            meaningless=bool(full.get("meaningless")),
        )
        if flt.priority and row.priority != flt.priority:
            continue
        if flt.status and row.status != flt.status:
            continue
        rows.append(row)
    rows.sort(key=lambda r: r.sort_key)
    return rows[:limit]


# -- study page ---------------------------------------------------------------


@dataclass
class LabelLine:
    label: str
    name: str
    probability: float | None
    threshold: float | None
    value: bool | None  # the consistent label
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
    findings: list[str]
    images: list[str]
    image_series_uid: str | None
    infer_jobs: list[tuple[JobView, list[JobEventView]]]
    exports: list[ExportLine]
    export_history: list[tuple[JobView, list[JobEventView]]]
    older_results: list[TriageResult] = field(default_factory=list)

    @property
    def meaningless(self) -> bool:
        return bool(self.result_data.get("meaningless"))

    @property
    def timings(self) -> dict[str, float]:
        t = self.result_data.get("timings_s")
        return {str(k): float(v) for k, v in t.items() if _num(v) is not None} if isinstance(t, dict) else {}

    @property
    def gradcam(self) -> list[dict[str, Any]]:
        g = self.result_data.get("gradcam")
        return [x for x in g if isinstance(x, dict)] if isinstance(g, list) else []


def outputs_root(cfg: NodeConfig) -> Path:
    """Where the worker writes a series' outputs: ``export.outputs_dir`` (under var_dir), default ``outputs``."""
    export = getattr(cfg, "export", None)
    configured = getattr(export, "outputs_dir", None)
    return cfg.resolve(configured if isinstance(configured, Path) else Path("outputs"))


def output_dir(cfg: NodeConfig, series_uid: str) -> Path | None:
    """``<outputs>/<series uid>``, or ``None`` when the UID is not a valid UID."""
    if not valid_uid(series_uid):
        return None
    return outputs_root(cfg) / series_uid


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
    names = [p.name for p in files if _PNG_RE.match(p.name)]
    if not names:
        names = [p.name for p in files if _DCM_RE.match(p.name) and _is_secondary_capture(p)][:24]
    return sorted(names, key=lambda n: (0 if "summary" in n.lower() else 1, n))


def image_path(cfg: NodeConfig, series_uid: str, name: str) -> Path | None:
    """The file behind an image URL, after checking UID and name (no path built from raw input)."""
    folder = output_dir(cfg, series_uid)
    if folder is None or not (_PNG_RE.match(name) or _DCM_RE.match(name)):
        return None
    path = folder / name
    return path if path.is_file() else None


def secondary_capture_png(path: Path) -> bytes | None:
    """A Secondary Capture's pixels as PNG bytes (RGB or 8-bit grey), or ``None`` when not renderable."""
    try:
        import io

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


def export_destinations(session: Session, job_ids: list[int]) -> dict[int, str]:
    """Destination of each export job from its payload (``destination``/``name``/``ae_title``)."""
    if not job_ids:
        return {}
    out: dict[int, str] = {}
    for job_id, payload in session.execute(select(Job.id, Job.payload).where(Job.id.in_(job_ids))):
        data = _json(payload, {})
        if data.get("type") == "webhook":
            out[job_id] = "webhook"
            continue
        dest = data.get("destination") or data.get("destination_name") or data.get("name") or data.get("ae_title")
        if isinstance(dest, dict):
            dest = dest.get("name") or dest.get("ae_title")
        out[job_id] = str(dest) if dest else "(default)"
    return out


def study_page(session: Session, cfg: NodeConfig, study_id: int) -> StudyPage | None:
    study = session.get(Study, study_id)
    if study is None:
        return None
    uid = study.study_instance_uid
    series = list(session.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.series_number, Series.id)))
    rejections = list(session.scalars(
        select(Rejection).where(Rejection.study_instance_uid == uid).order_by(Rejection.id.desc()).limit(100)
    ))
    results = list(session.scalars(
        select(TriageResult).where(TriageResult.study_instance_uid == uid)
        .order_by(TriageResult.created_at.desc(), TriageResult.id.desc())
    ))
    result = results[0] if results else None
    data: dict[str, Any] = _json(result.result_json, {}) if result is not None else {}
    labels_stored: dict[str, Any] = _json(result.labels, {}) if result is not None else {}
    probs: dict[str, Any] = _json(result.probabilities, {}) if result is not None else {}
    label_values: dict[str, Any] = {**_dict(data.get("labels")), **labels_stored}
    prob_values: dict[str, Any] = {**_dict(data.get("probabilities")), **probs}
    window_probs = [w for w in (_num(x) for x in data.get("window_probabilities") or []) if w is not None]
    if WINDOW_LABEL not in prob_values and window_probs:
        prob_values[WINDOW_LABEL] = max(window_probs)
    thresholds = _dict(data.get("thresholds"))
    attention = _dict(data.get("attention"))
    changed = set()
    consistency = data.get("consistency")
    if isinstance(consistency, dict) and isinstance(consistency.get("changed"), list):
        changed = {str(c) for c in consistency["changed"]}
    keys = [k for k in LABEL_ORDER if k in label_values or k in prob_values]
    keys += sorted(k for k in set(label_values) | set(prob_values) if k not in keys)
    lines = []
    for k in keys:
        att = attention.get(k)
        per_window_probability = False
        if k == WINDOW_LABEL and not att:
            att, per_window_probability = window_probs, True
        lines.append(LabelLine(
            label=k,
            name=label_name(k),
            probability=_num(prob_values.get(k)),
            threshold=_num(thresholds.get(k)),
            value=label_values.get(k) if isinstance(label_values.get(k), bool) else None,
            changed=k in changed,
            attention=[float(a) for a in att if _num(a) is not None] if isinstance(att, list) else [],
            strip_is_probability=per_window_probability,
        ))
    positive, findings = main_findings(label_values) if result is not None else (None, [])

    series_uids = {s.series_instance_uid for s in series}
    infer = [j for uid_ in series_uids for j in list_jobs(session, kind=JobKind.infer, series_instance_uid=uid_)]
    infer.sort(key=lambda j: j.id, reverse=True)
    exports_by_id: dict[int, JobView] = {}
    for uid_ in series_uids:
        for j in list_jobs(session, kind=JobKind.export, series_instance_uid=uid_):
            exports_by_id[j.id] = j
    for j in list_jobs(session, kind=JobKind.export, limit=2000):
        if j.study_instance_uid == uid:
            exports_by_id[j.id] = j
    exports = sorted(exports_by_id.values(), key=lambda j: j.id, reverse=True)
    dests = export_destinations(session, [j.id for j in exports])
    # Newest job per destination is its status; resend allowed when not already active.
    latest: dict[str, JobView] = {}
    for j in exports:
        latest.setdefault(dests.get(j.id, "(default)"), j)
    export_lines = [
        ExportLine(j, d, j.state not in (JobState.queued, JobState.running)) for d, j in sorted(latest.items())
    ]
    image_uid = result.series_instance_uid if result is not None else None
    return StudyPage(
        study=study,
        series=series,
        rejections=rejections,
        result=result,
        result_data=data,
        labels=lines,
        positive=positive,
        findings=findings,
        images=output_images(cfg, image_uid) if image_uid else [],
        image_series_uid=image_uid,
        infer_jobs=[(j, job_history(session, j.id)) for j in infer[:5]],
        exports=export_lines,
        export_history=[(j, job_history(session, j.id)) for j in exports[:10]],
        older_results=results[1:],
    )


def export_job_for_study(session: Session, study: Study, job_id: int) -> tuple[JobView, str, dict[str, Any]] | None:
    """The export job ``job_id`` if it belongs to ``study``, with its destination and payload."""
    from pe_triage_node.queue import get_job

    job = get_job(session, job_id)
    if job is None or job.kind != JobKind.export:
        return None
    series_uids = set(session.scalars(select(Series.series_instance_uid).where(Series.study_id == study.id)))
    if job.study_instance_uid != study.study_instance_uid and job.series_instance_uid not in series_uids:
        return None
    payload = _json(session.scalar(select(Job.payload).where(Job.id == job_id)), {})
    return job, export_destinations(session, [job_id]).get(job_id, "(default)"), payload


# -- operations ---------------------------------------------------------------


@dataclass
class OpsPage:
    counts: dict[JobKind, dict[JobState, int]]
    oldest_queued: dict[JobKind, str]
    running: list[JobView]
    dead: list[JobView]
    associations: list[Association]
    rejections: list[Rejection]
    spool_total: int | None
    spool_free: int | None
    spool_path: Path
    model_version: str | None
    model_name: str | None
    device: str | None
    manifest: dict[str, Any]


def disk_usage(path: Path) -> tuple[int, int] | None:
    """(total, free) bytes of the file system holding ``path`` (or its nearest existing parent)."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return None
    return usage.total, usage.free


def manifest_path(cfg: NodeConfig) -> Path:
    return cfg.inference.weights_manifest or (Path.cwd() / "models" / "demo" / "manifest.json")


def read_manifest_cheaply(cfg: NodeConfig) -> tuple[dict[str, Any] | None, str]:
    """The weights manifest as JSON, checked without loading torch: (data, problem or "")."""
    path = manifest_path(cfg)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"weights manifest not found: {path}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"weights manifest unreadable: {exc}"
    if not isinstance(data, dict) or not data.get("model_version") or not isinstance(data.get("files"), list):
        return None, "weights manifest lacks model_version or files"
    for entry in data["files"]:
        rel = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(rel, str) or not (path.parent / rel).is_file():
            return None, f"weights file missing: {rel!r}"
    return data, ""


def ops_page(session: Session, cfg: NodeConfig) -> OpsPage:
    now = dt.datetime.now(dt.timezone.utc)
    oldest: dict[JobKind, str] = {}
    for kind in JobKind:
        queued = list_jobs(session, kind=kind, states=[JobState.queued], limit=10_000)
        if queued:
            first = min(j.created_at for j in queued)
            oldest[kind] = _duration((now - first).total_seconds())
    latest = session.scalars(select(TriageResult).order_by(TriageResult.id.desc()).limit(1)).first()
    latest_data = _json(latest.result_json, {}) if latest is not None else {}
    manifest, _problem = read_manifest_cheaply(cfg)
    usage = disk_usage(cfg.spool_dir)
    return OpsPage(
        counts=queue_counts(session),
        oldest_queued=oldest,
        running=list_jobs(session, states=[JobState.running], limit=200),
        dead=list_jobs(session, states=[JobState.dead], limit=20),
        associations=list(session.scalars(select(Association).order_by(Association.started_at.desc()).limit(20))),
        rejections=list(session.scalars(select(Rejection).order_by(Rejection.id.desc()).limit(20))),
        spool_total=usage[0] if usage else None,
        spool_free=usage[1] if usage else None,
        spool_path=cfg.spool_dir,
        model_version=(manifest or {}).get("model_version") or (latest.model_version if latest else None),
        model_name=(manifest or {}).get("model_name") or latest_data.get("model_name"),
        device=latest_data.get("device") or cfg.inference.device,
        manifest=manifest or {},
    )


def counts_for_metrics(session: Session) -> dict[str, Any]:
    """Raw counts the /metrics collector exposes (computed at scrape time)."""
    series_by_state = {str(s.value if hasattr(s, "value") else s): int(n) for s, n in session.execute(
        select(Series.state, func.count()).group_by(Series.state)
    )}
    return {
        "instances": int(session.scalar(select(func.count()).select_from(Instance)) or 0),
        "studies": int(session.scalar(select(func.count()).select_from(Study)) or 0),
        "series_by_state": series_by_state,
        "series_completed": int(session.scalar(select(func.count()).select_from(Series).where(Series.completed_at.is_not(None))) or 0),
        "rejections_by_stage": {str(st): int(n) for st, n in session.execute(
            select(Rejection.stage, func.count()).group_by(Rejection.stage)
        )},
        "jobs": queue_counts(session),
        "results_by_priority": {str(p): int(n) for p, n in session.execute(
            select(TriageResult.priority, func.count()).group_by(TriageResult.priority)
        )},
    }
