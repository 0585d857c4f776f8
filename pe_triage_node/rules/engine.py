"""The pure rules engine: ``priority_for(findings, attributes, rules)``, and ``triage`` around it.

No I/O, no clock, no database: the same findings, attributes and rules always
give the same decision, which is what makes ``pe-triage rules test`` (replaying
new rules over stored results) trustworthy.

:func:`triage` is the one way from an analysed series to its priority (the
worker and ``pe-triage infer --outputs`` both call it): the findings as the
``results`` row keeps them (:func:`study_findings`), the attributes as text
(:func:`header_attributes`), then :func:`priority_for`.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pe_triage_node.rules.schema import (
    ACUTE_PE,
    PE_PRESENT,
    PE_SPECIFIC_LABELS,
    STORED_ATTRIBUTES,
    WINDOW_LABEL,
    EvaluationContext,
    Priority,
    RuleSet,
)

log = logging.getLogger(__name__)


class FindingsLike(Protocol):
    """What the engine reads from a study result: consistent labels and probabilities.

    ``labels``: study labels by RSNA name (already made consistent), optionally
    ``pe_present`` (study positive); ``probabilities``: per study label, and
    ``pe_present`` (or ``pe_present_on_image``) as the study's highest window probability.
    """

    @property
    def labels(self) -> Mapping[str, bool]: ...

    @property
    def probabilities(self) -> Mapping[str, float]: ...


@dataclass(frozen=True)
class Findings:
    """A study's consistent labels and probabilities (the inference result, adapted)."""

    labels: Mapping[str, bool] = field(default_factory=dict)
    probabilities: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PriorityDecision:
    """The triage decision: priority, the rule that gave it (``None``: the default), flags, why."""

    priority: Priority
    rule_name: str | None
    rule_number: int | None  # 1-based position of the matching rule; None for the default
    flags: tuple[str, ...]
    explanation: str

    @property
    def queue_priority(self) -> int:
        """``jobs.priority`` for follow-up work (export) on this study (higher first)."""
        return self.priority.queue_priority

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (no patient identifiers)."""
        return {
            "priority": self.priority.value,
            "rule_name": self.rule_name,
            "rule_number": self.rule_number,
            "flags": list(self.flags),
            "explanation": self.explanation,
        }


# -- derived labels -----------------------------------------------------------


def derived_labels(labels: Mapping[str, bool]) -> dict[str, bool]:
    """The labels with ``pe_present`` and ``acute_pe`` added when they can be derived.

    ``pe_present``: given, else ``pe_present_on_image``, else true when any
    PE-specific label is set, false when negative_exam_for_pe or indeterminate is
    (exact for consistent labels). ``acute_pe``: positive with neither
    chronic_pe nor acute_and_chronic_pe (MODEL.md). Unknown stays absent.
    """
    out = {k: bool(v) for k, v in labels.items()}
    present: bool | None
    if PE_PRESENT in labels:
        present = bool(labels[PE_PRESENT])
    elif WINDOW_LABEL in labels:
        present = bool(labels[WINDOW_LABEL])
    elif any(labels.get(name) for name in PE_SPECIFIC_LABELS):
        present = True
    elif labels.get("negative_exam_for_pe") or labels.get("indeterminate"):
        present = False
    else:
        present = None
    if present is not None:
        out[PE_PRESENT] = present
        if ACUTE_PE not in labels:
            if not present:
                out[ACUTE_PE] = False
            elif "chronic_pe" in labels and "acute_and_chronic_pe" in labels:
                out[ACUTE_PE] = not (labels["chronic_pe"] or labels["acute_and_chronic_pe"])
    return out


def _probabilities(probabilities: Mapping[str, float]) -> dict[str, float]:
    out = {k: float(v) for k, v in probabilities.items()}
    if PE_PRESENT not in out and WINDOW_LABEL in out:
        out[PE_PRESENT] = out[WINDOW_LABEL]
    return out


# -- age ----------------------------------------------------------------------

_AS_RE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$")
_DA_RE = re.compile(r"^\s*(\d{4})\.?(\d{2})\.?(\d{2})\s*$")  # YYYYMMDD (or ACR-NEMA YYYY.MM.DD)
_AS_YEARS = {"D": 1 / 365.2425, "W": 7 / 365.2425, "M": 1 / 12, "Y": 1.0}


def _date(value: str | None) -> dt.date | None:
    if not value:
        return None
    m = _DA_RE.match(value)
    if not m:
        return None
    try:
        return dt.date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None


def _completed_years(birth: dt.date, on: dt.date) -> float:
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    last = _anniversary(birth, birth.year + years)
    following = _anniversary(birth, birth.year + years + 1)
    return years + (on - last).days / (following - last).days


def _anniversary(birth: dt.date, year: int) -> dt.date:
    try:
        return birth.replace(year=year)
    except ValueError:  # 29 February in a common year
        return dt.date(year, 3, 1)


def patient_age_years(attributes: Mapping[str, str]) -> float | None:
    """The patient's age in years at the study, or ``None`` when unknown.

    From PatientAge (PS3.5 AS: ``nnnD``/``W``/``M``/``Y``), else from
    PatientBirthDate and StudyDate (DA). Values that do not parse are unknown.
    """
    m = _AS_RE.match(str(attributes.get("PatientAge") or ""))
    if m:
        return int(m[1]) * _AS_YEARS[m[2]]
    birth = _date(attributes.get("PatientBirthDate"))
    study = _date(attributes.get("StudyDate"))
    if birth is None or study is None or birth > study:
        return None
    return _completed_years(birth, study)


# -- the engine ---------------------------------------------------------------


def evaluation_context(findings: FindingsLike, attributes: Mapping[str, str]) -> EvaluationContext:
    """What the conditions read, derived once per decision."""
    return EvaluationContext(
        labels=derived_labels(findings.labels),
        probabilities=_probabilities(findings.probabilities),
        attributes=attributes,
        age_years=patient_age_years(attributes),
    )


def priority_for(findings: FindingsLike, attributes: Mapping[str, str], rules: RuleSet) -> PriorityDecision:
    """The triage priority of a study: the first rule whose condition holds, else the default.

    ``attributes`` are DICOM attributes of the analysed series by keyword
    (``schema.STORED_ATTRIBUTES``). The explanation cites the evidence (labels,
    probabilities, which attribute test held) but never an attribute's value.
    """
    ctx = evaluation_context(findings, attributes)
    for number, rule in enumerate(rules.rules, start=1):
        ok, why = rule.when.evaluate(ctx)
        if ok:
            flags = f" [{', '.join(rule.flags)}]" if rule.flags else ""
            return PriorityDecision(
                priority=rule.priority,
                rule_name=rule.name,
                rule_number=number,
                flags=tuple(rule.flags),
                explanation=f'rule {number} "{rule.name}" → {rule.priority.value}{flags}: {why}',
            )
    flags = f" [{', '.join(rules.default_flags)}]" if rules.default_flags else ""
    return PriorityDecision(
        priority=rules.default_priority,
        rule_name=None,
        rule_number=None,
        flags=tuple(rules.default_flags),
        explanation=f"no rule matched → {rules.default_priority.value}{flags} (default)",
    )


# -- from an analysed series to its priority ------------------------------------


class StudyResultLike(Protocol):
    """What :func:`study_findings` reads of an inference result (``StudyResult``)."""

    @property
    def labels(self) -> Mapping[str, bool]: ...

    @property
    def probabilities(self) -> Mapping[str, float]: ...

    @property
    def window_probabilities(self) -> Sequence[float]: ...


class HeaderLike(Protocol):
    """An instance header read by keyword (a pydicom ``Dataset``)."""

    def get(self, key: str, default: Any = None) -> Any: ...


def study_findings(result: StudyResultLike) -> Findings:
    """Labels (with derived ``pe_present`` / ``acute_pe``) and probabilities as the ``results`` row keeps them.

    ``pe_present`` / ``pe_present_on_image`` probability: the study's highest
    window probability. The priority is decided from exactly these, so that
    ``pe-triage rules test`` replays give the same decision for unchanged rules.
    """
    labels = derived_labels(result.labels)
    probabilities = {k: float(v) for k, v in result.probabilities.items()}
    if result.window_probabilities:
        top = float(max(result.window_probabilities))
        probabilities.setdefault(WINDOW_LABEL, top)
        probabilities.setdefault(PE_PRESENT, top)
    return Findings(labels, probabilities)


def attribute_text(value: Any) -> str:
    """A DICOM value as text; multi-valued ones joined with backslashes (their PS3.5 encoding)."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return "\\".join(str(v) for v in value)
    return str(value)


def header_attributes(header: HeaderLike) -> dict[str, str]:
    """The attributes the rules read (``STORED_ATTRIBUTES``) from one instance header, as text.

    Absent and empty ones are left out; so is one whose value cannot be read
    (a malformed element is the rules' "absent", never a failed study).
    """
    out: dict[str, str] = {}
    for keyword in STORED_ATTRIBUTES:
        try:
            value = header.get(keyword)
            text = "" if value is None else attribute_text(value)
        except Exception:  # noqa: BLE001 - pydicom raises many types for a malformed value
            log.warning("attribute %s unreadable in the series header: treated as absent", keyword)
            continue
        if text:
            out[keyword] = text
    return out


@dataclass(frozen=True)
class Triage:
    """A study's priority with the findings and attributes it was decided from (what the results row keeps)."""

    decision: PriorityDecision
    findings: Findings
    attributes: dict[str, str]


def triage(result: StudyResultLike, header: HeaderLike, rules: RuleSet) -> Triage:
    """The priority of an analysed series: ``result`` (its findings), ``header`` (one instance's attributes), ``rules``."""
    findings = study_findings(result)
    attributes = header_attributes(header)
    return Triage(priority_for(findings, attributes, rules), findings, attributes)
