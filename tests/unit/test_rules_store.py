"""Rules store on SQLite and PostgreSQL: activation history, rollback, replay; the rules CLI."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pe_triage_node.cli import main
from pe_triage_node.db.models import RuleSetRecord, TriageResult
from pe_triage_node.rules.engine import Findings, priority_for
from pe_triage_node.rules.schema import (
    STUDY_LABELS,
    Priority,
    RulesError,
    load_rules,
    parse_rules,
)
from pe_triage_node.rules.store import (
    RuleChangeRefused,
    activate,
    active_record,
    active_rule_set,
    active_rules,
    history,
    packaged_rules_text,
    replay,
    replay_results,
    rollback,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_TEXT = (ROOT / "config" / "rules.toml").read_text(encoding="utf-8")
SHIPPED = parse_rules(SHIPPED_TEXT)
# Every PE is STAT, and ED negatives go to URGENT.
STRICTER = SHIPPED_TEXT.replace('priority = "URGENT"', 'priority = "STAT"') + (
    '\n[[rules]]\nname = "ED negative"\npriority = "URGENT"\n'
    'when = { attribute = "StudyDescription", matches = "(?i)\\\\bED\\\\b" }\n'
)
T0 = dt.datetime(2026, 11, 1, 8, 0, tzinfo=dt.timezone.utc)


def _labels(**set_: bool) -> dict[str, bool]:
    labels = {name: False for name in STUDY_LABELS}
    labels.update(set_)
    return labels


def _store_result(
    session: Session,
    study: str,
    labels: Mapping[str, bool],
    attributes: Mapping[str, str],
    minutes: int,
    probabilities: Mapping[str, float] | None = None,
) -> int:
    """A results row as the worker writes it, decided by the shipped rules."""
    decision = priority_for(Findings(labels, probabilities or {}), attributes, SHIPPED)
    row = TriageResult(
        study_instance_uid=study,
        series_instance_uid=study + ".1",
        generation=0,
        model_version="test-1",
        labels=json.dumps(dict(labels)),
        probabilities=json.dumps(dict(probabilities or {})),
        attributes=json.dumps(dict(attributes)),
        priority=decision.priority.value,
        rule_name=decision.rule_name,
        flags=json.dumps(list(decision.flags)),
        explanation=decision.explanation,
        result_json="{}",
        created_at=T0 + dt.timedelta(minutes=minutes),
    )
    session.add(row)
    session.flush()
    return row.id


def _fill(engine: Engine) -> None:
    with Session(engine) as s, s.begin():
        _store_result(s, "1.2.3.1", _labels(central_pe=True, rv_lv_ratio_lt_1=True), {"Modality": "CT"}, 1)
        _store_result(s, "1.2.3.2", _labels(leftsided_pe=True, chronic_pe=True, rv_lv_ratio_lt_1=True), {}, 2)
        _store_result(s, "1.2.3.3", _labels(negative_exam_for_pe=True), {"StudyDescription": "CTPA ED"}, 3)
        _store_result(s, "1.2.3.4", _labels(indeterminate=True), {"StudyDescription": "CTPA"}, 4)
        _store_result(s, "1.2.3.5", _labels(negative_exam_for_pe=True), {"StudyDescription": "CTPA"}, 5)
        # The oldest: would change, but falls outside --last 5.
        _store_result(s, "1.2.3.0", _labels(rightsided_pe=True, rv_lv_ratio_lt_1=True), {}, 0)


# -- the rules in force and their history ----------------------------------------


def test_no_rule_set_uses_the_file(engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Session(engine) as s, s.begin():
        assert active_record(s) is None
        monkeypatch.chdir(ROOT)
        current = active_rule_set(s)
        assert (current.source, current.rule_set_id) == ("config/rules.toml", None)
        monkeypatch.chdir(tmp_path)  # no config/rules.toml here
        assert active_rule_set(s).source == "packaged default"
        assert active_rules(s) == SHIPPED
        own = tmp_path / "mine.toml"
        own.write_text('default_priority = "URGENT"\n')
        assert active_rules(s, fallback=own).default_priority is Priority.URGENT


def test_activate_history_rollback_record_old_and_new(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with Session(engine) as s, s.begin():
        first = activate(s, SHIPPED_TEXT, "alice", "take over the shipped defaults").id
    with Session(engine) as s, s.begin():
        second = activate(s, STRICTER, "bob", "all PE to STAT").id
    with Session(engine) as s, s.begin():
        third = rollback(s, first, "carol", "too many STATs").id
    with Session(engine) as s, s.begin():
        assert s.scalar(select(func.count()).select_from(RuleSetRecord).where(RuleSetRecord.active)) == 1
        current = active_rule_set(s)
        assert current.rule_set_id == third and current.rules == SHIPPED
        changes = history(s)
    assert [(c.rule_set_id, c.author, c.action, c.active) for c in changes] == [
        (third, "carol", "rollback", True),
        (second, "bob", "activate", False),
        (first, "alice", "activate", False),
    ]
    newest, middle, oldest = changes
    # old and new of every change
    assert (oldest.previous_id, oldest.previous_source, oldest.old_text) == (None, "packaged default", packaged_rules_text())
    assert (middle.previous_id, middle.old_text, middle.new_text) == (first, SHIPPED_TEXT, STRICTER)
    assert (newest.previous_id, newest.restored_from_id) == (second, first)
    assert (newest.old_text, newest.new_text) == (STRICTER, SHIPPED_TEXT)
    assert '-priority = "URGENT"' in middle.diff() and '+priority = "STAT"' in middle.diff()
    assert oldest.diff() == "" and middle.comment == "all PE to STAT"
    assert all(c.created_at.tzinfo is not None for c in changes)
    with Session(engine) as s:
        assert len(history(s, limit=1)) == 1


def test_invalid_or_unattributed_changes_change_nothing(engine: Engine) -> None:
    with Session(engine) as s, s.begin():
        activate(s, SHIPPED_TEXT, "alice", "defaults")
    bad = SHIPPED_TEXT.replace('label = "central_pe"', 'label = "centrl_pe"')
    for text, author, comment, error in [
        (bad, "bob", "typo", RulesError),
        (STRICTER, "bob", "  ", RuleChangeRefused),
        (STRICTER, "", "why", RuleChangeRefused),
    ]:
        with Session(engine) as s, s.begin(), pytest.raises(error):
            activate(s, text, author, comment)
    with Session(engine) as s, s.begin(), pytest.raises(RuleChangeRefused, match="no rule set 99"):
        rollback(s, 99, "bob", "nope")
    with Session(engine) as s:
        assert [c.author for c in history(s)] == ["alice"]
        assert active_rule_set(s).rule_set_id == history(s)[0].rule_set_id


def test_at_most_one_active_row(engine: Engine) -> None:
    with Session(engine) as s, s.begin():
        activate(s, SHIPPED_TEXT, "alice", "defaults")
    row = {"author": "x", "comment": "y", "toml_text": "", "sha256": "0" * 64, "action": "activate",
           "created_at": T0, "active": True}
    with pytest.raises(IntegrityError), Session(engine) as s, s.begin():
        s.execute(insert(RuleSetRecord).values(**row))
    with Session(engine) as s, s.begin():  # inactive rows are fine
        s.execute(insert(RuleSetRecord).values(**(row | {"active": False})))


def test_concurrent_changes_chain_up(engine: Engine) -> None:
    """Two admins saving at once: both recorded, one after the other, one active."""
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def change(author: str) -> None:
        try:
            start.wait()
            with Session(engine) as s, s.begin():
                activate(s, STRICTER, author, "at the same time")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=change, args=(name,)) for name in ("ann", "ben")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with Session(engine) as s:
        newer, older = history(s)
    assert (older.previous_id, newer.previous_id) == (None, older.rule_set_id)
    assert (older.active, newer.active) == (False, True)


# -- replay ---------------------------------------------------------------------


def test_replay_finds_the_studies_that_would_change(engine: Engine) -> None:
    _fill(engine)
    stricter = parse_rules(STRICTER)
    with Session(engine) as s:
        assert replay(s, SHIPPED, limit=100) == []  # the rules that decided them: nothing changes
        changes = replay(s, stricter, limit=5)
        outcomes = replay_results(s, stricter, limit=5)
    assert len(outcomes) == 5 and [o.study_instance_uid for o in outcomes][0] == "1.2.3.5"
    summary = {
        (c.study_instance_uid, c.old_priority, c.new_priority.value, c.old_rule, c.new_rule) for c in changes
    }
    assert summary == {
        ("1.2.3.2", "URGENT", "STAT", "Any PE", "Any PE"),
        ("1.2.3.3", "ROUTINE", "URGENT", None, "ED negative"),
    }
    assert all(c.escalated and c.rank_delta == 1 for c in changes)
    assert [c.created_at for c in changes] == sorted((c.created_at for c in changes), reverse=True)
    with Session(engine) as s:  # the older positive is reached with a longer look-back
        assert "1.2.3.0" in {c.study_instance_uid for c in replay(s, stricter, limit=6)}
        assert replay(s, stricter, limit=0) == []


def test_replay_survives_damaged_rows(engine: Engine) -> None:
    with Session(engine) as s, s.begin():
        s.add(
            TriageResult(
                study_instance_uid="1.9", series_instance_uid="1.9.1", model_version="x", labels="{not json",
                probabilities="[]", attributes="{}", priority="URGENT", flags="oops", result_json="{}",
            )
        )
    with Session(engine) as s:
        (change,) = replay(s, SHIPPED, limit=10)
    assert (change.old_priority, change.new_priority, change.new_rule) == ("URGENT", Priority.ROUTINE, None)


# -- CLI ----------------------------------------------------------------------------


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str


def _cli(args: list[str], cwd: Path, db_url: str | None = None) -> CliRun:
    """``pe-triage rules ARGS`` from ``cwd`` (in this process: its exit code and what it printed)."""
    out, err = io.StringIO(), io.StringIO()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PETRIAGE_")}
    if db_url is not None:
        env["PETRIAGE_DATABASE__URL"] = db_url
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for key in [k for k in os.environ if k.startswith("PETRIAGE_")]:
            mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        mp.chdir(cwd)
        try:
            code = main(["rules", *args])
        except SystemExit as exc:
            code = int(exc.code or 0)
    return CliRun(code, out.getvalue(), err.getvalue())


def test_cli_check(tmp_path: Path) -> None:
    ok = _cli(["check", str(ROOT / "config" / "rules.toml")], tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "1. Central PE → STAT when central_pe is true" in ok.stdout
    assert "otherwise → ROUTINE" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(SHIPPED_TEXT.replace('when = { label = "pe_present", is = true }', 'when = { label = "pe", is = 1 }'))
    res = _cli(["check", str(bad)], tmp_path)
    assert res.returncode == 2
    assert 'rule 3 "Any PE" (rules[2]) when.label: unknown label \'pe\'' in res.stderr
    assert 'rule 3 "Any PE" (rules[2]) when.is:' in res.stderr
    assert _cli(["check", str(tmp_path / "missing.toml")], tmp_path).returncode == 2


def test_cli_test_activate_history(engine: Engine, db_url: str, tmp_path: Path) -> None:
    _fill(engine)
    new = tmp_path / "stricter.toml"
    new.write_text(STRICTER)
    res = _cli(["test", str(new), "--last", "5"], tmp_path, db_url)
    assert res.returncode == 0, res.stderr
    assert "over the 5 most recent stored results (in force now: packaged default): 2 would change" in res.stdout
    assert "1.2.3.2" in res.stdout and "URGENT → STAT" in res.stdout and "Any PE → Any PE" in res.stdout
    assert "1.2.3.3" in res.stdout and "(default) → ED negative" in res.stdout
    assert "1.2.3.0" not in res.stdout

    res = _cli(["activate", str(new), "--author", "dr who", "--comment", "all PE STAT"], tmp_path, db_url)
    assert res.returncode == 0, res.stderr
    assert "is now active (replaces packaged default), by dr who" in res.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rules]]\nname = "x"\npriority = "SOON"\nwhen = { label = "central_pe" }\n')
    res = _cli(["activate", str(bad), "--author", "a", "--comment", "b"], tmp_path, db_url)
    assert res.returncode == 2 and 'rule 1 "x" (rules[0]) priority' in res.stderr

    res = _cli(["history"], tmp_path, db_url)
    assert res.returncode == 0, res.stderr
    assert "dr who" in res.stdout and "all PE STAT" in res.stdout and "packaged default" in res.stdout
    with Session(engine) as s:
        assert [c.author for c in history(s)] == ["dr who"]
        assert active_rules(s) == load_rules(new)
        first_id = history(s)[0].rule_set_id

    res = _cli(["rollback", str(first_id), "--author", "admin", "--comment", "undo"], tmp_path, db_url)
    assert res.returncode == 0, res.stderr
    assert f"the text of rule set {first_id}" in res.stdout and "by admin" in res.stdout
    res = _cli(["rollback", "999", "--author", "admin", "--comment", "undo"], tmp_path, db_url)
    assert res.returncode == 2
