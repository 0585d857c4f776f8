"""Priority rules: the declarative schema an admin edits (``config/rules.toml``).

A rule set is an ordered list of rules; the first rule whose condition holds
decides the triage priority (STAT / URGENT / ROUTINE) and its flags; when no
rule matches, ``default_priority`` applies. Conditions form a small tree:
``all`` / ``any`` / ``not`` over leaves that read

* a consistent label:       ``{ label = "central_pe", is = true }``
* a probability:            ``{ probability = "central_pe", gte = 0.5 }``
* a DICOM attribute:        ``{ attribute = "StudyDescription", matches = "(?i)ED|emergency" }``
* the patient's age band:   ``{ age_years = { gte = 18, lt = 65 } }``

Everything is validated once, here (regular expressions are compiled at
validation; nothing is ever evaluated as code). Errors name the rule (its
position and name) and the field, e.g.
``rule 2 "Acute PE" (rules[1]) when.all[0].label: unknown label 'acute'``.
"""

from __future__ import annotations

import enum
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from pe_triage_node.config import check_regex
from pe_triage_node.patterns import search
from pe_triage_node.errors import PETriageError
from pe_triage_node.inference.labels import PE_SPECIFIC, STUDY_LABELS, WINDOW_LABEL

# -- label names (RSNA STR PE challenge names, verbatim; MODEL.md) -----------

PE_SPECIFIC_LABELS = PE_SPECIFIC
# Study positive: some window has pe_present_on_image > threshold.
PE_PRESENT = "pe_present"
# Derived: positive with neither chronic label (MODEL.md "Acute PE").
ACUTE_PE = "acute_pe"
RULE_LABELS: tuple[str, ...] = (PE_PRESENT, ACUTE_PE, *STUDY_LABELS)

# DICOM attributes (PS3.6 keywords) that rules may read. The worker copies
# these from the analysed series into ``results.attributes`` so that replays
# see what the live rules saw. PatientBirthDate/StudyDate feed ``age_years``.
RULE_ATTRIBUTES: tuple[str, ...] = (
    "Modality",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "BodyPartExamined",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
    "AdmittingDiagnosesDescription",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "StationName",
    "Manufacturer",
    "ManufacturerModelName",
    "ConvolutionKernel",
    "ContrastBolusAgent",
    "PatientSex",
    "PatientAge",
    "StudyDate",
    "StudyTime",
)
AGE_ATTRIBUTES: tuple[str, ...] = ("PatientAge", "PatientBirthDate", "StudyDate")
STORED_ATTRIBUTES: tuple[str, ...] = (*RULE_ATTRIBUTES, "PatientBirthDate")

_FLAG_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


# -- priorities ---------------------------------------------------------------


class Priority(str, enum.Enum):
    """Triage priority of a study on the radiologists' worklist."""

    STAT = "STAT"
    URGENT = "URGENT"
    ROUTINE = "ROUTINE"

    @property
    def rank(self) -> int:
        """2 for STAT, 1 for URGENT, 0 for ROUTINE (higher is more urgent)."""
        return _RANK[self]

    @property
    def queue_priority(self) -> int:
        """The ``jobs.priority`` value for work on a study of this priority (higher first)."""
        return _QUEUE_PRIORITY[self]


_RANK = {Priority.STAT: 2, Priority.URGENT: 1, Priority.ROUTINE: 0}
_QUEUE_PRIORITY = {Priority.STAT: 100, Priority.URGENT: 50, Priority.ROUTINE: 0}


def priority_rank(priority: Priority | str) -> int:
    """Rank of a priority (STAT 2 > URGENT 1 > ROUTINE 0)."""
    return Priority(priority).rank


def queue_priority(priority: Priority | str) -> int:
    """Numeric queue priority (STAT 100, URGENT 50, ROUTINE 0; ``jobs.priority``, higher first)."""
    return Priority(priority).queue_priority


def most_urgent(priorities: Sequence[Priority | str]) -> Priority:
    """The most urgent of ``priorities`` (ROUTINE for an empty sequence)."""
    ranked = [Priority(p) for p in priorities]
    return max(ranked, key=lambda p: p.rank, default=Priority.ROUTINE)


def is_more_urgent(a: Priority | str, b: Priority | str) -> bool:
    """True when ``a`` outranks ``b`` (STAT > URGENT > ROUTINE)."""
    return priority_rank(a) > priority_rank(b)


# -- evaluation context -------------------------------------------------------


@dataclass(frozen=True)
class EvaluationContext:
    """What conditions read: labels (with the derived ones), probabilities, attributes, age."""

    labels: Mapping[str, bool]
    probabilities: Mapping[str, float]
    attributes: Mapping[str, str]
    age_years: float | None


def _check_label(name: str) -> str:
    if name == WINDOW_LABEL:
        raise ValueError(
            f"{WINDOW_LABEL!r} is a window-level label; use {PE_PRESENT!r} for a positive study"
        )
    if name not in RULE_LABELS:
        raise ValueError(f"unknown label {name!r}; expected one of: {', '.join(RULE_LABELS)}")
    return name


def _fmt(x: float) -> str:
    return f"{x:g}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=False)


class _Node(_Strict):
    """A condition."""

    def evaluate(self, ctx: EvaluationContext) -> tuple[bool, str]:  # pragma: no cover - abstract
        """Whether the condition holds, and the evidence in words (no patient values)."""
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        """The condition in words, as an admin would read it."""
        raise NotImplementedError


class LabelCondition(_Node):
    """A consistent study label is (or is not) set: ``{ label = "central_pe", is = true }``."""

    label: str
    is_: StrictBool = Field(True, alias="is")

    _name = field_validator("label")(classmethod(lambda cls, v: _check_label(v)))

    def describe(self) -> str:
        return f"{self.label} is {'true' if self.is_ else 'false'}"

    def evaluate(self, ctx: EvaluationContext) -> tuple[bool, str]:
        value = ctx.labels.get(self.label)
        if value is None:
            return False, f"{self.label} not available"
        return value == self.is_, f"{self.label} is {'true' if value else 'false'}"


class _Bounds(_Node):
    gte: float | None = None
    gt: float | None = None
    lte: float | None = None
    lt: float | None = None

    @model_validator(mode="after")
    def _consistent(self) -> _Bounds:
        lower = [b for b in (self.gte, self.gt) if b is not None]
        upper = [b for b in (self.lte, self.lt) if b is not None]
        if not lower and not upper:
            raise ValueError("give at least one bound: gte, gt, lte or lt")
        if len(lower) > 1:
            raise ValueError("give gte or gt, not both")
        if len(upper) > 1:
            raise ValueError("give lte or lt, not both")
        if lower and upper and lower[0] > upper[0]:
            raise ValueError(f"empty range: lower bound {lower[0]} is above upper bound {upper[0]}")
        return self

    def _contains(self, x: float) -> bool:
        return (
            (self.gte is None or x >= self.gte)
            and (self.gt is None or x > self.gt)
            and (self.lte is None or x <= self.lte)
            and (self.lt is None or x < self.lt)
        )

    def _range_text(self) -> str:
        parts = []
        for op, sym in (("gte", "≥"), ("gt", ">"), ("lte", "≤"), ("lt", "<")):
            v = getattr(self, op)
            if v is not None:
                parts.append(f"{sym} {_fmt(v)}")
        return " and ".join(parts)


class ProbabilityCondition(_Bounds):
    """A model probability in a range: ``{ probability = "central_pe", gte = 0.5 }``."""

    probability: str
    gte: float | None = Field(None, ge=0.0, le=1.0)
    gt: float | None = Field(None, ge=0.0, le=1.0)
    lte: float | None = Field(None, ge=0.0, le=1.0)
    lt: float | None = Field(None, ge=0.0, le=1.0)

    @field_validator("probability")
    @classmethod
    def _name(cls, v: str) -> str:
        _check_label(v)
        if v == ACUTE_PE:
            raise ValueError(f"{ACUTE_PE!r} is derived from labels and has no probability")
        return v

    def describe(self) -> str:
        return f"p({self.probability}) {self._range_text()}"

    def evaluate(self, ctx: EvaluationContext) -> tuple[bool, str]:
        p = ctx.probabilities.get(self.probability)
        if p is None:
            return False, f"p({self.probability}) not available"
        return self._contains(p), f"p({self.probability}) = {p:.3f}"


class AttributeCondition(_Node):
    """A DICOM attribute (PS3.6 keyword) equals / is one of / matches a regular expression."""

    attribute: str
    equals: str | None = None
    in_: list[str] | None = Field(None, alias="in", min_length=1)
    matches: str | None = None

    @field_validator("attribute")
    @classmethod
    def _keyword(cls, v: str) -> str:
        if v not in RULE_ATTRIBUTES:
            raise ValueError(
                f"attribute {v!r} is not one rules can read; expected one of: {', '.join(RULE_ATTRIBUTES)}"
                " (for the patient's age use age_years)"
            )
        return v

    @field_validator("matches")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        return check_regex(v)

    @model_validator(mode="after")
    def _one_test(self) -> AttributeCondition:
        given = [k for k, v in (("equals", self.equals), ("in", self.in_), ("matches", self.matches)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of equals, in, matches (got {', '.join(given) or 'none'})")
        return self

    def describe(self) -> str:
        if self.equals is not None:
            return f"{self.attribute} = {self.equals!r}"
        if self.in_ is not None:
            return f"{self.attribute} in [{', '.join(repr(x) for x in self.in_)}]"
        return f"{self.attribute} matches {self.matches!r}"

    def evaluate(self, ctx: EvaluationContext) -> tuple[bool, str]:
        raw = ctx.attributes.get(self.attribute)
        if raw is None:
            return False, f"{self.attribute} absent"
        value = str(raw).strip()
        if self.equals is not None:
            ok = value == self.equals
        elif self.in_ is not None:
            ok = value in self.in_
        else:
            ok = self.matches is not None and search(self.matches, value)
        # The attribute's value may identify the patient: the evidence names only the test.
        return ok, self.describe() if ok else f"not ({self.describe()})"


class AgeBand(_Bounds):
    """Bounds on the patient's age in years (fractions allowed: 0.5 = six months)."""

    gte: float | None = Field(None, ge=0.0, le=200.0)
    gt: float | None = Field(None, ge=0.0, le=200.0)
    lte: float | None = Field(None, ge=0.0, le=200.0)
    lt: float | None = Field(None, ge=0.0, le=200.0)


class AgeCondition(_Node):
    """The patient's age band: ``{ age_years = { gte = 18, lt = 65 } }``.

    Age from PatientAge (``066Y``, ``030M``, ``012W``, ``005D``), else from
    PatientBirthDate and StudyDate; unknown age never matches.
    """

    age_years: AgeBand

    def describe(self) -> str:
        return f"age {self.age_years._range_text()} years"

    def evaluate(self, ctx: EvaluationContext) -> tuple[bool, str]:
        if ctx.age_years is None:
            return False, "age unknown"
        ok = self.age_years._contains(ctx.age_years)
        return ok, self.describe() if ok else f"not ({self.describe()})"


class AllCondition(_Node):
    """Every sub-condition holds: ``{ all = [ ..., ... ] }``."""

    all: list[Condition] = Field(min_length=1)

    def describe(self) -> str:
        return " and ".join(_paren(c) for c in self.all)

    def evaluate(self, ctx: EvaluationContext) -> tuple[bool, str]:
        evidence = []
        for c in self.all:
            ok, why = c.evaluate(ctx)
            if not ok:
                return False, why
            evidence.append(why)
        return True, "; ".join(evidence)


class AnyCondition(_Node):
    """At least one sub-condition holds: ``{ any = [ ..., ... ] }``."""

    any: list[Condition] = Field(min_length=1)

    def describe(self) -> str:
        return " or ".join(_paren(c) for c in self.any)

    def evaluate(self, ctx: EvaluationContext) -> tuple[bool, str]:
        misses = []
        for c in self.any:
            ok, why = c.evaluate(ctx)
            if ok:
                return True, why
            misses.append(why)
        return False, "; ".join(misses)


class NotCondition(_Node):
    """The sub-condition does not hold: ``{ not = { ... } }``."""

    not_: Condition = Field(alias="not")

    def describe(self) -> str:
        return f"not ({self.not_.describe()})"

    def evaluate(self, ctx: EvaluationContext) -> tuple[bool, str]:
        ok, why = self.not_.evaluate(ctx)
        return (not ok), (f"not ({self.not_.describe()}): {why}" if not ok else why)


def _paren(c: _Node) -> str:
    text = c.describe()
    return f"({text})" if isinstance(c, (AllCondition, AnyCondition)) else text


_KINDS = ("all", "any", "not", "label", "probability", "attribute", "age_years")
_TAG_SUFFIX = " condition"  # tags are dropped from error locations


def _condition_kind(value: Any) -> str | None:
    if isinstance(value, Mapping):
        keys = [k for k in _KINDS if k in value]
        return f"{keys[0]}{_TAG_SUFFIX}" if len(keys) == 1 else None
    for cls, kind in _MODEL_KINDS.items():
        if isinstance(value, cls):
            return f"{kind}{_TAG_SUFFIX}"
    return None


Condition = Annotated[
    Union[
        Annotated[AllCondition, Tag("all" + _TAG_SUFFIX)],
        Annotated[AnyCondition, Tag("any" + _TAG_SUFFIX)],
        Annotated[NotCondition, Tag("not" + _TAG_SUFFIX)],
        Annotated[LabelCondition, Tag("label" + _TAG_SUFFIX)],
        Annotated[ProbabilityCondition, Tag("probability" + _TAG_SUFFIX)],
        Annotated[AttributeCondition, Tag("attribute" + _TAG_SUFFIX)],
        Annotated[AgeCondition, Tag("age_years" + _TAG_SUFFIX)],
    ],
    Discriminator(
        _condition_kind,
        custom_error_type="condition_kind",
        custom_error_message=(
            "a condition is a table with exactly one of: all, any, not, label, probability, "
            "attribute, age_years"
        ),
    ),
]

_MODEL_KINDS: dict[type[_Node], str] = {
    AllCondition: "all",
    AnyCondition: "any",
    NotCondition: "not",
    LabelCondition: "label",
    ProbabilityCondition: "probability",
    AttributeCondition: "attribute",
    AgeCondition: "age_years",
}

for _model in (AllCondition, AnyCondition, NotCondition):
    _model.model_rebuild()


class Rule(_Strict):
    """One rule: when the condition holds, the study gets ``priority`` and ``flags``."""

    name: str = Field(min_length=1, max_length=200)
    priority: Priority
    flags: list[str] = Field(default_factory=list)
    comment: str | None = None
    when: Condition

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("a rule name cannot be blank")
        return v.strip()

    @field_validator("flags")
    @classmethod
    def _flags(cls, v: list[str]) -> list[str]:
        for flag in v:
            if not _FLAG_RE.match(flag):
                raise ValueError(
                    f"flag {flag!r} must be lower-case letters, digits, '-' or '_' (at most 32, e.g. \"review\")"
                )
        if len(set(v)) != len(v):
            raise ValueError("flags repeat")
        return v

    def describe(self) -> str:
        flags = f" [{', '.join(self.flags)}]" if self.flags else ""
        return f"{self.name} → {self.priority.value}{flags} when {self.when.describe()}"


class RuleSet(_Strict):
    """An ordered list of rules (first match wins) and the priority when none matches."""

    rules: list[Rule] = Field(default_factory=list)
    default_priority: Priority = Priority.ROUTINE
    default_flags: list[str] = Field(default_factory=list)

    @field_validator("default_flags")
    @classmethod
    def _flags(cls, v: list[str]) -> list[str]:
        return Rule._flags(v)

    @model_validator(mode="after")
    def _unique_names(self) -> RuleSet:
        seen: dict[str, int] = {}
        for i, rule in enumerate(self.rules):
            if rule.name in seen:
                raise ValueError(
                    f"rule {i + 1} repeats the name {rule.name!r} of rule {seen[rule.name] + 1}; names must be unique"
                )
            seen[rule.name] = i
        return self

    def describe(self) -> list[str]:
        """The rules in order, one line each, then the default."""
        lines = [f"{i}. {rule.describe()}" for i, rule in enumerate(self.rules, start=1)]
        flags = f" [{', '.join(self.default_flags)}]" if self.default_flags else ""
        lines.append(f"otherwise → {self.default_priority.value}{flags}")
        return lines


# -- loading and errors -------------------------------------------------------


@dataclass(frozen=True)
class RuleIssue:
    """One validation problem: which rule (1-based position and name), which field, why."""

    rule_number: int | None
    rule_name: str | None
    field: str
    message: str

    def __str__(self) -> str:
        if self.rule_number is None:
            where = self.field or "rules file"
        else:
            name = f' "{self.rule_name}"' if self.rule_name else ""
            where = f"rule {self.rule_number}{name} (rules[{self.rule_number - 1}])"
            if self.field:
                where += f" {self.field}"
        return f"{where}: {self.message}"


class RulesError(PETriageError):
    """Invalid priority rules; ``issues`` name the rule and field of each problem."""

    def __init__(self, source: str, issues: Sequence[RuleIssue]) -> None:
        self.source = source
        self.issues = list(issues)
        super().__init__(
            f"invalid priority rules ({source}):\n" + "\n".join(f"  {issue}" for issue in self.issues)
        )


def _field_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.endswith(_TAG_SUFFIX):
            continue  # union tag, not a field
        else:
            out += f".{part}" if out else part
    return out


def _issues(exc: ValidationError, data: Mapping[str, Any]) -> list[RuleIssue]:
    raw_rules = data.get("rules")
    issues = []
    for err in exc.errors():
        loc = err["loc"]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown key {loc[-1]!r}"
        if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
            number = loc[1] + 1
            name = None
            if isinstance(raw_rules, list) and loc[1] < len(raw_rules) and isinstance(raw_rules[loc[1]], Mapping):
                raw_name = raw_rules[loc[1]].get("name")
                name = raw_name if isinstance(raw_name, str) else None
            issues.append(RuleIssue(number, name, _field_path(loc[2:]), msg))
        else:
            issues.append(RuleIssue(None, None, _field_path(loc), msg))
    return issues


def rules_from_mapping(data: Mapping[str, Any], source: str = "<rules>") -> RuleSet:
    """Validate already-parsed rules data; raises :class:`RulesError`."""
    try:
        return RuleSet.model_validate(dict(data))
    except ValidationError as exc:
        raise RulesError(source, _issues(exc, data)) from exc


def parse_rules(toml_text: str, source: str = "<rules>") -> RuleSet:
    """Parse and validate rules from TOML text; raises :class:`RulesError` naming rule and field."""
    try:
        data = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(source, [RuleIssue(None, None, "", f"not valid TOML: {exc}")]) from exc
    return rules_from_mapping(data, source)


def load_rules(path: Path) -> RuleSet:
    """Read and validate a rules file; raises :class:`RulesError` (also when unreadable)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError(str(path), [RuleIssue(None, None, "", f"cannot read the file: {exc}")]) from exc
    return parse_rules(text, str(path))
