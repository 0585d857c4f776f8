"""Priority rules schema: the shipped file, and errors that name the rule and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from pe_triage_node.patterns import compile_pattern
from pe_triage_node.rules.schema import (
    AttributeCondition,
    Priority,
    RulesError,
    load_rules,
    most_urgent,
    parse_rules,
    priority_rank,
    queue_priority,
)
from pe_triage_node.rules.store import packaged_rules_text

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "config" / "rules.toml"


def _rule(when: str, name: str = "Broken rule", extra: str = "") -> str:
    head = '[[rules]]\nname = "Fine"\npriority = "STAT"\nwhen = { label = "central_pe" }\n\n'
    return head + f'[[rules]]\nname = "{name}"\npriority = "URGENT"\n{extra}when = {when}\n'


def test_shipped_file_is_valid_and_in_the_documented_order() -> None:
    rules = load_rules(SHIPPED)
    assert [(r.name, r.priority, r.flags) for r in rules.rules] == [
        ("Central PE", Priority.STAT, []),
        ("Acute PE with RV/LV >= 1", Priority.STAT, []),
        ("Any PE", Priority.URGENT, []),
        ("Indeterminate quality", Priority.ROUTINE, ["review"]),
    ]
    assert rules.default_priority is Priority.ROUTINE


def test_packaged_default_is_the_shipped_file() -> None:
    assert packaged_rules_text() == SHIPPED.read_text(encoding="utf-8")


def test_readme_example_form_parses() -> None:
    rules = parse_rules('[[rules]]\nname = "Central PE"\npriority = "STAT"\nwhen = { label = "central_pe", is = true }\n')
    assert rules.describe() == ["1. Central PE → STAT when central_pe is true", "otherwise → ROUTINE"]


@pytest.mark.parametrize(
    ("when", "field", "fragment"),
    [
        ('{ label = "centrl_pe" }', "when.label", "unknown label 'centrl_pe'"),
        ('{ label = "pe_present_on_image" }', "when.label", "window-level label"),
        ('{ label = "central_pe", is = "yes" }', "when.is", "boolean"),
        ('{ probability = "central_pe", gte = 1.5 }', "when.gte", "less than or equal to 1"),
        ('{ probability = "central_pe" }', "when", "at least one bound"),
        ('{ probability = "acute_pe", gte = 0.5 }', "when.probability", "no probability"),
        ('{ attribute = "PatientName", equals = "X" }', "when.attribute", "not one rules can read"),
        ('{ attribute = "Modality", matches = "(CT" }', "when.matches", "invalid regular expression"),
        ('{ attribute = "Modality", equals = "CT", in = ["CT"] }', "when", "exactly one of equals, in, matches"),
        ('{ age_years = { gte = 65, lt = 18 } }', "when.age_years", "empty range"),
        ('{ age_years = { over = 65 } }', "when.age_years.over", "unknown key 'over'"),
        ('{ all = [ { label = "central_pe" }, { label = "nope" } ] }', "when.all[1].label", "unknown label 'nope'"),
        ('{ any = [ { not = { attribute = "Modality", in = [] } } ] }', "when.any[0].not.in", "at least 1"),
        ('{ all = [] }', "when.all", "at least 1"),
        ('{ label = "central_pe", probability = "central_pe", gte = 0.1 }', "when", "exactly one of: all, any"),
        ('{ foo = 1 }', "when", "exactly one of: all, any"),
    ],
)
def test_condition_errors_name_rule_and_field(when: str, field: str, fragment: str) -> None:
    with pytest.raises(RulesError) as info:
        parse_rules(_rule(when), "test.toml")
    issues = info.value.issues
    assert any(
        i.rule_number == 2 and i.rule_name == "Broken rule" and i.field == field and fragment in i.message
        for i in issues
    ), [str(i) for i in issues]
    assert f'rule 2 "Broken rule" (rules[1]) {field}:' in str(info.value)


@pytest.mark.parametrize(
    ("extra", "field", "fragment"),
    [
        ('priority = "SOON"\n', "priority", "'STAT', 'URGENT' or 'ROUTINE'"),
        ('flags = ["Review Me"]\n', "flags", "lower-case"),
        ('colour = "red"\n', "colour", "unknown key 'colour'"),
    ],
)
def test_rule_field_errors(extra: str, field: str, fragment: str) -> None:
    text = _rule('{ label = "central_pe" }', extra=extra).replace('priority = "URGENT"\n' + extra, extra)
    with pytest.raises(RulesError) as info:
        parse_rules(text)
    assert any(i.rule_number == 2 and i.field == field and fragment in i.message for i in info.value.issues), str(
        info.value
    )


def test_missing_when_and_duplicate_names() -> None:
    with pytest.raises(RulesError) as info:
        parse_rules('[[rules]]\nname = "No condition"\npriority = "STAT"\n')
    assert str(info.value.issues[0]) == 'rule 1 "No condition" (rules[0]) when: Field required'
    with pytest.raises(RulesError, match="repeats the name 'Fine'"):
        parse_rules(_rule('{ label = "central_pe" }', name="Fine"))


def test_toml_syntax_and_top_level_errors() -> None:
    with pytest.raises(RulesError, match="not valid TOML.*line 2"):
        parse_rules('[[rules]]\nname = "x\n')
    with pytest.raises(RulesError, match="default_priority"):
        parse_rules('default_priority = "LATER"\n')
    with pytest.raises(RulesError, match="unknown key 'rule'"):
        parse_rules('[[rule]]\nname = "typo in the table name"\n')


def test_regex_compiled_at_validation() -> None:
    rules = parse_rules(_rule('{ attribute = "StudyDescription", matches = "(?i)ED|emergency" }'))
    cond = rules.rules[1].when
    assert isinstance(cond, AttributeCondition)
    assert cond.matches is not None and compile_pattern(cond.matches).flags & 2  # IGNORECASE, compiled once (cached)


def test_priority_helpers() -> None:
    assert priority_rank("STAT") > priority_rank(Priority.URGENT) > priority_rank("ROUTINE")
    assert queue_priority("STAT") > queue_priority("URGENT") > queue_priority("ROUTINE") == 0
    assert most_urgent(["ROUTINE", "STAT", "URGENT"]) is Priority.STAT
    assert most_urgent([]) is Priority.ROUTINE
    with pytest.raises(ValueError):
        priority_rank("SOON")
