"""Consistency correction: any probabilities in -> labels that satisfy every challenge rule out."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pe_triage_node.inference.consistency import calibrate, correct, violations
from pe_triage_node.inference.labels import STUDY_LABELS, TABLE2_THRESHOLDS, WINDOW_LABEL

prob = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
threshold = st.floats(min_value=0.01, max_value=0.99)


@settings(max_examples=400, deadline=None)
@given(
    study=st.lists(prob, min_size=9, max_size=9),
    windows=st.lists(prob, min_size=1, max_size=60),
    thresholds=st.one_of(st.just(None), st.lists(threshold, min_size=10, max_size=10)),
)
def test_any_probabilities_give_consistent_labels(study: list[float], windows: list[float], thresholds: list[float] | None) -> None:
    th = TABLE2_THRESHOLDS if thresholds is None else dict(zip((WINDOW_LABEL, *STUDY_LABELS), thresholds))
    out = correct(dict(zip(STUDY_LABELS, study)), windows, th)
    assert violations(out.labels, out.window_labels) == []
    assert len(out.window_labels) == len(windows)
    assert out.chosen == ("positive" if any(out.window_labels) else "negative")
    assert min(out.loss_positive, out.loss_negative) >= 0


def test_consistent_input_is_left_alone() -> None:
    p = dict.fromkeys(STUDY_LABELS, 0.01)
    p.update(central_pe=0.9, rv_lv_ratio_gte_1=0.9)
    out = correct(p, [0.01, 0.9, 0.02], TABLE2_THRESHOLDS)
    assert out.chosen == "positive" and out.changed == []
    assert out.labels["central_pe"] and out.labels["rv_lv_ratio_gte_1"] and out.labels[WINDOW_LABEL]
    assert out.window_labels == [False, True, False]


def test_contradictions_are_resolved_towards_the_cheaper_set() -> None:
    # strong windows, but negative_exam also high and no location: positive set wins, location filled in
    p = dict.fromkeys(STUDY_LABELS, 0.01)
    p.update(negative_exam_for_pe=0.95, rightsided_pe=0.1, rv_lv_ratio_lt_1=0.6, rv_lv_ratio_gte_1=0.7)
    out = correct(p, [0.99] * 10, TABLE2_THRESHOLDS)
    assert out.chosen == "positive"
    assert not out.labels["negative_exam_for_pe"]
    assert out.labels["rv_lv_ratio_gte_1"] and not out.labels["rv_lv_ratio_lt_1"]
    assert out.labels["rightsided_pe"]
    # weak windows and a confident negative exam: negative set, PE-specific labels cleared
    q = dict.fromkeys(STUDY_LABELS, 0.01)
    q.update(negative_exam_for_pe=0.99, central_pe=0.06)
    neg = correct(q, [0.16, 0.01], TABLE2_THRESHOLDS)
    assert neg.chosen == "negative" and not any(neg.window_labels)
    assert neg.labels["negative_exam_for_pe"] and not neg.labels["central_pe"]
    assert set(neg.changed) == {"central_pe", WINDOW_LABEL}


def test_calibration_puts_the_threshold_at_half() -> None:
    assert calibrate(0.15, 0.15) == 0.5
    assert calibrate(0.0, 0.8) == 0.0 and calibrate(1.0, 0.05) == 1.0
    assert calibrate(0.151, 0.15) > 0.5 > calibrate(0.149, 0.15)
