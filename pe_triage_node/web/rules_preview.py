"""Edited rules replayed over recent results, bounded so that the console cannot stall the node.

A rule may hold a regular expression (``attribute ... matches``). Python's
``re`` backtracks, holds the interpreter while it does, and cannot be
interrupted: the 15-character pattern ``(([A-Z ]+)+)+x`` takes hours on a
21-character StudyDescription, so a short pattern and short inputs bound
nothing. The replay therefore runs in a child process that reads the database
read-only and is killed when it passes a wall-clock limit; one replay at a time
per console process; the patterns' length and the number of results replayed are
bounded too.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Engine, create_engine, event, func, make_url, select
from sqlalchemy.orm import Session

from pe_triage_node.db.models import TriageResult
from pe_triage_node.errors import PETriageError
from pe_triage_node.rules import RuleSet
from pe_triage_node.rules.schema import AttributeCondition
from pe_triage_node.rules.store import PriorityChange, replay

log = logging.getLogger(__name__)

MAX_RESULTS = 1000  # results one replay reads
MAX_PATTERN_LENGTH = 200  # characters of one regular expression in a rule
TIME_LIMIT_S = 5.0  # wall clock for the matching, once the child has started
START_LIMIT_S = 60.0  # the child's interpreter start-up and database connection (a busy machine is slow)
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


def _read_only_engine(url: str) -> Engine:
    """An engine that can only read (no write lock on SQLite, a read-only transaction on PostgreSQL)."""
    if make_url(url).get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _query_only(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.execute("PRAGMA query_only=ON")

        return engine
    return create_engine(url).execution_options(postgresql_readonly=True)


def _replay_child(url: str, rules: RuleSet, last_n: int, conn: Connection) -> None:
    """In the child: connect, say "ready", replay, send the outcome (or the error) back."""
    try:
        engine = _read_only_engine(url)
        with Session(engine) as s:
            s.connection()
            conn.send(("ready",))
            changes = replay(s, rules, last_n)
            tested = min(last_n, int(s.scalar(select(func.count()).select_from(TriageResult)) or 0))
        engine.dispose()
        conn.send(("done", Replayed(tested, changes)))
    except Exception as exc:  # reported to the parent, which refuses with it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _receive(receiver: Connection, limit_s: float) -> tuple[Any, ...] | None:
    """The child's next message, or ``None`` when none came within ``limit_s``."""
    try:
        if receiver.poll(limit_s):
            message: tuple[Any, ...] = receiver.recv()
            return message
    except EOFError:
        return ("error", "the test stopped unexpectedly")
    return None


def replay_bounded(database_url: str, rules: RuleSet, last_n: int) -> Replayed:
    """The priority changes ``rules`` would make over the ``last_n`` (≤ :data:`MAX_RESULTS`) latest results.

    Raises :class:`ReplayRefused` when another replay is running, a pattern is too
    long, or the matching passes :data:`TIME_LIMIT_S` (the child is killed).
    """
    check_patterns(rules)
    last_n = max(1, min(last_n, MAX_RESULTS))
    if not _one_at_a_time.acquire(blocking=False):
        raise ReplayRefused("Another preview or save is testing rules right now; try again in a moment.")
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of this threaded process is copied
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_replay_child, args=(database_url, rules, last_n, sender),
                        name="rules-replay", daemon=True)
    try:
        child.start()
        sender.close()
        try:
            return _outcome(receiver)
        finally:
            if child.is_alive():
                child.kill()
            child.join()
    finally:
        sender.close()
        receiver.close()
        _one_at_a_time.release()


def _outcome(receiver: Connection) -> Replayed:
    message = _receive(receiver, START_LIMIT_S)
    if message is None:
        raise ReplayRefused("The rules test did not start in time (the node is busy); try again in a moment.")
    if message[0] == "ready":
        message = _receive(receiver, TIME_LIMIT_S)
        if message is None:
            log.warning("rules replay stopped: matching took longer than %g s", TIME_LIMIT_S)
            raise ReplayRefused(
                f"Testing these rules against the stored results took longer than {TIME_LIMIT_S:g} s and was "
                "stopped. A regular expression with nested repetition, such as (a+)+, can take hours on one "
                "value; simplify it. Nothing was changed."
            )
    if message[0] == "done":
        replayed: Replayed = message[1]
        return replayed
    log.warning("rules replay failed in its child process: %s", message[1])
    raise ReplayRefused(f"The rules could not be tested against the stored results ({message[1]}).")
