"""The findings of one result in words: the headline, the series description, the readable lines.

The one place for the wording: the SR, the burned-in images, the webhook, the
web console and the command line all say what these functions say. They read a
result as the worker produced it (:class:`StudyResult`) or as the ``results``
table keeps it (:meth:`ResultFindings.from_row`), and only its consistent labels
for a yes/no (never raw probabilities), so nothing contradictory reaches a report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pe_triage_node.inference.labels import WINDOW_LABEL
from pe_triage_node.inference.result import StudyResult
from pe_triage_node.rules import PriorityDecision

if TYPE_CHECKING:
    from pe_triage_node.db.models import TriageResult

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


# The model's labels in reading order, then the two the rules derive (pe_present, acute_pe).
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
_DERIVED_TEXT = {"pe_present": "PE present", "acute_pe": "Acute PE"}


def label_text(label: str) -> str:
    """A label's name in words (``central_pe`` → ``Central PE``); an unknown name as it is."""
    return _LABEL_TEXT.get(label) or _DERIVED_TEXT.get(label) or label


@dataclass(frozen=True)
class ResultFindings:
    """What the wording reads of one result: consistent labels, probabilities, thresholds.

    ``probabilities[pe_present_on_image]`` is the study's highest window probability.
    """

    labels: Mapping[str, bool]
    probabilities: Mapping[str, float]
    thresholds: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, result: StudyResult | ResultFindings) -> ResultFindings:
        if isinstance(result, ResultFindings):
            return result
        probabilities = {k: float(v) for k, v in result.probabilities.items()}
        if result.window_probabilities:
            probabilities.setdefault(WINDOW_LABEL, float(max(result.window_probabilities)))
        return cls(dict(result.labels), probabilities, dict(result.thresholds))

    @classmethod
    def from_row(cls, row: TriageResult) -> ResultFindings:
        """The findings of a stored ``results`` row; malformed JSON or values are left out, never raised."""
        return cls.from_stored(_json_object(row.labels), _json_object(row.probabilities), _json_object(row.result_json))

    @classmethod
    def from_stored(cls, labels: Any, probabilities: Any, summary: Any) -> ResultFindings:
        """The same from the row's columns already parsed (``summary``: ``result_json``); wrong types are left out."""
        summary = summary if isinstance(summary, dict) else {}
        found_labels = {str(k): v for k, v in labels.items() if isinstance(v, bool)} if isinstance(labels, dict) else {}
        found = _numbers(probabilities) if isinstance(probabilities, dict) else {}
        windows = summary.get("window_probabilities")
        window_values = list(_numbers(dict(enumerate(windows))).values()) if isinstance(windows, list) else []
        if WINDOW_LABEL not in found and window_values:
            found[WINDOW_LABEL] = max(window_values)
        thresholds = summary.get("thresholds")
        return cls(found_labels, found, _numbers(thresholds) if isinstance(thresholds, dict) else {})


def _json_object(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except (json.JSONDecodeError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


def _numbers(values: Mapping[Any, Any]) -> dict[str, float]:
    return {
        str(k): float(v) for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


@dataclass(frozen=True)
class FindingLine:
    """One row of the findings table: what, yes/no, the probability behind it and its threshold."""

    label: str
    text: str
    present: bool
    probability: float | None
    threshold: float | None


def label_probability(result: StudyResult | ResultFindings, label: str) -> float | None:
    """The probability behind a label: the study head's, or the highest window's for pe_present_on_image."""
    return ResultFindings.of(result).probabilities.get(label)


def finding_lines(result: StudyResult | ResultFindings) -> list[FindingLine]:
    """Every model label the result has, in reading order, with its consistent yes/no, probability and threshold."""
    found = ResultFindings.of(result)
    return [
        FindingLine(
            label=label,
            text=text,
            present=bool(found.labels.get(label, False)),
            probability=found.probabilities.get(label),
            threshold=found.thresholds.get(label),
        )
        for label, text in _LABEL_TEXT.items()
        if label in found.labels
    ]


def positive_findings(result: StudyResult | ResultFindings) -> list[str]:
    """Names (RSNA labels) of the positive findings, for the webhook and logs (no PHI)."""
    return [line.label for line in finding_lines(result) if line.present]
