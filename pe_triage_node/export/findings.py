"""The findings of one result in words: the headline, the series description, the readable lines.

One place for the wording, so the SR, the burned-in images and the webhook say
the same thing. Reads only the consistent labels (never raw probabilities for a
yes/no), so nothing contradictory reaches a report.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pe_triage_node.inference.labels import WINDOW_LABEL
from pe_triage_node.inference.result import StudyResult
from pe_triage_node.rules import PriorityDecision

SERIES_DESCRIPTION_PREFIX = "AI PE TRIAGE"
_MAX_LO = 64  # PS3.5 LO


def is_positive(labels: Mapping[str, bool]) -> bool:
    return bool(labels.get(WINDOW_LABEL, False))


def chronicity(labels: Mapping[str, bool]) -> str | None:
    """``acute``, ``chronic`` or ``acute-on-chronic`` for a positive study, else ``None``."""
    if not is_positive(labels):
        return None
    if labels.get("acute_and_chronic_pe"):
        return "acute-on-chronic"
    if labels.get("chronic_pe"):
        return "chronic"
    return "acute"


def main_finding(labels: Mapping[str, bool]) -> str:
    """The one-line headline: e.g. ``central PE, RV/LV>=1``, ``right PE``, ``no PE``."""
    if not is_positive(labels):
        return "indeterminate study" if labels.get("indeterminate") else "no PE"
    if labels.get("central_pe"):
        where = "central PE"
    elif labels.get("leftsided_pe") and labels.get("rightsided_pe"):
        where = "bilateral PE"
    elif labels.get("rightsided_pe"):
        where = "right PE"
    elif labels.get("leftsided_pe"):
        where = "left PE"
    else:
        where = "PE"
    kind = chronicity(labels)
    if kind in ("chronic", "acute-on-chronic"):
        where = f"{kind} {where}"
    if labels.get("rv_lv_ratio_gte_1"):
        where += ", RV/LV>=1"
    return where


def series_description(decision: PriorityDecision, labels: Mapping[str, bool], suffix: str = "") -> str:
    """``AI PE TRIAGE: STAT - central PE`` (cut to 64 characters, PS3.5 LO)."""
    text = f"{SERIES_DESCRIPTION_PREFIX}: {decision.priority.value} - {main_finding(labels)}{suffix}"
    return text[:_MAX_LO]


@dataclass(frozen=True)
class FindingLine:
    """One row of the findings table: what, yes/no, the probability behind it and its threshold."""

    label: str
    text: str
    present: bool
    probability: float | None
    threshold: float | None


_LABEL_TEXT = {
    WINDOW_LABEL: "PE present",
    "central_pe": "Central PE",
    "rightsided_pe": "Right-sided PE",
    "leftsided_pe": "Left-sided PE",
    "chronic_pe": "Chronic PE",
    "acute_and_chronic_pe": "Acute-on-chronic PE",
    "rv_lv_ratio_gte_1": "RV/LV ratio >= 1",
    "rv_lv_ratio_lt_1": "RV/LV ratio < 1",
    "negative_exam_for_pe": "Negative for PE",
    "indeterminate": "Indeterminate (quality)",
}


def label_text(label: str) -> str:
    return _LABEL_TEXT.get(label, label)


def label_probability(result: StudyResult, label: str) -> float | None:
    """The probability behind a label: the study head's, or the highest window's for pe_present_on_image."""
    if label == WINDOW_LABEL:
        return max(result.window_probabilities) if result.window_probabilities else None
    p = result.probabilities.get(label)
    return float(p) if p is not None else None


def finding_lines(result: StudyResult) -> list[FindingLine]:
    """Every label in reading order, with its consistent yes/no, probability and threshold."""
    return [
        FindingLine(
            label=label,
            text=label_text(label),
            present=bool(result.labels.get(label, False)),
            probability=label_probability(result, label),
            threshold=result.thresholds.get(label),
        )
        for label in _LABEL_TEXT
        if label in result.labels
    ]


def positive_findings(result: StudyResult) -> list[str]:
    """Names (RSNA labels) of the positive findings, for the webhook and logs (no PHI)."""
    return [line.label for line in finding_lines(result) if line.present]
