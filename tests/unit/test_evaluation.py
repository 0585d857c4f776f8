"""Evaluation metrics (DeLong AUROC, thresholds, intervals), the report and ``pe-triage evaluate``."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

from pe_triage_node.evaluation import (
    STUDY_LABELS,
    WINDOW_LABEL,
    StudyPrediction,
    auroc_ci,
    build_report,
    pointing_game,
    pointing_hit,
    choose_threshold,
    delong_auroc,
    roc_points,
    sensitivity_specificity,
    wilson_interval,
    window_targets_from_spans,
)

# Toy case computed by hand (see test_delong_matches_hand_computation):
# positives X = 0.9, 0.8, 0.4; negatives Y = 0.7, 0.4, 0.2 (one tie at 0.4).
TOY_Y = [1, 1, 1, 0, 0, 0]
TOY_S = [0.9, 0.8, 0.4, 0.7, 0.4, 0.2]


def test_delong_matches_hand_computation() -> None:
    # psi(X_i, Y_j): X=0.9 beats all three, X=0.8 beats all three, X=0.4 loses to 0.7, ties 0.4, beats 0.2.
    # V10 = [1, 1, 1/2]            -> AUC = 2.5/3 = 5/6
    # V01 = [2/3, 5/6, 1]          (Y=0.7, 0.4, 0.2)
    # S10 = var([1, 1, .5], ddof 1) = 1/12;  S01 = var([2/3, 5/6, 1], ddof 1) = 1/36
    # Var = S10/3 + S01/3 = 1/36 + 1/108 = 1/27
    auc, var = delong_auroc(TOY_Y, TOY_S)
    assert auc == pytest.approx(5 / 6)
    assert var == pytest.approx(1 / 27)
    a, lo, hi = auroc_ci(TOY_Y, TOY_S)
    assert lo == pytest.approx(5 / 6 - 1.959963984540054 * math.sqrt(1 / 27))
    assert hi == 1.0  # clipped


def test_delong_brute_force_random() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 40)
    s = np.round(rng.normal(size=40) + y, 1)  # rounding makes ties
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(1), psi.mean(0)
    auc, var = delong_auroc(y, s)
    assert auc == pytest.approx(psi.mean())
    assert var == pytest.approx(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))


def test_delong_one_class_is_nan() -> None:
    auc, var = delong_auroc([1, 1], [0.2, 0.3])
    assert math.isnan(auc) and math.isnan(var)


def test_roc_points_span_the_square() -> None:
    fpr, tpr, thr = roc_points(TOY_Y, TOY_S)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    # Trapezoid area equals the Mann-Whitney AUC (ties included).
    assert np.trapezoid(tpr, fpr) == pytest.approx(5 / 6)


def test_threshold_selection() -> None:
    assert choose_threshold([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.8], fallback=0.15) == pytest.approx(0.45)
    # One class only: the fallback (e.g. MODEL.md Table 2).
    assert choose_threshold([0, 0, 0], [0.1, 0.2, 0.3], fallback=0.15) == 0.15
    # Overlap: J is best between 0.35 and 0.5 (sens 1, spec 2/3).
    t = choose_threshold([0, 0, 0, 1, 1], [0.1, 0.2, 0.5, 0.6, 0.4], fallback=0.5)
    assert t == pytest.approx(0.3)
    # Clipped into (0, 1) for the manifest.
    assert choose_threshold([0, 1], [0.0, 0.0001], fallback=0.5) == 0.01


def test_sensitivity_specificity_strictly_above() -> None:
    ss = sensitivity_specificity([1, 1, 0, 0], [0.5, 0.9, 0.5, 0.1], 0.5)
    assert (ss["tp"], ss["fn"], ss["tn"], ss["fp"]) == (1, 1, 2, 0)
    assert ss["sensitivity"] == 0.5 and ss["specificity"] == 1.0


def test_wilson_interval() -> None:
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 0) == (None, None)


def test_window_targets_from_spans() -> None:
    assert window_targets_from_spans([(0, 2), (3, 5), (6, 6)], [0, 0, 0, 0, 1, 0, 0]) == [0, 1, 0]


def _pred(i: int, positive: bool, subseg: bool = False) -> StudyPrediction:
    rng = np.random.default_rng(i)
    targets = {k: 0 for k in STUDY_LABELS}
    if positive:
        targets.update(central_pe=1, rv_lv_ratio_gte_1=1)
    else:
        targets["negative_exam_for_pe"] = 1
    probs = {k: float(np.clip(0.7 * targets[k] + 0.3 * rng.random(), 0, 1)) for k in STUDY_LABELS}
    wt = [0, 1, 1, 0] if positive else [0, 0, 0, 0]
    wp = [float(0.6 * t + 0.3 * rng.random()) for t in wt]
    return StudyPrediction(f"s{i}", f"r{i}", probs, targets, wp, wt, wp, None, subseg)


def test_report_keys_and_subsegmental(tmp_path: Path) -> None:
    preds = [_pred(i, i % 2 == 0, subseg=i == 0) for i in range(8)]
    thresholds = {WINDOW_LABEL: 0.5, **{k: 0.5 for k in STUDY_LABELS}}
    rep = build_report(preds, thresholds, roc_dir=tmp_path)
    assert set(rep["metrics"]) == {WINDOW_LABEL, *STUDY_LABELS}
    m = rep["metrics"][WINDOW_LABEL]
    assert m["level"] == "window" and m["n_positive"] == 8 and m["n_negative"] == 24
    assert m["auroc"] == 1.0 and m["ci95"][1] == 1.0
    assert rep["metrics"]["chronic_pe"]["auroc"] is None  # one class only
    assert rep["subsegmental_only"]["n_studies"] == 1
    assert rep["study_pe_detection"]["sensitivity"] == 1.0
    assert all(Path(p).is_file() and Path(p).read_bytes()[:4] == b"\x89PNG" for p in rep["roc_png"].values())
    json.dumps(rep, allow_nan=False)


def _tiny_weights(tmp_path: Path) -> Path:
    import torch

    from pe_triage_node.inference.networks import StudyModel, WindowEncoder
    from pe_triage_node.inference.weights import save_weights

    torch.manual_seed(0)
    return save_weights(tmp_path / "w", WindowEncoder(), StudyModel(), model_name="tiny-test", model_version="0", input_size=32, dtype="float32")


def test_evaluate_cli_writes_report(tmp_path: Path) -> None:
    from pe_triage_node import evaluation
    from pe_triage_node.synth.rspect import write_rspect_dataset

    data = tmp_path / "data"
    write_rspect_dataset(data, studies=3, seed=5, size="small", slices=(40, 44), mix={"positive": 1.0})
    manifest = _tiny_weights(tmp_path)
    parser = argparse.ArgumentParser()
    evaluation.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "report.json"
    args = parser.parse_args(["evaluate", str(data), "--json", str(out), "--weights", str(manifest), "--device", "cpu", "--lung-crop", "threshold", "--roc-dir", str(tmp_path / "roc"), "--quiet"])
    assert args.handler(args) == 0
    rep = json.loads(out.read_text())
    assert rep["format"] == "pe-triage-evaluation/1"
    assert rep["n_studies"] == 3 and rep["n_windows"] > 3
    pg = rep["pointing_game"]  # every study with emboli has its mask beside the CSV
    assert pg["n_studies"] == sum(1 for r in json.loads((data / "phantoms.json").read_text())["records"] if r["n_emboli"]) >= 1
    assert pg["hits"] <= pg["n_studies"] and pg["n_with_map"] <= pg["n_studies"]
    for key in ("metrics", "thresholds", "subsegmental_only", "study_pe_detection", "phase1_window", "model", "data", "roc_png"):
        assert key in rep
    assert rep["model"]["input_size"] == 32
    for k in (WINDOW_LABEL, *STUDY_LABELS):
        assert {"auroc", "ci95", "sensitivity", "specificity", "threshold", "n_positive", "n_negative"} <= set(rep["metrics"][k])


def test_pointing_hit_measures_millimetres() -> None:
    mask = np.zeros((5, 20, 20), dtype=np.uint8)
    mask[2, 10, 10] = 1
    positions = [0.0, 3.0, 6.0, 9.0, 12.0]
    spacing = (3.0, 0.8, 0.8)
    assert pointing_hit(mask, spacing, positions, (2, 10.0, 10.0)) == {"has_map": True, "hit": True, "distance_mm": 0.0}
    near = pointing_hit(mask, spacing, positions, (4, 10.0, 10.0))  # two slices away: 6 mm
    assert near["hit"] and near["distance_mm"] == 6.0
    far = pointing_hit(mask, spacing, positions, (2, 10.0, 0.0))  # 10 columns x 0.8 mm = 8 mm
    assert far["hit"] and far["distance_mm"] == 8.0
    miss = pointing_hit(mask, spacing, positions, (0, 0.0, 0.0))  # sqrt(6^2 + 8^2 + 8^2) mm
    assert not miss["hit"] and miss["distance_mm"] == pytest.approx(12.8, abs=0.05)
    assert pointing_hit(mask, spacing, positions, None) == {"has_map": False, "hit": False, "distance_mm": None}


def test_pointing_game_counts_studies_without_a_map_as_misses() -> None:
    preds = [_pred(i, True) for i in range(4)]
    preds[0].pointing = {"has_map": True, "hit": True, "distance_mm": 2.0}
    preds[1].pointing = {"has_map": True, "hit": False, "distance_mm": 30.0}
    preds[2].pointing = {"has_map": False, "hit": False, "distance_mm": None}
    pg = pointing_game(preds)
    assert pg["n_studies"] == 3 and pg["hits"] == 1 and pg["fraction"] == pytest.approx(1 / 3)
    assert pg["n_with_map"] == 2 and pg["fraction_with_map"] == 0.5 and pg["median_distance_mm"] == 16.0
    assert 0 <= pg["ci95"][0] < pg["fraction"] < pg["ci95"][1] <= 1
    assert pointing_game([_pred(0, True)])["n_studies"] == 0
