"""One wording of findings: a result as the worker produced it and as the ``results`` table keeps it read the same."""

from __future__ import annotations

import json

import pytest

from pe_triage_node.db.models import TriageResult
from pe_triage_node.export.findings import (
    ResultFindings,
    finding_lines,
    is_positive,
    label_probability,
    label_text,
    main_finding,
    positive_findings,
)
from pe_triage_node.inference.labels import STUDY_LABELS, WINDOW_LABEL
from pe_triage_node.inference.result import StudyResult
from pe_triage_node.rules.engine import study_findings


def _result(**set_: bool) -> StudyResult:
    labels = {k: False for k in STUDY_LABELS}
    labels[WINDOW_LABEL] = False
    labels.update(set_)
    return StudyResult(
        model_name="test-model", model_version="1.0", intended_use="tests", meaningless=True,
        series_instance_uid="1.2.3.4", study_instance_uid="1.2.3",
        probabilities={k: 0.71 if labels[k] else 0.02 for k in STUDY_LABELS}, window_probabilities=[0.2, 0.93, 0.4],
        phase1_window_probabilities=[0.2, 0.9, 0.4], labels=labels, window_labels=[False, True, False],
        consistency={"chosen": "positive"}, thresholds={k: 0.15 for k in labels},
        attention={k: [0.3, 0.4, 0.3] for k in STUDY_LABELS}, gradcam=[], windows=[], lung_crop_method="threshold",
        crop={}, geometry={}, device="cpu", precision="fp32", timings_s={},
    )


def _stored(result: StudyResult) -> TriageResult:
    """The ``results`` row the worker writes for ``result`` (its own conversion, not a copy of it)."""
    findings = study_findings(result)
    return TriageResult(labels=json.dumps(dict(findings.labels)), probabilities=json.dumps(dict(findings.probabilities)),
                        result_json=json.dumps(result.to_dict("summary")))


@pytest.mark.parametrize(
    "labels",
    [
        {},
        {"negative_exam_for_pe": True},
        {"negative_exam_for_pe": True, "indeterminate": True},
        {WINDOW_LABEL: True, "central_pe": True, "leftsided_pe": True, "rightsided_pe": True, "rv_lv_ratio_gte_1": True},
        {WINDOW_LABEL: True, "leftsided_pe": True, "rightsided_pe": True, "chronic_pe": True, "rv_lv_ratio_lt_1": True},
        {WINDOW_LABEL: True, "rightsided_pe": True, "acute_and_chronic_pe": True},
    ],
)
def test_the_stored_result_reads_as_the_result_did(labels: dict[str, bool]) -> None:
    result = _result(**labels)
    stored = ResultFindings.from_row(_stored(result))
    assert main_finding(stored.labels) == main_finding(result.labels)
    assert is_positive(stored.labels) == result.positive
    assert finding_lines(stored) == finding_lines(result)
    assert positive_findings(stored) == positive_findings(result)
    assert label_probability(stored, WINDOW_LABEL) == label_probability(result, WINDOW_LABEL) == 0.93


def test_headline_and_label_names() -> None:
    assert main_finding(_result(**{WINDOW_LABEL: True, "leftsided_pe": True, "rightsided_pe": True}).labels) == "bilateral PE"
    assert main_finding({}) == "no PE"
    assert [label_text(k) for k in (WINDOW_LABEL, "pe_present", "acute_pe", "rv_lv_ratio_gte_1", "made_up")] == [
        "PE present", "PE present", "Acute PE", "RV/LV ratio >= 1", "made_up"]


def test_a_malformed_stored_row_reads_as_what_is_left() -> None:
    row = TriageResult(labels=json.dumps({WINDOW_LABEL: True, "central_pe": "yes", "chronic_pe": 1}),
                       probabilities="not json",
                       result_json=json.dumps({"window_probabilities": [0.1, "x", None, 0.6, True],
                                               "thresholds": [0.5]}))
    found = ResultFindings.from_row(row)
    assert found.labels == {WINDOW_LABEL: True}  # only booleans
    assert found.probabilities == {WINDOW_LABEL: 0.6}  # the highest window, numbers only
    assert found.thresholds == {}
    assert main_finding(found.labels) == "PE"
    assert ResultFindings.from_row(TriageResult(labels="[]", probabilities="{}", result_json="")).labels == {}


def test_the_command_line_says_it_in_the_same_words() -> None:
    from pe_triage_node.inference.result import findings_block

    result = _result(**{WINDOW_LABEL: True, "rightsided_pe": True, "chronic_pe": True})
    result.geometry = {"source_slices": 30, "spacing_mm": [0.7, 0.7, 1.0]}
    block = findings_block(result)
    assert "study      chronic right PE (consistent label set: positive)" in block
    assert "  Right-sided PE           YES  p=0.710 (t=0.15)" in block
    assert "  PE present               YES  p=0.930 (t=0.15)" in block
    assert "  Central PE               no   p=0.020 (t=0.15)" in block
