"""Evaluation of a PE model: AUROC with DeLong intervals, thresholds, ROC plots, and ``pe-triage evaluate``.

Metrics (pure numpy, no scikit-learn):

* :func:`delong_auroc` — the area under the ROC curve (Mann-Whitney, ties
  count one half) and its variance by DeLong, DeLong & Clarke-Pearson (1988),
  computed with midranks as in Sun & Xu (2014); :func:`auroc_ci` gives the
  95 % interval AUC ± 1.96 SE clipped to [0, 1].
* :func:`choose_threshold` — the threshold that maximises Youden's J
  (sensitivity + specificity - 1) on the validation split; a finding is
  positive when its probability is *above* the threshold (as the engine decides).
* :func:`sensitivity_specificity`, :func:`roc_points`, :func:`write_roc_png`.

``pe-triage evaluate DATA_DIR --json OUT`` runs the node's own
:class:`~pe_triage_node.inference.engine.InferenceEngine` over an
RSPECT-format folder (``<split>.csv`` + ``<split>/<study>/<series>/*.dcm``,
the Kaggle layout and the phantoms'), compares the window probabilities with
window labels derived from the per-slice ``pe_present_on_image`` (a window is
positive when any source slice it covers is) and the study probabilities with
the CSV's study labels, and writes the report. When ``phantoms.json`` is
present, studies whose emboli are all subsegmental are also reported alone. When the
set ships embolus masks (``<split>_masks/``, as the phantoms do), the pointing game is
reported for its positive studies (:func:`pointing_game`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pe_triage_node.inference.labels import (  # no torch import
    STUDY_LABELS,
    WINDOW_LABEL,
)
from pe_triage_node.rspect import (
    RspectStudy,
    read_embolus_mask,
    read_rspect,
    subsegmental_only_studies,
)

log = logging.getLogger(__name__)

REPORT_FORMAT = "pe-triage-evaluation/1"

Z95 = 1.959963984540054


# --------------------------------------------------------------------------- metrics


def _midranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x`` with ties given their mean rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    n = len(x)
    ranks_sorted = np.empty(n, dtype=np.float64)
    i = 0
    while i < n:
        j = i
        while j < n and xs[j] == xs[i]:
            j += 1
        ranks_sorted[i:j] = 0.5 * (i + j - 1) + 1.0
        i = j
    out = np.empty(n, dtype=np.float64)
    out[order] = ranks_sorted
    return out


def delong_auroc(y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """AUROC and its DeLong variance; ``(nan, nan)`` when one class is absent.

    With m positives X and n negatives Y, psi(x, y) = 1 if x > y, 1/2 if equal,
    0 otherwise; AUC = mean psi; V10_i = mean_j psi(X_i, Y_j), V01_j = mean_i psi(X_i, Y_j);
    Var = var(V10)/m + var(V01)/n (sample variances, ddof 1).
    """
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    pos, neg = s[y], s[~y]
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        return float("nan"), float("nan")
    tx, ty, tz = _midranks(pos), _midranks(neg), _midranks(np.concatenate([pos, neg]))
    auc = float((tz[:m].sum() - m * (m + 1) / 2.0) / (m * n))
    v10 = (tz[:m] - tx) / n  # per positive: share of negatives it beats
    v01 = 1.0 - (tz[m:] - ty) / m  # per negative: share of positives that beat it
    s10 = float(np.var(v10, ddof=1)) if m > 1 else 0.0
    s01 = float(np.var(v01, ddof=1)) if n > 1 else 0.0
    return auc, s10 / m + s01 / n


def auroc_ci(y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, z: float = Z95) -> tuple[float, float, float]:
    """AUROC with its 95 % DeLong interval ``(auc, low, high)``, clipped to [0, 1]."""
    auc, var = delong_auroc(y_true, scores)
    if math.isnan(auc):
        return auc, float("nan"), float("nan")
    half = z * math.sqrt(max(var, 0.0))
    return auc, max(0.0, auc - half), min(1.0, auc + half)


def roc_points(y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr, thresholds)`` from (0, 0) to (1, 1); point k: positive when score >= thresholds[k]."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1] if len(s) else np.array([], dtype=int)
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    p, n = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fps / n], np.r_[0.0, tps / p], np.r_[np.inf, s[distinct]]


def sensitivity_specificity(y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float) -> dict[str, Any]:
    """Counts, sensitivity and specificity when ``score > threshold`` is called positive."""
    y = np.asarray(y_true).astype(bool).ravel()
    pred = np.asarray(scores, dtype=np.float64).ravel() > threshold
    tp, fn = int((pred & y).sum()), int((~pred & y).sum())
    tn, fp = int((~pred & ~y).sum()), int((pred & ~y).sum())
    return {
        "threshold": float(threshold),
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def choose_threshold(
    y_true: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    *,
    fallback: float,
    lo: float = 0.01,
    hi: float = 0.99,
) -> float:
    """Threshold maximising Youden's J on a validation split (``score > t`` positive).

    Candidates lie midway between consecutive distinct scores, so the rule does
    not sit on a validation score; ties in J go to the candidate nearest 0.5.
    Without both classes the ``fallback`` (e.g. MODEL.md Table 2) is returned.
    The result is clipped to [lo, hi] (the manifest needs 0 < t < 1).
    """
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.all() or not y.any():
        return float(fallback)
    u = np.unique(s)
    cands = np.r_[u[0] - 1e-6, (u[:-1] + u[1:]) / 2.0] if len(u) > 1 else np.array([u[0] - 1e-6])
    p, n = y.sum(), (~y).sum()
    best_t, best_j = float(fallback), -np.inf
    for t in cands:
        pred = s > t
        j = (pred & y).sum() / p + (~pred & ~y).sum() / n - 1.0
        if j > best_j + 1e-12 or (abs(j - best_j) <= 1e-12 and abs(t - 0.5) < abs(best_t - 0.5)):
            best_t, best_j = float(t), float(j)
    return float(min(hi, max(lo, best_t)))


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float | None, float | None]:
    """Wilson score interval of a proportion k/n; ``(None, None)`` for n = 0."""
    if n == 0:
        return None, None
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def label_metrics(y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float) -> dict[str, Any]:
    """AUROC + 95 % DeLong interval + sensitivity/specificity at ``threshold`` for one label."""
    y = np.asarray(y_true).astype(bool).ravel()
    auc, lo, hi = auroc_ci(y, scores)
    out: dict[str, Any] = {
        "auroc": None if math.isnan(auc) else round(auc, 4),
        "ci95": None if math.isnan(auc) else [round(lo, 4), round(hi, 4)],
        "n_positive": int(y.sum()),
        "n_negative": int((~y).sum()),
    }
    out.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in sensitivity_specificity(y, scores, threshold).items()})
    return out


# --------------------------------------------------------------------------- ROC plot (Pillow only)


def write_roc_png(path: Path, y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, title: str, threshold: float | None = None) -> Path:
    """Draw one ROC curve (with the chance diagonal and the operating point) as a 480 x 480 PNG."""
    from PIL import Image, ImageDraw

    fpr, tpr, thr = roc_points(y_true, scores)
    auc, lo, hi = auroc_ci(y_true, scores)
    size, m = 480, 60
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    w = size - 2 * m

    def xy(fx: float, fy: float) -> tuple[float, float]:
        return m + fx * w, size - m - fy * w

    d.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    for k in range(1, 5):
        v = k / 5
        d.line([xy(v, 0), xy(v, 1)], fill=(225, 225, 225))
        d.line([xy(0, v), xy(1, v)], fill=(225, 225, 225))
        d.text((xy(v, 0)[0] - 8, size - m + 6), f"{v:.1f}", fill="black")
        d.text((m - 28, xy(0, v)[1] - 5), f"{v:.1f}", fill="black")
    d.line([xy(0, 0), xy(1, 1)], fill=(160, 160, 160))
    d.line([xy(float(a), float(b)) for a, b in zip(fpr, tpr)], fill=(200, 30, 30), width=2)
    if threshold is not None and len(thr) > 1:
        ss = sensitivity_specificity(y_true, scores, threshold)
        if ss["sensitivity"] is not None and ss["specificity"] is not None:
            px, py = xy(1 - ss["specificity"], ss["sensitivity"])
            d.ellipse([px - 4, py - 4, px + 4, py + 4], outline=(20, 20, 180), width=2)
    d.text((m, 12), title, fill="black")
    sub = "AUROC n/a (one class only)" if math.isnan(auc) else f"AUROC {auc:.3f} (95% CI {lo:.3f}-{hi:.3f}, DeLong)"
    d.text((m, 30), sub, fill="black")
    d.text((size // 2 - 60, size - 22), "1 - specificity", fill="black")
    d.text((4, m - 16), "sensitivity", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


# --------------------------------------------------------------------------- predictions -> report


@dataclass
class StudyPrediction:
    """One study's model outputs next to its reference labels."""

    study_instance_uid: str
    series_instance_uid: str
    probabilities: dict[str, float]  # nine study labels
    targets: dict[str, int]  # nine study labels
    window_probabilities: list[float]
    window_targets: list[int]
    phase1_window_probabilities: list[float] = field(default_factory=list)
    labels: dict[str, bool] | None = None  # consistent labels from the engine, when run through it
    subsegmental_only: bool = False
    pointing: dict[str, Any] | None = None  # positive studies with a mask: see :func:`pointing_hit`


def build_report(
    predictions: Sequence[StudyPrediction],
    thresholds: Mapping[str, float],
    *,
    roc_dir: Path | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The evaluation report: per-label AUROC with DeLong 95 % intervals and sensitivity/specificity
    at ``thresholds``; window level over all windows of all studies; subsegmental-only studies apart."""
    metrics: dict[str, Any] = {}
    roc: dict[str, str] = {}
    wy = np.array([t for p in predictions for t in p.window_targets], dtype=int)
    ws = np.array([s for p in predictions for s in p.window_probabilities], dtype=np.float64)
    metrics[WINDOW_LABEL] = {"level": "window", **label_metrics(wy, ws, thresholds[WINDOW_LABEL])}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {WINDOW_LABEL: (wy, ws)}
    for k in STUDY_LABELS:
        y = np.array([p.targets[k] for p in predictions], dtype=int)
        s = np.array([p.probabilities[k] for p in predictions], dtype=np.float64)
        metrics[k] = {"level": "study", **label_metrics(y, s, thresholds[k])}
        curves[k] = (y, s)
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "n_studies": len(predictions),
        "n_windows": int(len(wy)),
        "thresholds": {k: float(v) for k, v in thresholds.items()},
        "metrics": metrics,
    }
    p1 = [p for p in predictions if len(p.phase1_window_probabilities) == len(p.window_targets)]
    if p1:
        y1 = np.array([t for p in p1 for t in p.window_targets], dtype=int)
        s1 = np.array([s for p in p1 for s in p.phase1_window_probabilities], dtype=np.float64)
        report["phase1_window"] = label_metrics(y1, s1, thresholds[WINDOW_LABEL])
    # Study-level PE detection: any window above threshold (the engine's consistent pe_present when available).
    study_pos = np.array([1 - p.targets["negative_exam_for_pe"] - p.targets["indeterminate"] > 0 for p in predictions], dtype=bool)
    called = np.array([_called_positive(p, thresholds) for p in predictions], dtype=bool)
    report["study_pe_detection"] = _detection(study_pos, called)
    if any(p.labels is not None for p in predictions):
        report["consistent_labels"] = {
            k: sensitivity_specificity([p.targets[k] for p in predictions], [float(bool(p.labels and p.labels.get(k))) for p in predictions], 0.5)
            for k in STUDY_LABELS
        }
    report["subsegmental_only"] = _subsegmental(predictions, thresholds, called)
    report["pointing_game"] = pointing_game(predictions)
    if roc_dir is not None:
        for k, (y, s) in curves.items():
            roc[k] = str(write_roc_png(Path(roc_dir) / f"roc_{k}.png", y, s, f"{k} ({metrics[k]['level']} level)", thresholds[k]))
        report["roc_png"] = roc
    if extra:
        report.update(extra)
    return report


POINTING_RADIUS_MM = 10.0


def pointing_hit(mask_zyx: np.ndarray, spacing: tuple[float, float, float], positions_mm: Sequence[float], peak: tuple[int, float, float] | None) -> dict[str, Any]:
    """Does a Grad-CAM peak (slice index, row, column) lie within :data:`POINTING_RADIUS_MM` of an embolus voxel?

    ``mask_zyx`` is the embolus mask in the volume's slice order and each plane's stored pixel
    grid (the grid the engine's peaks are given in); distances in mm from the slice positions
    and the in-plane spacing. ``peak`` ``None``: the engine showed no map (a miss).
    """
    if peak is None:
        return {"has_map": False, "hit": False, "distance_mm": None}
    kk, rr, cc = np.nonzero(mask_zyx)
    z, row, col = peak
    pos = np.asarray(positions_mm, dtype=np.float64)
    d = np.sqrt(((pos[kk] - pos[z]) ** 2) + ((rr - row) * spacing[1]) ** 2 + ((cc - col) * spacing[2]) ** 2)
    dist = float(d.min())
    return {"has_map": True, "hit": dist <= POINTING_RADIUS_MM, "distance_mm": round(dist, 1)}


def pointing_game(predictions: Sequence[StudyPrediction]) -> dict[str, Any]:
    """The pointing game over positive studies with embolus masks: share whose Grad-CAM peak is within 10 mm of
    an embolus voxel. A study the engine called negative shows no map and counts as a miss; the share among
    studies with a map is given too."""
    rec = [p.pointing for p in predictions if p.pointing is not None]
    n = len(rec)
    out: dict[str, Any] = {
        "radius_mm": POINTING_RADIUS_MM,
        "rule": "peak of the Grad-CAM secondary capture of the top window (pe_present_on_image's, else the first finding's) within 10 mm of an embolus voxel",
        "n_studies": n,
    }
    if n == 0:
        out["note"] = "no positive study with an embolus mask (<split>_masks/) in this set"
        return out
    hits = sum(bool(r["hit"]) for r in rec)
    mapped = [r for r in rec if r["has_map"]]
    lo, hi = wilson_interval(hits, n)
    out.update(hits=hits, fraction=hits / n, ci95=[lo, hi], n_with_map=len(mapped))
    if mapped:
        mh = sum(bool(r["hit"]) for r in mapped)
        mlo, mhi = wilson_interval(mh, len(mapped))
        dists = [float(r["distance_mm"]) for r in mapped]
        out.update(hits_with_map=mh, fraction_with_map=mh / len(mapped), fraction_with_map_ci95=[mlo, mhi], median_distance_mm=round(float(np.median(dists)), 1))
    return out


def _called_positive(p: StudyPrediction, thresholds: Mapping[str, float]) -> bool:
    if p.labels is not None:
        return bool(p.labels.get(WINDOW_LABEL, False))
    return any(s > thresholds[WINDOW_LABEL] for s in p.window_probabilities)


def _detection(truth: np.ndarray, called: np.ndarray) -> dict[str, Any]:
    tp, fn = int((truth & called).sum()), int((truth & ~called).sum())
    tn, fp = int((~truth & ~called).sum()), int((~truth & called).sum())
    sens_ci = wilson_interval(tp, tp + fn)
    spec_ci = wilson_interval(tn, tn + fp)
    return {
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "sensitivity_ci95": list(sens_ci) if sens_ci[0] is not None else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "specificity_ci95": list(spec_ci) if spec_ci[0] is not None else None,
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
    }


def _subsegmental(predictions: Sequence[StudyPrediction], thresholds: Mapping[str, float], called: np.ndarray) -> dict[str, Any]:
    """Studies whose emboli are all subsegmental: detection rate, and their AUROC against all PE-negative studies."""
    sub = np.array([p.subsegmental_only for p in predictions], dtype=bool)
    negative = np.array([p.targets["negative_exam_for_pe"] == 1 or p.targets["indeterminate"] == 1 for p in predictions], dtype=bool)
    n = int(sub.sum())
    out: dict[str, Any] = {"n_studies": n}
    if n == 0:
        out["note"] = "no study with only subsegmental emboli in this set (or no phantoms.json)"
        return out
    k = int(called[sub].sum())
    lo, hi = wilson_interval(k, n)
    out.update(detected=k, sensitivity=k / n, sensitivity_ci95=[lo, hi])
    sel = sub | negative
    if negative.any():
        # PE vs no PE on these studies only: 1 - negative_exam_for_pe and the max window probability as scores.
        y = sub[sel].astype(int)
        s_neg = np.array([1.0 - p.probabilities["negative_exam_for_pe"] for p in predictions])[sel]
        s_win = np.array([max(p.window_probabilities, default=0.0) for p in predictions])[sel]
        out["negative_exam_for_pe_vs_negatives"] = label_metrics(1 - y, 1.0 - s_neg, thresholds["negative_exam_for_pe"])
        out["max_window_probability_vs_negatives"] = label_metrics(y, s_win, thresholds[WINDOW_LABEL])
        wy = np.array([t for p in predictions if p.subsegmental_only for t in p.window_targets], dtype=int)
        ws = np.array([s for p in predictions if p.subsegmental_only for s in p.window_probabilities])
        out["window_level_within_these_studies"] = label_metrics(wy, ws, thresholds[WINDOW_LABEL])
    return out


def window_targets_from_spans(source_spans: Sequence[tuple[int, int]], source_labels: Sequence[int]) -> list[int]:
    """Window labels: 1 when any source slice in the window's inclusive span is positive."""
    lab = np.asarray(source_labels, dtype=int)
    return [int(lab[a : b + 1].any()) for a, b in source_spans]


def evaluate_with_engine(
    engine: Any,
    studies: Sequence[RspectStudy],
    *,
    subsegmental: set[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[StudyPrediction], list[dict[str, str]]]:
    """Run ``engine`` (an :class:`InferenceEngine`) on each study; return predictions and failures."""
    from pe_triage_node.errors import InputRejected
    from pe_triage_node.inference.volume import load_ct_volume

    preds: list[StudyPrediction] = []
    failed: list[dict[str, str]] = []
    for i, st in enumerate(studies):
        try:
            volume = load_ct_volume(st.series_dir, max_tilt_deg=engine.max_tilt_deg)
            result = engine.analyse(volume)
        except InputRejected as exc:
            log.warning("study %d rejected: %s", i, exc)
            failed.append({"series": st.series_instance_uid, "reason": str(exc)})
            continue
        src = [st.slice_labels.get(uid, 0) for uid in volume.sop_instance_uids]
        spans = [w.source_slices for w in result.windows]
        pointing = None
        if st.mask_path is not None:
            mask = read_embolus_mask(st.mask_path).aligned(volume.sop_instance_uids)
            if mask.any():
                maps = sorted(result.gradcam, key=lambda g: WINDOW_LABEL not in g.labels)
                peak = (maps[0].source_slice_index, maps[0].peak_row, maps[0].peak_column) if maps else None
                pointing = pointing_hit(mask, volume.spacing, volume.positions_mm, peak)
        preds.append(
            StudyPrediction(
                study_instance_uid=st.study_instance_uid,
                series_instance_uid=st.series_instance_uid,
                probabilities=dict(result.probabilities),
                targets=dict(st.labels),
                window_probabilities=list(result.window_probabilities),
                window_targets=window_targets_from_spans(spans, src),
                phase1_window_probabilities=list(result.phase1_window_probabilities),
                labels=dict(result.labels),
                subsegmental_only=bool(subsegmental and st.study_instance_uid in subsegmental),
                pointing=pointing,
            )
        )
        if progress is not None:
            progress(i + 1, len(studies))
    return preds, failed


def evaluate_folder(
    data_dir: Path,
    engine: Any,
    *,
    split: str = "train",
    roc_dir: Path | None = None,
    limit: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``engine`` on an RSPECT-format folder and return the report (see :func:`build_report`)."""
    from tqdm import tqdm

    studies = read_rspect(data_dir, split)
    if limit is not None:
        studies = studies[:limit]
    t0 = time.perf_counter()
    bar = tqdm(total=len(studies), desc="evaluate", unit="study", disable=not show_progress)

    def tick(done: int, total: int) -> None:
        bar.update(1)

    preds, failed = evaluate_with_engine(engine, studies, subsegmental=subsegmental_only_studies(data_dir), progress=tick)
    bar.close()
    manifest = engine.model.manifest
    extra = {
        "model": {"name": manifest.model_name, "version": manifest.model_version, "input_size": manifest.input_size, "meaningless": engine.model.meaningless},
        "data": {"dir": str(data_dir), "split": split, "studies_in_csv": len(studies), "failed": failed},
        "window_labels": "a window is positive when any source slice it covers has pe_present_on_image = 1",
        "ci_method": "DeLong (1988) variance, AUC +/- 1.96 SE, clipped to [0, 1]; Wilson intervals for proportions",
        "device": str(engine.device),
        "precision": engine.precision,
        "lung_crop": "lungmask" if engine.lungmask else "threshold",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if not preds:
        raise RuntimeError("no study could be evaluated")
    return build_report(preds, manifest.thresholds.as_dict(), roc_dir=roc_dir, extra=extra)


def metrics_table(report: Mapping[str, Any]) -> str:
    """The per-label table of a report as plain text (Markdown)."""
    lines = ["| label | level | AUROC | 95% CI (DeLong) | threshold | sensitivity | specificity | pos/neg |", "|---|---|---|---|---|---|---|---|"]
    for k, m in report["metrics"].items():
        ci = "n/a" if m["ci95"] is None else f"{m['ci95'][0]:.3f}-{m['ci95'][1]:.3f}"
        auc = "n/a" if m["auroc"] is None else f"{m['auroc']:.3f}"
        sens = "n/a" if m["sensitivity"] is None else f"{m['sensitivity']:.3f}"
        spec = "n/a" if m["specificity"] is None else f"{m['specificity']:.3f}"
        lines.append(f"| {k} | {m['level']} | {auc} | {ci} | {m['threshold']:.3f} | {sens} | {spec} | {m['n_positive']}/{m['n_negative']} |")
    pg = report.get("pointing_game")
    if pg and pg.get("n_studies"):
        lines.append("")
        lines.append(
            f"Pointing game (Grad-CAM peak within {pg['radius_mm']:.0f} mm of an embolus, {pg['n_studies']} positive studies with masks): "
            f"{pg['fraction']:.3f} (95% CI {pg['ci95'][0]:.3f}-{pg['ci95'][1]:.3f}); among the {pg['n_with_map']} studies with a map: "
            + (f"{pg['fraction_with_map']:.3f}" if pg.get("fraction_with_map") is not None else "n/a")
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def _evaluate(args: argparse.Namespace) -> int:
    """Handler of ``pe-triage evaluate`` (torch imported here)."""
    from pe_triage_node.cli import config_from_args
    from pe_triage_node.errors import WeightsError
    from pe_triage_node.inference.engine import InferenceEngine

    cfg = config_from_args(args)
    section = cfg.inference
    if args.lung_crop is not None:
        section = section.model_copy(update={"lung_crop": args.lung_crop})
    try:
        engine = InferenceEngine.from_config(section, weights_manifest=args.weights, device=args.device, random_weights=args.random_weights)
        report = evaluate_folder(args.data_dir, engine, split=args.split, roc_dir=args.roc_dir, limit=args.limit, show_progress=not args.quiet)
    except WeightsError as exc:
        print(f"pe-triage evaluate: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"pe-triage evaluate: {exc}", file=sys.stderr)
        return 3
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    print(metrics_table(report))
    print(f"report written to {args.json}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``evaluate`` to the ``pe-triage`` command."""
    from pe_triage_node.cli import add_config_option

    p = subparsers.add_parser("evaluate", help="run the node's inference over an RSPECT-format folder and write an evaluation report (JSON)")
    p.add_argument("data_dir", metavar="DATA_DIR", type=Path, help="folder with <split>.csv and <split>/<study>/<series>/*.dcm")
    p.add_argument("--json", type=Path, required=True, metavar="OUT", help="write the report here")
    p.add_argument("--weights", type=Path, default=None, metavar="MANIFEST", help="weights manifest.json (default: inference.weights_manifest, else models/demo/manifest.json)")
    p.add_argument("--split", default="train", help="CSV and folder name (default train, as in RSPECT)")
    p.add_argument("--roc-dir", type=Path, default=None, help="also write ROC curve PNGs here")
    p.add_argument("--limit", type=int, default=None, help="only the first N studies")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="override inference.device")
    p.add_argument("--lung-crop", choices=("auto", "lungmask", "threshold"), default=None, help="override inference.lung_crop")
    p.add_argument("--random-weights", action="store_true", help="random networks: MEANINGLESS numbers (smoke tests only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_option(p)
    p.set_defaults(handler=_evaluate)
