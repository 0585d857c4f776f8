"""Label consistency (RSNA STR PE challenge rules) and the winning solution's correction (MODEL.md).

Rules, with "label" meaning "label is positive":

* positive study (any window pe_present): 1a exactly one of rv_lv_ratio_gte_1 /
  rv_lv_ratio_lt_1; 1b at least one of central/left/right; 1c not both
  chronic_pe and acute_and_chronic_pe; 1d neither negative_exam_for_pe nor
  indeterminate.
* negative study: 2a exactly one of negative_exam_for_pe / indeterminate;
  2b none of the seven PE-specific labels.

The challenge tests these at 0.5; the node decides at its thresholds (Table 2),
so each probability p with threshold t is first mapped to a calibrated
q = 0.5 p / t (p <= t) or 0.5 + 0.5 (p - t) / (1 - t) (p > t): q > 0.5 exactly
when p > t. The correction then builds the nearest consistent positive label
set and the nearest consistent negative one (flipping the fewest, least
confident decisions) and keeps the one with the lower challenge-weighted BCE
against q. The window term uses q_i of the positive candidate for both, so the
negative candidate is not favoured by q_i = 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pe_triage_node.inference.labels import CHALLENGE_WEIGHTS, PE_SPECIFIC, STUDY_LABELS, WINDOW_LABEL

_EPS = 1e-6


def calibrate(p: float, t: float) -> float:
    """Map probability ``p`` so that threshold ``t`` lands on 0.5 (monotone, piecewise linear)."""
    p = min(1.0, max(0.0, float(p))) if math.isfinite(p) else 0.0
    return 0.5 * p / t if p <= t else 0.5 + 0.5 * (p - t) / (1.0 - t)


def _bce(q: float, y: bool) -> float:
    q = min(1.0 - _EPS, max(_EPS, q))
    return -math.log(q if y else 1.0 - q)


@dataclass
class ConsistentLabels:
    """Self-consistent study and window labels, with how they were chosen."""

    labels: dict[str, bool]  # the nine study labels + pe_present_on_image (any window)
    window_labels: list[bool]
    chosen: str  # "positive" or "negative"
    loss_positive: float
    loss_negative: float
    changed: list[str] = field(default_factory=list)  # labels that differ from plain thresholding


def _pick_one(q: Mapping[str, float], names: Sequence[str]) -> str:
    return max(names, key=lambda n: (q[n], -names.index(n)))


def correct(study_probs: Mapping[str, float], window_probs: Sequence[float], thresholds: Mapping[str, float]) -> ConsistentLabels:
    """The winning solution's correction at the node's thresholds (see the module docstring)."""
    if len(window_probs) == 0:
        raise ValueError("at least one window probability is needed")
    q = {k: calibrate(study_probs[k], thresholds[k]) for k in STUDY_LABELS}
    qw = [calibrate(p, thresholds[WINDOW_LABEL]) for p in window_probs]
    plain = {k: q[k] > 0.5 for k in STUDY_LABELS}
    plain_w = [v > 0.5 for v in qw]

    # Nearest positive set.
    pos_w = list(plain_w)
    if not any(pos_w):
        pos_w[max(range(len(qw)), key=lambda i: qw[i])] = True
    pos = dict(plain)
    pos["negative_exam_for_pe"] = pos["indeterminate"] = False
    if pos["rv_lv_ratio_gte_1"] == pos["rv_lv_ratio_lt_1"]:
        keep = _pick_one(q, ["rv_lv_ratio_gte_1", "rv_lv_ratio_lt_1"])
        pos["rv_lv_ratio_gte_1"] = pos["rv_lv_ratio_lt_1"] = False
        pos[keep] = True
    if not (pos["central_pe"] or pos["leftsided_pe"] or pos["rightsided_pe"]):
        pos[_pick_one(q, ["central_pe", "rightsided_pe", "leftsided_pe"])] = True
    if pos["chronic_pe"] and pos["acute_and_chronic_pe"]:
        drop = "chronic_pe" if _pick_one(q, ["acute_and_chronic_pe", "chronic_pe"]) == "acute_and_chronic_pe" else "acute_and_chronic_pe"
        pos[drop] = False

    # Nearest negative set.
    neg_w = [False] * len(qw)
    neg = dict(plain)
    for k in PE_SPECIFIC:
        neg[k] = False
    if neg["negative_exam_for_pe"] == neg["indeterminate"]:
        keep = _pick_one(q, ["negative_exam_for_pe", "indeterminate"])
        neg["negative_exam_for_pe"] = neg["indeterminate"] = False
        neg[keep] = True

    q_i = sum(pos_w) / len(pos_w)
    w_img = CHALLENGE_WEIGHTS[WINDOW_LABEL] * q_i

    def loss(labels: Mapping[str, bool], windows: Sequence[bool]) -> float:
        study = sum(CHALLENGE_WEIGHTS[k] * _bce(q[k], labels[k]) for k in STUDY_LABELS)
        return study + w_img * sum(_bce(v, y) for v, y in zip(qw, windows))

    lp, ln = loss(pos, pos_w), loss(neg, neg_w)
    if lp <= ln:
        chosen, labels, windows = "positive", pos, pos_w
    else:
        chosen, labels, windows = "negative", neg, neg_w
    out = dict(labels)
    out[WINDOW_LABEL] = any(windows)
    changed = [k for k in STUDY_LABELS if labels[k] != plain[k]]
    if windows != plain_w:
        changed.append(WINDOW_LABEL)
    return ConsistentLabels(out, list(windows), chosen, lp, ln, changed)


def violations(labels: Mapping[str, bool], window_labels: Sequence[bool]) -> list[str]:
    """The challenge rules that a label set breaks (empty when consistent)."""
    broken: list[str] = []
    positive = any(window_labels)
    if labels.get(WINDOW_LABEL, positive) != positive:
        broken.append("study pe_present_on_image disagrees with the windows")
    if positive:
        if labels["rv_lv_ratio_gte_1"] == labels["rv_lv_ratio_lt_1"]:
            broken.append("1a")
        if not (labels["central_pe"] or labels["leftsided_pe"] or labels["rightsided_pe"]):
            broken.append("1b")
        if labels["chronic_pe"] and labels["acute_and_chronic_pe"]:
            broken.append("1c")
        if labels["negative_exam_for_pe"] or labels["indeterminate"]:
            broken.append("1d")
    else:
        if labels["negative_exam_for_pe"] == labels["indeterminate"]:
            broken.append("2a")
        if any(labels[k] for k in PE_SPECIFIC):
            broken.append("2b")
    return broken
