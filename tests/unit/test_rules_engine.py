"""The pure rules engine: shipped defaults, attribute and age conditions, first-match order."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pe_triage_node.rules.engine import Findings, derived_labels, patient_age_years, priority_for
from pe_triage_node.rules.schema import (
    PE_SPECIFIC_LABELS,
    RULE_LABELS,
    STUDY_LABELS,
    LabelCondition,
    Priority,
    ProbabilityCondition,
    Rule,
    RuleSet,
    load_rules,
    parse_rules,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = load_rules(ROOT / "config" / "rules.toml")


def _labels(**set_: bool) -> dict[str, bool]:
    """A full study label set: everything false except what is given."""
    labels = {name: False for name in STUDY_LABELS}
    labels.update(set_)
    return labels


# -- shipped defaults ---------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "priority", "rule", "flags"),
    [
        (_labels(central_pe=True, rightsided_pe=True, rv_lv_ratio_lt_1=True), "STAT", "Central PE", ()),
        (  # central beats everything, chronic or not
            _labels(central_pe=True, chronic_pe=True, rv_lv_ratio_gte_1=True),
            "STAT",
            "Central PE",
            (),
        ),
        (_labels(rightsided_pe=True, rv_lv_ratio_gte_1=True), "STAT", "Acute PE with RV/LV >= 1", ()),
        (_labels(leftsided_pe=True, chronic_pe=True, rv_lv_ratio_lt_1=True), "URGENT", "Any PE", ()),
        (  # chronic with strain is not acute: URGENT
            _labels(leftsided_pe=True, acute_and_chronic_pe=True, rv_lv_ratio_gte_1=True),
            "URGENT",
            "Any PE",
            (),
        ),
        (_labels(leftsided_pe=True, rv_lv_ratio_lt_1=True), "URGENT", "Any PE", ()),
        (_labels(indeterminate=True), "ROUTINE", "Indeterminate quality", ("review",)),
        (_labels(negative_exam_for_pe=True), "ROUTINE", None, ()),
    ],
)
def test_shipped_defaults(labels: dict[str, bool], priority: str, rule: str | None, flags: tuple[str, ...]) -> None:
    decision = priority_for(Findings(labels, {}), {}, SHIPPED)
    assert (decision.priority.value, decision.rule_name, decision.flags) == (priority, rule, flags)
    assert decision.priority.value in decision.explanation
    if rule is None:
        assert decision.rule_number is None and "default" in decision.explanation


def test_explanation_cites_the_evidence() -> None:
    decision = priority_for(
        Findings(_labels(rightsided_pe=True, rv_lv_ratio_gte_1=True), {}), {"PatientAge": "066Y"}, SHIPPED
    )
    assert decision.explanation == (
        'rule 2 "Acute PE with RV/LV >= 1" → STAT: acute_pe is true; rv_lv_ratio_gte_1 is true'
    )
    assert decision.queue_priority == Priority.STAT.queue_priority
    assert decision.to_dict()["rule_number"] == 2


def test_derived_labels() -> None:
    assert derived_labels(_labels(leftsided_pe=True, rv_lv_ratio_lt_1=True))["acute_pe"] is True
    assert derived_labels(_labels(leftsided_pe=True, chronic_pe=True))["acute_pe"] is False
    assert derived_labels(_labels(negative_exam_for_pe=True)) | {} == _labels(
        negative_exam_for_pe=True, pe_present=False, acute_pe=False
    )
    assert derived_labels({"pe_present_on_image": True})["pe_present"] is True
    assert derived_labels({"pe_present": True, "central_pe": True}).get("acute_pe") is None  # chronic unknown
    assert "pe_present" not in derived_labels({})


def test_missing_label_matches_neither_way() -> None:
    rules = parse_rules(
        '[[rules]]\nname = "set"\npriority = "STAT"\nwhen = { label = "central_pe" }\n'
        '[[rules]]\nname = "unset"\npriority = "URGENT"\nwhen = { label = "central_pe", is = false }\n'
    )
    assert priority_for(Findings({}, {}), {}, rules).rule_name is None


def test_probability_conditions() -> None:
    rules = parse_rules(
        '[[rules]]\nname = "likely central"\npriority = "STAT"\n'
        'when = { probability = "central_pe", gte = 0.5 }\n'
        '[[rules]]\nname = "some PE signal"\npriority = "URGENT"\n'
        'when = { probability = "pe_present", gt = 0.15, lte = 0.5 }\n'
    )
    assert priority_for(Findings({}, {"central_pe": 0.5}), {}, rules).rule_name == "likely central"
    assert priority_for(Findings({}, {"central_pe": 0.49}), {}, rules).rule_name is None
    # pe_present falls back to the window label's study maximum
    d = priority_for(Findings({}, {"pe_present_on_image": 0.3}), {}, rules)
    assert d.rule_name == "some PE signal" and "p(pe_present) = 0.300" in d.explanation
    assert priority_for(Findings({}, {"pe_present": 0.15}), {}, rules).rule_name is None  # gt, not gte


ED_RULES = parse_rules(
    "[[rules]]\n"
    'name = "ED negative"\n'
    'priority = "URGENT"\n'
    "when.all = [\n"
    '  { attribute = "StudyDescription", matches = "(?i)\\\\bED\\\\b|emergency" },\n'
    '  { attribute = "Modality", in = ["CT", "MR"] },\n'
    '  { not = { attribute = "InstitutionName", equals = "Outpatient Clinic" } },\n'
    "]\n"
)


@pytest.mark.parametrize(
    ("attributes", "matched"),
    [
        ({"Modality": "CT", "StudyDescription": "CTPA ED"}, True),
        ({"Modality": "CT", "StudyDescription": "CT chest EMERGENCY protocol"}, True),
        ({"Modality": "CT ", "StudyDescription": "ed ctpa"}, True),  # value padding stripped
        ({"Modality": "CT", "StudyDescription": "CTPA MEDIASTINUM"}, False),  # \b: not inside words
        ({"Modality": "PT", "StudyDescription": "CTPA ED"}, False),
        ({"StudyDescription": "CTPA ED"}, False),  # missing attribute never matches
        ({"Modality": "CT", "StudyDescription": "ED", "InstitutionName": "Outpatient Clinic"}, False),
    ],
)
def test_attribute_conditions(attributes: dict[str, str], matched: bool) -> None:
    decision = priority_for(Findings(_labels(negative_exam_for_pe=True), {}), attributes, ED_RULES)
    assert (decision.rule_name == "ED negative") is matched
    if matched:  # the evidence names the test, never the patient's value
        assert "CTPA" not in decision.explanation and "matches" in decision.explanation


@pytest.mark.parametrize(
    ("attributes", "years"),
    [
        ({"PatientAge": "066Y"}, 66.0),
        ({"PatientAge": "030M"}, 2.5),
        ({"PatientAge": "052W"}, 52 * 7 / 365.2425),
        ({"PatientAge": "010D", "PatientBirthDate": "19000101", "StudyDate": "20260101"}, 10 / 365.2425),
        ({"PatientBirthDate": "19600315", "StudyDate": "20260315"}, 66.0),
        ({"PatientBirthDate": "19600316", "StudyDate": "20260315"}, pytest.approx(65.997, abs=1e-3)),
        ({"PatientBirthDate": "1960.03.15", "StudyDate": "20260315"}, 66.0),
        ({"PatientAge": "", "PatientBirthDate": "20000229", "StudyDate": "20010301"}, 1.0),
        ({"PatientAge": "66"}, None),
        ({"PatientBirthDate": "20300101", "StudyDate": "20260101"}, None),
        ({"PatientBirthDate": "19601340", "StudyDate": "20260101"}, None),
        ({}, None),
    ],
)
def test_patient_age(attributes: dict[str, str], years: float | None) -> None:
    got = patient_age_years(attributes)
    assert got == (years if years is None else pytest.approx(years))


AGE_RULES = parse_rules(
    '[[rules]]\nname = "child"\npriority = "STAT"\nwhen = { age_years = { lt = 18 } }\n'
    '[[rules]]\nname = "adult"\npriority = "URGENT"\nwhen = { age_years = { gte = 18, lt = 65 } }\n'
    '[[rules]]\nname = "senior"\npriority = "ROUTINE"\nflags = ["senior"]\nwhen = { age_years = { gte = 65 } }\n'
)


@pytest.mark.parametrize(
    ("attributes", "rule"),
    [
        ({"PatientAge": "017Y"}, "child"),
        ({"PatientAge": "200M"}, "child"),  # 16.7 years
        ({"PatientAge": "018Y"}, "adult"),
        ({"PatientAge": "064Y"}, "adult"),
        ({"PatientBirthDate": "19610316", "StudyDate": "20260315"}, "adult"),  # the day before turning 65
        ({"PatientAge": "065Y"}, "senior"),
        ({}, None),
    ],
)
def test_age_band(attributes: dict[str, str], rule: str | None) -> None:
    assert priority_for(Findings({}, {}), attributes, AGE_RULES).rule_name == rule


# -- properties ---------------------------------------------------------------

_label_sets = st.fixed_dictionaries({name: st.booleans() for name in RULE_LABELS})
_probabilities = st.dictionaries(
    st.sampled_from([n for n in RULE_LABELS if n != "acute_pe"]), st.floats(0.0, 1.0), max_size=len(RULE_LABELS)
)
_priorities = st.sampled_from(list(Priority))


@st.composite
def _rule(draw: st.DrawFn, index: int) -> Rule:
    if draw(st.booleans()):
        when: LabelCondition | ProbabilityCondition = LabelCondition.model_validate(
            {"label": draw(st.sampled_from(RULE_LABELS)), "is": draw(st.booleans())}
        )
    else:
        when = ProbabilityCondition.model_validate(
            {"probability": draw(st.sampled_from(["central_pe", "pe_present", "indeterminate"])), "gte": draw(st.floats(0, 1))}
        )
    return Rule.model_validate({"name": f"rule {index}", "priority": draw(_priorities), "when": when})


@st.composite
def _rule_sets(draw: st.DrawFn) -> RuleSet:
    n = draw(st.integers(0, 6))
    rules = [draw(_rule(i)) for i in range(n)]
    return RuleSet(rules=rules, default_priority=draw(_priorities))


def _oracle(rule: Rule, labels: dict[str, bool], probabilities: dict[str, float]) -> bool:
    cond = rule.when
    if isinstance(cond, LabelCondition):
        return labels[cond.label] == cond.is_
    if not isinstance(cond, ProbabilityCondition) or cond.gte is None:
        raise TypeError(cond)
    p = probabilities.get(cond.probability)
    return p is not None and p >= cond.gte


@settings(max_examples=300, deadline=None)
@given(labels=_label_sets, probabilities=_probabilities, rules=_rule_sets())
def test_exactly_one_priority_and_first_match_wins(
    labels: dict[str, bool], probabilities: dict[str, float], rules: RuleSet
) -> None:
    decision = priority_for(Findings(labels, probabilities), {}, rules)
    assert isinstance(decision.priority, Priority)
    matching = [i for i, r in enumerate(rules.rules) if _oracle(r, labels, probabilities)]
    if matching:
        first = rules.rules[matching[0]]
        assert (decision.rule_number, decision.rule_name) == (matching[0] + 1, first.name)
        assert decision.priority is first.priority
    else:
        assert decision.rule_name is None and decision.priority is rules.default_priority
    # pure: the same inputs give the same decision
    assert priority_for(Findings(dict(labels), dict(probabilities)), {}, rules) == decision


@st.composite
def _consistent_labels(draw: st.DrawFn) -> dict[str, bool]:
    """Label sets that satisfy the challenge's consistency rules (MODEL.md)."""
    labels = {name: False for name in STUDY_LABELS}
    if draw(st.booleans()):  # positive
        labels[draw(st.sampled_from(["rv_lv_ratio_gte_1", "rv_lv_ratio_lt_1"]))] = True
        sides = draw(st.sets(st.sampled_from(["central_pe", "leftsided_pe", "rightsided_pe"]), min_size=1))
        labels.update(dict.fromkeys(sides, True))
        chronic = draw(st.sampled_from([None, "chronic_pe", "acute_and_chronic_pe"]))
        if chronic:
            labels[chronic] = True
    else:
        labels[draw(st.sampled_from(["negative_exam_for_pe", "indeterminate"]))] = True
    return labels


@settings(max_examples=300, deadline=None)
@given(labels=_consistent_labels(), probabilities=_probabilities)
def test_shipped_defaults_on_any_consistent_findings(labels: dict[str, bool], probabilities: dict[str, float]) -> None:
    decision = priority_for(Findings(labels, probabilities), {}, SHIPPED)
    positive = any(labels[n] for n in PE_SPECIFIC_LABELS)
    acute = positive and not (labels["chronic_pe"] or labels["acute_and_chronic_pe"])
    if labels["central_pe"] or (acute and labels["rv_lv_ratio_gte_1"]):
        expected = Priority.STAT
    elif positive:
        expected = Priority.URGENT
    else:
        expected = Priority.ROUTINE
    assert decision.priority is expected
    assert decision.flags == (("review",) if labels["indeterminate"] else ())
