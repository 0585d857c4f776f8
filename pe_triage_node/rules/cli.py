"""``pe-triage rules check|test|activate|history|rollback``: the admin's view of the priority rules.

Exit status: 0 done; 2 invalid rules or a refused change (the errors name rule
and field); 1 the database could not be used.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pe_triage_node.cli import add_config_option, config_from_args
from pe_triage_node.errors import PETriageError
from pe_triage_node.rules.schema import RuleIssue, RuleSet, RulesError, parse_rules

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

    from pe_triage_node.db.models import RuleSetRecord


def _load(file: Path | None) -> tuple[RuleSet, str, str]:
    """Rules, text and source of FILE, else ./config/rules.toml, else the packaged default."""
    from pe_triage_node.rules.store import fallback_rules_text

    try:
        text, source = fallback_rules_text(file)
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError(str(file), [RuleIssue(None, None, "", f"cannot read the file: {exc}")]) from exc
    return parse_rules(text, source), text, source


def _fail(exc: PETriageError) -> int:
    print(f"pe-triage rules: {exc}", file=sys.stderr)
    return 2


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line.rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(out)


def _engine(args: argparse.Namespace) -> Engine:
    """The configured database's engine, schema brought to the current revision."""
    from pe_triage_node.db.migrate import ensure_schema
    from pe_triage_node.db.session import make_engine

    cfg = config_from_args(args)
    engine = make_engine(cfg.database_url)
    ensure_schema(engine)
    return engine


# -- handlers -----------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    try:
        rules, _text, source = _load(args.file)
    except RulesError as exc:
        return _fail(exc)
    print(f"{source}: valid, {len(rules.rules)} rules (first match wins)")
    for line in rules.describe():
        print(f"  {line}")
    return 0


def _test(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from pe_triage_node.rules.store import active_rule_set, replay_results

    try:
        rules, _text, source = _load(args.file)
    except RulesError as exc:
        return _fail(exc)
    try:
        engine = _engine(args)
        with Session(engine) as session, session.begin():
            outcomes = replay_results(session, rules, limit=args.last)
            try:
                current = active_rule_set(session).source
            except RulesError:
                current = "the active rules (which no longer validate)"
        engine.dispose()
    except PETriageError as exc:
        print(f"pe-triage rules: {exc}", file=sys.stderr)
        return 1
    changed = [o for o in outcomes if o.priority_changed]
    print(
        f"replayed {source} over the {len(outcomes)} most recent stored results "
        f"(in force now: {current}): {len(changed)} would change priority"
    )
    if changed:
        rows = [
            [
                str(o.result_id),
                o.created_at.strftime("%Y-%m-%d %H:%M"),
                o.study_instance_uid,
                f"{o.old_priority} → {o.decision.priority.value}",
                f"{o.old_rule or '(default)'} → {o.decision.rule_name or '(default)'}",
                ",".join(o.decision.flags),
            ]
            for o in changed
        ]
        print(_table(["result", "stored (UTC)", "study", "priority", "rule", "flags"], rows))
        moves = Counter(f"{o.old_priority} → {o.decision.priority.value}" for o in changed)
        print("; ".join(f"{move}: {n}" for move, n in sorted(moves.items())))
    flag_changes = [o for o in outcomes if not o.priority_changed and set(o.old_flags) != set(o.decision.flags)]
    if flag_changes:
        print(f"{len(flag_changes)} more would keep their priority but change flags")
    return 0


def _change_rules(args: argparse.Namespace, apply: Callable[[Session], RuleSetRecord], describe: Callable[[RuleSetRecord], str]) -> int:
    """Apply one change of the active rules in its own transaction and print what it did."""
    from sqlalchemy.orm import Session

    from pe_triage_node.rules.store import RuleChangeRefused

    try:
        engine = _engine(args)
        with Session(engine) as session, session.begin():
            summary = describe(apply(session))
        engine.dispose()
    except (RulesError, RuleChangeRefused) as exc:
        return _fail(exc)
    except PETriageError as exc:
        print(f"pe-triage rules: {exc}", file=sys.stderr)
        return 1
    print(summary)
    return 0


def _activate(args: argparse.Namespace) -> int:
    from pe_triage_node.rules.store import activate

    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"pe-triage rules: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    try:
        parse_rules(text, str(args.file))
    except RulesError as exc:
        return _fail(exc)
    return _change_rules(
        args,
        lambda session: activate(session, text, args.author, args.comment),
        lambda row: f"rule set {row.id} is now active (replaces {row.previous_source}), by {row.author}",
    )


def _rollback(args: argparse.Namespace) -> int:
    from pe_triage_node.rules.store import rollback

    return _change_rules(
        args,
        lambda session: rollback(session, args.rule_set_id, args.author, args.comment),
        lambda row: (
            f"rule set {row.id} is now active: the text of rule set {args.rule_set_id} "
            f"(replaces {row.previous_source}), by {row.author}"
        ),
    )


def _history(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from pe_triage_node.rules.store import active_rule_set, history

    try:
        engine = _engine(args)
        with Session(engine) as session, session.begin():
            changes = history(session, limit=None if args.show is not None else args.limit)
            if not changes:
                print(f"no change recorded; in force: {active_rule_set(session).source}")
        engine.dispose()
    except PETriageError as exc:
        print(f"pe-triage rules: {exc}", file=sys.stderr)
        return 1
    if args.show is not None:
        chosen = [c for c in changes if c.rule_set_id == args.show]
        if not chosen:
            print(f"pe-triage rules: no rule set {args.show}", file=sys.stderr)
            return 2
        c = chosen[0]
        print(f"rule set {c.rule_set_id}: {c.action} at {c.created_at:%Y-%m-%d %H:%M:%S} UTC by {c.author}")
        print(f"comment: {c.comment}")
        print(c.diff() or "(same text as before)")
        return 0
    if changes:
        rows = [
            [
                str(c.rule_set_id) + (" *" if c.active else ""),
                c.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                c.author,
                c.action + (f" to {c.restored_from_id}" if c.restored_from_id else ""),
                c.previous_source or "",
                c.comment,
            ]
            for c in changes
        ]
        print(_table(["set", "when (UTC)", "author", "action", "replaced", "comment"], rows))
        print("* active; see old and new text with: pe-triage rules history --show SET")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``rules`` and its actions to the ``pe-triage`` command."""
    rules = sub.add_parser("rules", help="triage priority rules: check, test, activate, history, rollback")
    actions = rules.add_subparsers(dest="rules_action", required=True, metavar="ACTION")

    p = actions.add_parser("check", help="validate a rules file and print its rules in order")
    p.add_argument("file", nargs="?", type=Path, help="rules file (default: ./config/rules.toml, else the packaged default)")
    p.set_defaults(handler=_check)

    p = actions.add_parser("test", help="replay a rules file over recent stored results; show priority changes")
    p.add_argument("file", nargs="?", type=Path, help="rules file (default: ./config/rules.toml, else the packaged default)")
    p.add_argument("--last", type=int, default=100, metavar="N", help="how many recent results (default 100)")
    add_config_option(p)
    p.set_defaults(handler=_test)

    p = actions.add_parser("activate", help="validate a rules file and put it in force (recorded)")
    p.add_argument("file", type=Path)
    p.add_argument("--author", required=True, help="who makes the change")
    p.add_argument("--comment", required=True, help="why")
    add_config_option(p)
    p.set_defaults(handler=_activate)

    p = actions.add_parser("history", help="every change of the active rules (when, by whom, old and new)")
    p.add_argument("--limit", type=int, default=50, metavar="N")
    p.add_argument("--show", type=int, default=None, metavar="SET", help="print the change to rule set SET as a diff")
    add_config_option(p)
    p.set_defaults(handler=_history)

    p = actions.add_parser("rollback", help="put an earlier rule set back in force (recorded as a new change)")
    p.add_argument("rule_set_id", type=int, metavar="SET")
    p.add_argument("--author", required=True)
    p.add_argument("--comment", required=True)
    add_config_option(p)
    p.set_defaults(handler=_rollback)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pe_triage_node.rules.cli ACTION ...``: the same actions without the other rooms."""
    parser = argparse.ArgumentParser(prog="pe-triage")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(["rules", *(sys.argv[1:] if argv is None else argv)])
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
