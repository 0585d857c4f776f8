"""The rules in force, their history, and replays over stored results.

The active rules live in ``rule_sets`` (one active row; every change adds a
row recording when, by whom, why, the new text and the text it replaced).
Until a rule set is activated, the node uses ``config/rules.toml`` (relative to
the working directory, like ``config/node.toml``), else the identical copy
packaged with the software.

Functions take a :class:`~sqlalchemy.orm.Session` inside the caller's
transaction (``with Session(engine) as s, s.begin(): ...``) and only flush.
"""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pe_triage_node.db.models import RuleSetRecord, TriageResult
from pe_triage_node.errors import PETriageError
from pe_triage_node.rules.engine import Findings, PriorityDecision, priority_for
from pe_triage_node.rules.schema import Priority, RuleSet, is_more_urgent, parse_rules, priority_rank

log = logging.getLogger(__name__)

DEFAULT_RULES_PATH = Path("config/rules.toml")
PACKAGED_RULES = "default_rules.toml"
# Arbitrary constant ("RULE") naming the advisory lock that serialises rule changes on PostgreSQL.
_PG_RULES_LOCK = 0x52554C45


class RuleChangeRefused(PETriageError):
    """A change of the active rules that cannot be made (blank author/comment, unknown rule set)."""


# -- the rules in force -------------------------------------------------------


@dataclass(frozen=True)
class ActiveRuleSet:
    """The rules in force and where they come from (``rule_set_id`` None: a file)."""

    rules: RuleSet
    toml_text: str
    source: str  # "rule set 7", "config/rules.toml", "packaged default"
    rule_set_id: int | None


def packaged_rules_text() -> str:
    """The shipped default rules (identical to ``config/rules.toml`` in the repository)."""
    return resources.files("pe_triage_node.rules").joinpath(PACKAGED_RULES).read_text(encoding="utf-8")


def fallback_rules_text(path: Path | None = None) -> tuple[str, str]:
    """``(text, source)`` of the rules used while no rule set is active.

    ``path`` when given (it must exist), else ``./config/rules.toml`` when
    present, else the packaged default.
    """
    if path is not None:
        return path.read_text(encoding="utf-8"), str(path)
    if DEFAULT_RULES_PATH.is_file():
        return DEFAULT_RULES_PATH.read_text(encoding="utf-8"), str(DEFAULT_RULES_PATH)
    return packaged_rules_text(), "packaged default"


def active_record(session: Session) -> RuleSetRecord | None:
    """The active ``rule_sets`` row, or ``None`` when the rules file is in force."""
    return session.scalars(select(RuleSetRecord).where(RuleSetRecord.active.is_(True))).first()


def active_rule_set(session: Session, fallback: Path | None = None) -> ActiveRuleSet:
    """The rules in force with their source; raises ``RulesError`` if they do not validate."""
    row = active_record(session)
    if row is not None:
        source = f"rule set {row.id}"
        return ActiveRuleSet(parse_rules(row.toml_text, source), row.toml_text, source, row.id)
    text, source = fallback_rules_text(fallback)
    return ActiveRuleSet(parse_rules(text, source), text, source, None)


def active_rules(session: Session, fallback: Path | None = None) -> RuleSet:
    """The rules in force: the active rule set, else the rules file / packaged default."""
    return active_rule_set(session, fallback).rules


# -- changes and history ------------------------------------------------------


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _require(value: str, what: str) -> str:
    value = value.strip()
    if not value:
        raise RuleChangeRefused(f"a change of the active rules needs a non-blank {what}")
    return value


def _switch(
    session: Session,
    toml_text: str,
    author: str,
    comment: str,
    action: str,
    restored_from_id: int | None,
    fallback: Path | None,
) -> RuleSetRecord:
    author = _require(author, "author")
    comment = _require(comment, "comment")
    parse_rules(toml_text, "new rules")  # validate first: RulesError names rule and field
    # Serialise changes: on PostgreSQL a transaction-scoped advisory lock (so the
    # second change sees the first one's row); SQLite's BEGIN IMMEDIATE already
    # does. The partial unique index refuses a second active row in any case.
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_RULES_LOCK})
    current = session.scalars(select(RuleSetRecord).where(RuleSetRecord.active.is_(True))).first()
    if current is not None:
        previous_text, previous_source = current.toml_text, f"rule set {current.id}"
        session.execute(update(RuleSetRecord).where(RuleSetRecord.id == current.id).values(active=False))
    else:
        previous_text, previous_source = fallback_rules_text(fallback)
    row = RuleSetRecord(
        author=author,
        comment=comment,
        toml_text=toml_text,
        sha256=_sha256(toml_text),
        active=True,
        action=action,
        previous_id=current.id if current is not None else None,
        previous_toml_text=previous_text,
        previous_source=previous_source,
        restored_from_id=restored_from_id,
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError as exc:
        raise RuleChangeRefused("another change of the active rules was made at the same time; retry") from exc
    log.info(
        "priority rules changed: rule set %d active (%s, replaces %s)", row.id, action, previous_source
    )
    return row


def activate(
    session: Session, toml_text: str, author: str, comment: str, fallback: Path | None = None
) -> RuleSetRecord:
    """Validate ``toml_text`` and make it the active rules, recording the change.

    Raises ``RulesError`` (invalid rules, nothing changed) or
    :class:`RuleChangeRefused` (blank author or comment).
    """
    return _switch(session, toml_text, author, comment, "activate", None, fallback)


def rollback(
    session: Session, rule_set_id: int, author: str, comment: str, fallback: Path | None = None
) -> RuleSetRecord:
    """Make an earlier rule set's text active again, as a new recorded change."""
    earlier = session.get(RuleSetRecord, rule_set_id)
    if earlier is None:
        raise RuleChangeRefused(f"no rule set {rule_set_id}")
    return _switch(session, earlier.toml_text, author, comment, "rollback", earlier.id, fallback)


@dataclass(frozen=True)
class RuleSetChange:
    """One recorded change of the active rules: when, by whom, why, old and new text."""

    rule_set_id: int
    created_at: dt.datetime
    author: str
    comment: str
    action: str  # activate / rollback
    active: bool
    sha256: str
    previous_id: int | None
    previous_source: str | None
    restored_from_id: int | None
    old_text: str | None
    new_text: str

    def diff(self) -> str:
        """Unified diff from the old rules to the new ones."""
        return "".join(
            difflib.unified_diff(
                (self.old_text or "").splitlines(keepends=True),
                self.new_text.splitlines(keepends=True),
                fromfile=self.previous_source or "(none)",
                tofile=f"rule set {self.rule_set_id}",
            )
        )


def history(session: Session, limit: int | None = None) -> list[RuleSetChange]:
    """Every change of the active rules, newest first."""
    stmt = select(RuleSetRecord).order_by(RuleSetRecord.id.desc())
    if limit is not None:
        stmt = stmt.limit(limit)
    return [
        RuleSetChange(
            rule_set_id=row.id,
            created_at=row.created_at,
            author=row.author,
            comment=row.comment,
            action=row.action,
            active=row.active,
            sha256=row.sha256,
            previous_id=row.previous_id,
            previous_source=row.previous_source,
            restored_from_id=row.restored_from_id,
            old_text=row.previous_toml_text,
            new_text=row.toml_text,
        )
        for row in session.scalars(stmt)
    ]


# -- replay -------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayOutcome:
    """One stored result re-decided under other rules."""

    result_id: int
    study_instance_uid: str
    series_instance_uid: str
    created_at: dt.datetime
    old_priority: str
    old_rule: str | None
    old_flags: tuple[str, ...]
    decision: PriorityDecision

    @property
    def priority_changed(self) -> bool:
        return self.old_priority != self.decision.priority.value


@dataclass(frozen=True)
class PriorityChange:
    """A study whose priority the replayed rules would change (old → new, rule names)."""

    result_id: int
    study_instance_uid: str
    series_instance_uid: str
    created_at: dt.datetime
    old_priority: str
    new_priority: Priority
    old_rule: str | None
    new_rule: str | None
    old_flags: tuple[str, ...]
    new_flags: tuple[str, ...]
    explanation: str

    @property
    def escalated(self) -> bool:
        """True when the new priority is more urgent than the stored one."""
        try:
            return is_more_urgent(self.new_priority, self.old_priority)
        except ValueError:  # stored priority unknown to this code
            return True

    @property
    def rank_delta(self) -> int:
        """New rank minus old rank (+2: ROUTINE → STAT); 0 when the old priority is unknown."""
        try:
            return self.new_priority.rank - priority_rank(self.old_priority)
        except ValueError:
            return 0


def _json_dict(text: str, what: str, result_id: int) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        log.warning("result %d: %s is not valid JSON; replayed as empty", result_id, what)
        return {}
    if not isinstance(value, dict):
        log.warning("result %d: %s is not a JSON object; replayed as empty", result_id, what)
        return {}
    return value


def _flags(text: str) -> tuple[str, ...]:
    try:
        value = json.loads(text or "[]")
    except json.JSONDecodeError:
        return ()
    return tuple(str(f) for f in value) if isinstance(value, list) else ()


class ReplayTimedOut(PETriageError):
    """The replay passed its deadline; the message says after how many results."""


def replay_results(
    session: Session, rules: RuleSet, limit: int = 100, *, deadline: float | None = None
) -> list[ReplayOutcome]:
    """Re-decide the ``limit`` most recent stored results under ``rules`` (newest first).

    ``deadline`` (a ``time.monotonic()`` value) is checked between results; each
    result's matching is itself bounded (:mod:`pe_triage_node.patterns`).
    """
    if limit < 1:
        return []
    rows = session.scalars(
        select(TriageResult).order_by(TriageResult.created_at.desc(), TriageResult.id.desc()).limit(limit)
    )
    outcomes: list[ReplayOutcome] = []
    for row in rows:
        if deadline is not None and time.monotonic() > deadline:
            raise ReplayTimedOut(f"stopped at its time limit after {len(outcomes)} results")
        labels = _json_dict(row.labels, "labels", row.id)
        probabilities = _json_dict(row.probabilities, "probabilities", row.id)
        attributes = _json_dict(row.attributes, "attributes", row.id)
        findings = Findings(
            labels={str(k): bool(v) for k, v in labels.items() if v in (True, False)},
            probabilities={
                str(k): float(v)
                for k, v in probabilities.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            },
        )
        attrs = {str(k): str(v) for k, v in attributes.items() if v is not None}
        outcomes.append(
            ReplayOutcome(
                result_id=row.id,
                study_instance_uid=row.study_instance_uid,
                series_instance_uid=row.series_instance_uid,
                created_at=row.created_at,
                old_priority=row.priority,
                old_rule=row.rule_name,
                old_flags=_flags(row.flags),
                decision=priority_for(findings, attrs, rules),
            )
        )
    return outcomes


def replay(session: Session, rules: RuleSet, limit: int = 100, *, deadline: float | None = None) -> list[PriorityChange]:
    """The studies among the ``limit`` most recent results whose priority ``rules`` would change."""
    return [
        PriorityChange(
            result_id=o.result_id,
            study_instance_uid=o.study_instance_uid,
            series_instance_uid=o.series_instance_uid,
            created_at=o.created_at,
            old_priority=o.old_priority,
            new_priority=o.decision.priority,
            old_rule=o.old_rule,
            new_rule=o.decision.rule_name,
            old_flags=o.old_flags,
            new_flags=o.decision.flags,
            explanation=o.decision.explanation,
        )
        for o in replay_results(session, rules, limit, deadline=deadline)
        if o.priority_changed
    ]
