"""Triage priority rules: schema (``config/rules.toml``), the pure engine, the store.

``priority_for(findings, attributes, rules)`` decides STAT / URGENT / ROUTINE;
the store (``pe_triage_node.rules.store``, imports SQLAlchemy) keeps the rules
in force with their history and replays rules over stored results.
"""

from __future__ import annotations

from pe_triage_node.rules.engine import (
    Findings,
    FindingsLike,
    PriorityDecision,
    Triage,
    derived_labels,
    header_attributes,
    patient_age_years,
    priority_for,
    study_findings,
    triage,
)
from pe_triage_node.rules.schema import (
    ACUTE_PE,
    PE_PRESENT,
    RULE_ATTRIBUTES,
    RULE_LABELS,
    STORED_ATTRIBUTES,
    Priority,
    Rule,
    RuleIssue,
    RuleSet,
    RulesError,
    is_more_urgent,
    load_rules,
    most_urgent,
    parse_rules,
    priority_rank,
    queue_priority,
)

__all__ = [
    "ACUTE_PE",
    "PE_PRESENT",
    "RULE_ATTRIBUTES",
    "RULE_LABELS",
    "STORED_ATTRIBUTES",
    "Findings",
    "FindingsLike",
    "Priority",
    "PriorityDecision",
    "Rule",
    "RuleIssue",
    "RuleSet",
    "RulesError",
    "Triage",
    "derived_labels",
    "header_attributes",
    "is_more_urgent",
    "load_rules",
    "most_urgent",
    "parse_rules",
    "patient_age_years",
    "priority_for",
    "priority_rank",
    "queue_priority",
    "study_findings",
    "triage",
]
