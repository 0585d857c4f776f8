"""Edited rules replayed over recent results, bounded so that the console cannot stall the node.

A rule may hold a regular expression (``attribute ... matches``) and the
values it reads came from senders. Each match is limited in time by
:mod:`pe_triage_node.patterns`; the replay reads at most :data:`MAX_RESULTS`
results, from a read-only unit of work (no SQLite write lock), stops at
:data:`TIME_LIMIT_S`, and runs one at a time per console process. Patterns
longer than :data:`MAX_PATTERN_LENGTH` are refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from pe_triage_node.db.models import TriageResult
from pe_triage_node.db.session import read_only
from pe_triage_node.errors import PETriageError
from pe_triage_node.rules import RuleSet
from pe_triage_node.rules.schema import AttributeCondition
from pe_triage_node.rules.store import PriorityChange, ReplayTimedOut, replay

log = logging.getLogger(__name__)

MAX_RESULTS = 1000  # results one replay reads
MAX_PATTERN_LENGTH = 200  # characters of one regular expression in a rule
TIME_LIMIT_S = 5.0  # wall clock for one replay
_one_at_a_time = threading.Lock()


class ReplayRefused(PETriageError):
    """The replay was not done or not finished; the message says why, for the person who asked."""


@dataclass(frozen=True)
class Replayed:
    tested: int  # results replayed
    changes: list[PriorityChange]  # those whose priority the rules would change


def _patterns(node: Any) -> Iterator[str]:
    """Every ``matches`` pattern in a rule set, however deeply its conditions nest."""
    if isinstance(node, AttributeCondition) and node.matches is not None:
        yield node.matches
    if isinstance(node, BaseModel):
        for name in type(node).model_fields:
            yield from _patterns(getattr(node, name))
    elif isinstance(node, list):
        for item in node:
            yield from _patterns(item)


def check_patterns(rules: RuleSet) -> None:
    """Raise :class:`ReplayRefused` when a pattern is longer than :data:`MAX_PATTERN_LENGTH`."""
    for pattern in _patterns(rules):
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise ReplayRefused(
                f"The regular expression {pattern[:40]!r}... has {len(pattern)} characters; "
                f"at most {MAX_PATTERN_LENGTH} are allowed. Nothing was changed."
            )


def replay_bounded(engine: Engine, rules: RuleSet, last_n: int) -> Replayed:
    """The priority changes ``rules`` would make over the ``last_n`` (≤ :data:`MAX_RESULTS`) latest results.

    Raises :class:`ReplayRefused` when another replay is running, a pattern is too
    long, or the replay passes :data:`TIME_LIMIT_S`.
    """
    check_patterns(rules)
    last_n = max(1, min(last_n, MAX_RESULTS))
    if not _one_at_a_time.acquire(blocking=False):
        raise ReplayRefused("Another preview or save is testing rules right now; try again in a moment.")
    try:
        with Session(read_only(engine)) as s, s.begin():
            changes = replay(s, rules, last_n, deadline=time.monotonic() + TIME_LIMIT_S)
            tested = min(last_n, int(s.scalar(select(func.count()).select_from(TriageResult)) or 0))
        return Replayed(tested, changes)
    except ReplayTimedOut as exc:
        log.warning("rules replay %s", exc)
        raise ReplayRefused(
            f"Testing these rules against the stored results took longer than {TIME_LIMIT_S:g} s and was "
            "stopped; simplify its regular expressions or test fewer results. Nothing was changed."
        ) from exc
    finally:
        _one_at_a_time.release()
