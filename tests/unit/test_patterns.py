"""Admin patterns against sender-chosen values: a catastrophic pattern costs a tenth of a second, not hours."""

from __future__ import annotations

import time

import pytest

from pe_triage_node.config import SelectionSection
from pe_triage_node.patterns import MATCH_TIMEOUT_S, search
from pe_triage_node.rules.schema import AttributeCondition, EvaluationContext

RUNAWAY = r"(a|aa)+$"
CRAFTED = "a" * 60 + "b"


def test_a_runaway_match_is_cut_off_and_counts_as_no_match(caplog: pytest.LogCaptureFixture) -> None:
    started = time.monotonic()
    assert search(RUNAWAY, CRAFTED) is False
    assert time.monotonic() - started < 20 * MATCH_TIMEOUT_S
    assert "ran out of time" in caplog.text and CRAFTED not in caplog.text
    assert search(r"(?i)angio", "CT ANGIO CHEST") is True


def test_bad_patterns_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="invalid regular expression"):
        SelectionSection(series_description_exclude="(unclosed")


def test_a_priority_rule_with_a_runaway_pattern_does_not_hold_the_worker() -> None:
    cond = AttributeCondition(attribute="StudyDescription", matches=RUNAWAY)
    started = time.monotonic()
    ok, _ = cond.evaluate(EvaluationContext(labels={}, probabilities={}, attributes={"StudyDescription": CRAFTED}, age_years=None))
    assert ok is False and time.monotonic() - started < 20 * MATCH_TIMEOUT_S
