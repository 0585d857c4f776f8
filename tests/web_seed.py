"""Seed data for the web console tests: users, studies, results (as the worker stores them), jobs, PNGs.

Synthetic patients only. ``seed(engine, var_dir)`` returns the ids the tests need.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from pe_triage_node.db.models import (
    Association,
    Job,
    JobEvent,
    JobKind,
    JobState,
    Rejection,
    Series,
    SeriesState,
    Study,
    TriageResult,
)
from pe_triage_node.web.auth import add_user

ADMIN = ("alice", "correct horse battery")
VIEWER = ("victor", "viewer password 1")
THRESHOLDS = {
    "pe_present_on_image": 0.15, "negative_exam_for_pe": 0.80, "indeterminate": 0.05, "chronic_pe": 0.05,
    "acute_and_chronic_pe": 0.05, "central_pe": 0.05, "leftsided_pe": 0.15, "rightsided_pe": 0.15,
    "rv_lv_ratio_gte_1": 0.15, "rv_lv_ratio_lt_1": 0.15,
}
STUDY_LABELS = [k for k in THRESHOLDS if k != "pe_present_on_image"]
FAILED_REASON = "RuntimeError: the model ran out of memory"
REFUSED_REASON = "not a contrast-enhanced CTPA: ContrastBolusAgent empty, pulmonary trunk at 41 HU"


@dataclass
class Seeded:
    stat_id: int
    urgent_id: int
    routine_id: int
    queued_id: int
    rejected_id: int
    failed_id: int
    refused_id: int
    export_dead_job: int
    export_ok_job: int
    stat_series_uid: str
    image_name: str


def gradcam_png(path: Path, seed: int = 0, size: int = 192) -> None:
    """A CT-like slice (grey ellipse, two dark lungs) with a red/yellow heat blob, as an RGB PNG."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = ((x - 0.5) / 0.45) ** 2 + ((y - 0.5) / 0.36) ** 2 < 1
    lungs = (((x - 0.32) / 0.14) ** 2 + ((y - 0.48) / 0.22) ** 2 < 1) | (((x - 0.68) / 0.14) ** 2 + ((y - 0.48) / 0.22) ** 2 < 1)
    grey = np.where(body, 0.55, 0.0) - np.where(lungs, 0.45, 0.0) + rng.normal(0, 0.03, (size, size))
    grey = np.clip(grey, 0, 1)
    heat = np.exp(-(((x - 0.44) / 0.08) ** 2 + ((y - 0.40) / 0.07) ** 2))
    rgb = np.stack([grey, grey, grey], axis=-1)
    alpha = (heat * 0.8)[..., None]
    colour = np.stack([np.ones_like(heat), heat, np.zeros_like(heat)], axis=-1)  # red → yellow
    out = (rgb * (1 - alpha) + colour * alpha) * 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(out.astype(np.uint8), "RGB").save(path)


def _result_json(study_uid: str, series_uid: str, probs: dict[str, float], labels: dict[str, bool],
                 windows: list[float], total_s: float) -> str:
    n = len(windows)
    peak = int(np.argmax(windows)) if windows else 0
    attention = {}
    for i, label in enumerate(STUDY_LABELS):
        w = np.exp(-((np.arange(n) - (peak + (i % 3) - 1)) ** 2) / 6.0) + 0.02
        attention[label] = [round(float(v), 4) for v in (w / w.sum())]
    data: dict[str, Any] = {
        "model_name": "pe-tcn-attention", "model_version": "2026.1-test", "intended_use": "test",
        "meaningless": False, "series_instance_uid": series_uid, "study_instance_uid": study_uid,
        "probabilities": probs, "window_probabilities": windows, "phase1_window_probabilities": windows,
        "labels": labels, "window_labels": [w >= 0.15 for w in windows], "consistency": {"changed": []},
        "thresholds": THRESHOLDS, "attention": attention,
        "gradcam": [{"window": peak, "labels": ["pe_present_on_image"], "peak_value": 0.93, "peak_slice_in_window": 4,
                     "source_slice_index": peak * 10 + 4, "sop_instance_uid": f"{series_uid}.{peak * 10 + 4}",
                     "instance_number": peak * 10 + 5, "peak_row": 80.0, "peak_column": 85.0,
                     "window_source_slices": [peak * 10, peak * 10 + 9]}],
        "windows": [], "lung_crop_method": "threshold", "crop": {}, "geometry": {}, "device": "cpu",
        "precision": "fp32", "timings_s": {"load": 1.5, "infer": total_s - 1.5, "total": total_s},
        "disclaimer": "NOT FOR DIAGNOSTIC USE", "format": "pe-triage-result/1",
    }
    return json.dumps(data)


def _study(s: Session, n: int, name: str, pid: str, acc: str, desc: str, received: dt.datetime) -> Study:
    st = Study(study_instance_uid=f"1.2.826.0.1.3680043.10.1.{n}", patient_id=pid, patient_name=name,
               patient_sex="F" if n % 2 else "M", patient_age=f"0{40 + n}Y", accession_number=acc,
               study_description=desc, first_received_at=received, last_received_at=received + dt.timedelta(minutes=1))
    s.add(st)
    s.flush()
    return st


def _series(s: Session, st: Study, n: int, state: SeriesState, received: dt.datetime, reason: str | None = None,
            desc: str = "CTPA 1.0 Br36") -> Series:
    se = Series(study_id=st.id, series_instance_uid=f"{st.study_instance_uid}.{n}", modality="CT", series_number=n,
                series_description=desc, convolution_kernel="Br36", slice_thickness=1.0, state=state,
                state_reason=reason, instance_count=300 if state != SeriesState.rejected else 2,
                first_received_at=received, last_received_at=received + dt.timedelta(minutes=1),
                completed_at=received + dt.timedelta(minutes=2))
    s.add(se)
    s.flush()
    return se


def _job(s: Session, kind: JobKind, state: JobState, se: Series, created: dt.datetime, *, payload: dict[str, Any] | None = None,
         error: str | None = None, events: tuple[str, ...] = ("queued",), attempts: int = 0, max_attempts: int = 3,
         worker: str | None = None) -> Job:
    job = Job(kind=kind, state=state, priority=100, study_instance_uid=se.study.study_instance_uid,
              series_instance_uid=se.series_instance_uid, payload=json.dumps(payload or {}),
              dedupe_key=f"{kind.value}:{se.series_instance_uid}:{(payload or {}).get('destination', '')}",
              attempts=attempts, max_attempts=max_attempts, not_before=created, claimed_by=worker,
              heartbeat_at=created + dt.timedelta(seconds=5) if state == JobState.running else None,
              last_error=error, created_at=created, updated_at=created,
              finished_at=created + dt.timedelta(seconds=30) if state in (JobState.succeeded, JobState.dead) else None)
    s.add(job)
    s.flush()
    for i, ev in enumerate(events):
        s.add(JobEvent(job_id=job.id, at=created + dt.timedelta(seconds=i * 10), event=ev, worker=worker, detail=None))
    return job


def _result(s: Session, se: Series, job: Job | None, priority: str, rule: str | None, probs: dict[str, float],
            labels: dict[str, bool], windows: list[float], at: dt.datetime, flags: list[str] | None = None) -> TriageResult:
    attrs = {"Modality": "CT", "StudyDescription": se.study.study_description or "", "PatientAge": se.study.patient_age or ""}
    r = TriageResult(study_instance_uid=se.study.study_instance_uid, series_instance_uid=se.series_instance_uid,
                     job_id=job.id if job else None, model_version="2026.1-test", labels=json.dumps(labels),
                     probabilities=json.dumps(probs), attributes=json.dumps(attrs), priority=priority, rule_name=rule,
                     flags=json.dumps(flags or []), explanation=f'rule → {priority}' if rule else "no rule matched",
                     result_json=_result_json(se.study.study_instance_uid, se.series_instance_uid, probs, labels, windows,
                                              total_s=14.0), created_at=at)
    s.add(r)
    s.flush()
    return r


def _labels(**set_: bool) -> dict[str, bool]:
    base = {k: False for k in STUDY_LABELS}
    base.update(set_)
    return base


def seed(engine: Engine, var_dir: Path, now: dt.datetime | None = None) -> Seeded:
    now = now or dt.datetime.now(dt.timezone.utc)
    t = lambda minutes: now - dt.timedelta(minutes=minutes)  # noqa: E731
    with Session(engine) as s, s.begin():
        add_user(s, ADMIN[0], ADMIN[1], "admin")
        add_user(s, VIEWER[0], VIEWER[1], "viewer")
        s.add(Association(id="a" * 32, calling_ae="CT_SCANNER_1", called_ae="PETRIAGE", peer_address="10.0.0.5",
                          receiver_pid=1234, started_at=t(90), released_at=t(89), outcome="released",
                          instances_stored=300))

        # ROUTINE, oldest
        st = _study(s, 1, "NEGATIVE^NORA", "P0001", "A1001", "CT ANGIO CHEST", t(180))
        se = _series(s, st, 2, SeriesState.selected, t(180))
        j = _job(s, JobKind.infer, JobState.succeeded, se, t(178), events=("queued", "claimed", "succeeded"), attempts=1, worker="worker@gpu0")
        _result(s, se, j, "ROUTINE", None,
                {"negative_exam_for_pe": 0.93, "indeterminate": 0.01, "chronic_pe": 0.01, "acute_and_chronic_pe": 0.01,
                 "central_pe": 0.01, "leftsided_pe": 0.03, "rightsided_pe": 0.04, "rv_lv_ratio_gte_1": 0.02, "rv_lv_ratio_lt_1": 0.05},
                {**_labels(negative_exam_for_pe=True), "pe_present_on_image": False}, [0.02, 0.03, 0.05, 0.04, 0.02, 0.01], t(175))
        routine = st

        # URGENT
        st = _study(s, 2, "RIGHT^ROBERT", "P0002", "A1002", "CTPA", t(120))
        se = _series(s, st, 3, SeriesState.selected, t(120))
        j = _job(s, JobKind.infer, JobState.succeeded, se, t(118), events=("queued", "claimed", "succeeded"), attempts=1, worker="worker@gpu0")
        _result(s, se, j, "URGENT", "Any PE",
                {"negative_exam_for_pe": 0.08, "indeterminate": 0.01, "chronic_pe": 0.02, "acute_and_chronic_pe": 0.03,
                 "central_pe": 0.03, "leftsided_pe": 0.10, "rightsided_pe": 0.81, "rv_lv_ratio_gte_1": 0.09, "rv_lv_ratio_lt_1": 0.77},
                {**_labels(rightsided_pe=True, rv_lv_ratio_lt_1=True), "pe_present_on_image": True},
                [0.05, 0.20, 0.72, 0.81, 0.30, 0.06], t(115))
        urgent = st

        # STAT, the newest arrival: must still top the list
        st = _study(s, 3, "DOE^JANE", "P0003", "A1003", "CT ANGIO PULMONARY ED", t(20))
        se = _series(s, st, 4, SeriesState.selected, t(20))
        _series(s, st, 1, SeriesState.rejected, t(20), reason="series description matches the exclusion (scout)",
                desc="Topogram 0.6 T20f")
        s.add(Rejection(stage="selection", study_instance_uid=st.study_instance_uid,
                        series_instance_uid=f"{st.study_instance_uid}.1", reason="series description matches the exclusion (scout)",
                        created_at=t(19)))
        j = _job(s, JobKind.infer, JobState.succeeded, se, t(18), events=("queued", "claimed", "succeeded"), attempts=1, worker="worker@gpu0")
        _result(s, se, j, "STAT", "Central PE",
                {"negative_exam_for_pe": 0.02, "indeterminate": 0.01, "chronic_pe": 0.03, "acute_and_chronic_pe": 0.04,
                 "central_pe": 0.88, "leftsided_pe": 0.79, "rightsided_pe": 0.91, "rv_lv_ratio_gte_1": 0.71, "rv_lv_ratio_lt_1": 0.12},
                {**_labels(central_pe=True, leftsided_pe=True, rightsided_pe=True, rv_lv_ratio_gte_1=True), "pe_present_on_image": True},
                [0.10, 0.45, 0.97, 0.95, 0.60, 0.20, 0.05], t(16))
        dead = _job(s, JobKind.export, JobState.dead, se, t(15), payload={"destination": "PACS_MAIN"},
                    error="association rejected by PACS_MAIN (0x0122)", events=("queued", "claimed", "failed", "dead"), attempts=3)
        ok = _job(s, JobKind.export, JobState.succeeded, se, t(15), payload={"destination": "ARCHIVE"},
                  events=("queued", "claimed", "succeeded"), attempts=1, worker="exporter@node")
        stat = st
        stat_series = se.series_instance_uid

        # Queued (in analysis)
        st = _study(s, 4, "WAIT^WALTER", "P0004", "A1004", "CTPA", t(5))
        se = _series(s, st, 2, SeriesState.selected, t(5))
        _job(s, JobKind.infer, JobState.running, se, t(4), events=("queued", "claimed"), attempts=1, worker="worker@gpu0")
        queued = st

        # Rejected only
        st = _study(s, 5, "SCOUT^SAM", "P0005", "A1005", "CT HEAD", t(60))
        _series(s, st, 1, SeriesState.rejected, t(60), reason="no series is a CTPA: modality/slices", desc="Head 5mm")
        s.add(Rejection(stage="selection", study_instance_uid=st.study_instance_uid, reason="no CTPA series in the study",
                        created_at=t(59)))
        rejected = st

        # Failed: the analysis was dead-lettered after its attempts
        st = _study(s, 6, "FAIL^FRED", "P0006", "A1006", "CTPA", t(40))
        se = _series(s, st, 2, SeriesState.selected, t(40))
        _job(s, JobKind.infer, JobState.dead, se, t(39), error=FAILED_REASON,
             events=("queued", "claimed", "failed", "claimed", "failed", "claimed", "dead"), attempts=3, worker="worker@gpu0")
        failed = st

        # Refused by the inference stage: a series that is not a contrast-enhanced CTPA (job dead, not retried)
        st = _study(s, 7, "PLAIN^PAULA", "P0007", "A1007", "CT CHEST", t(30))
        se = _series(s, st, 3, SeriesState.rejected, t(30), reason=f"refused by the inference stage: {REFUSED_REASON}",
                     desc="Thorax 1.0 Br40")
        s.add(Rejection(stage="inference", study_instance_uid=st.study_instance_uid,
                        series_instance_uid=se.series_instance_uid, reason=REFUSED_REASON, created_at=t(28)))
        _job(s, JobKind.infer, JobState.dead, se, t(29), error=f"volume rejected: {REFUSED_REASON}",
             events=("queued", "claimed", "dead"), attempts=1, worker="worker@gpu0")
        refused = st
        ids = Seeded(stat.id, urgent.id, routine.id, queued.id, rejected.id, failed.id, refused.id, dead.id, ok.id,
                     stat_series, "gradcam_w02.png")
    gradcam_png(var_dir / "outputs" / stat_series / ids.image_name, seed=3)
    gradcam_png(var_dir / "outputs" / stat_series / "summary.png", seed=4)
    return ids


def manifest(folder: Path) -> Path:
    """A minimal weights manifest with its files present (readiness only checks cheaply)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("phase1.safetensors", "phase2.safetensors"):
        (folder / name).write_bytes(b"\0")
    path = folder / "manifest.json"
    path.write_text(json.dumps({"format": "pe-triage-weights/1", "model_name": "pe-tcn-attention",
                                "model_version": "2026.1-test",
                                "files": [{"role": "phase1", "path": "phase1.safetensors"},
                                          {"role": "phase2", "path": "phase2.safetensors"}]}))
    return path
