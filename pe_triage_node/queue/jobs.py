"""The SQL job queue: enqueue, claim, heartbeat, complete, fail/retry, lease recovery.

The only code that reads or writes ``jobs`` and ``job_events`` (DESIGN.md, "The queue").

Life of a job::

    enqueue ──▶ queued ──claim──▶ running ──complete──▶ succeeded
                  ▲                  │ fail / lease expired
                  └── attempts left ─┤
                                     └── attempts exhausted (or retry=False) ──▶ dead

Every transition appends a ``job_events`` row (``queued``, ``deduplicated``,
``claimed``, ``succeeded``, ``superseded``, ``failed``, ``retry``, ``lease-expired``,
``lease-lost``, ``dead``). The ``failed`` *state* is not used by this module: a
failed attempt goes straight back to ``queued`` or to ``dead``.

Claiming:

* PostgreSQL: ``SELECT … FOR UPDATE SKIP LOCKED LIMIT 1`` then an ``UPDATE``, so
  concurrent workers on several machines never wait on, nor take, the same row.
* SQLite: the engine from :func:`pe_triage_node.db.session.make_engine` starts
  every transaction with ``BEGIN IMMEDIATE`` (one writer at a time); the claim is a
  conditional ``UPDATE … WHERE id = ? AND state = 'queued'`` whose affected row
  count is checked, so it stays correct even on a deferred transaction.

Clock: on PostgreSQL all queue timestamps come from the database server
(``now()``), so workers on machines with skewed clocks still agree on leases; on
SQLite (one machine) from the local clock. Every function takes an optional
``now=`` for tests and replays. Timestamps are timezone-aware UTC.

Logs carry job ids, kinds, UIDs and worker ids only, never PHI nor error texts
(those go to ``last_error`` / ``job_events.detail`` in the database).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Result, and_, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pe_triage_node.db.models import Job, JobEvent, JobKind, JobState
from pe_triage_node.db.session import read_only
from pe_triage_node.queue.wakeup import announce

log = logging.getLogger(__name__)

#: A queued job that has been eligible for longer than this is claimed before
#: any higher-priority work (see :func:`claim`). Override per call.
DEFAULT_MAX_WAIT_S = 1800.0
#: ``last_error`` / event details are cut to this many characters.
MAX_ERROR_CHARS = 4000
_UID_MAX = 64
_DEDUPE_MAX = 200
_WORKER_MAX = 128
# The predicate of the partial index uq_jobs_active_dedupe, spelled with literals:
# with bound parameters neither SQLite nor a generic PostgreSQL plan can use that index.
_ACTIVE_SQL = "jobs.state IN ('queued','running')"


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker now holds the lease of (``attempts`` already counts this attempt)."""

    id: int
    kind: JobKind
    priority: int
    payload: dict[str, Any] = field(hash=False)
    study_instance_uid: str | None
    series_instance_uid: str | None
    attempts: int
    max_attempts: int


# -- helpers ----------------------------------------------------------------


def as_utc(value: dt.datetime) -> dt.datetime:
    """``value`` as an aware UTC datetime (a naive value is taken to be UTC already)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


def _now(session: Session, now: dt.datetime | None) -> dt.datetime:
    """The queue's clock: ``now`` when given, else the database's (PostgreSQL) or ours."""
    if now is not None:
        return as_utc(now)
    if session.get_bind().dialect.name == "postgresql":
        db_now = session.scalar(select(func.now()))
        if isinstance(db_now, dt.datetime):
            return as_utc(db_now)
    return dt.datetime.now(dt.timezone.utc)


def _rowcount(result: Result[Any]) -> int:
    return cast(CursorResult[Any], result).rowcount


def _event(
    session: Session, job_id: int, at: dt.datetime, event: str, worker: str | None = None,
    detail: str | None = None,
) -> None:
    session.add(JobEvent(job_id=job_id, at=at, event=event, worker=worker, detail=detail))


def _check_worker(worker_id: str) -> None:
    if not worker_id or len(worker_id) > _WORKER_MAX:
        raise ValueError(f"worker_id must be 1-{_WORKER_MAX} characters: {worker_id!r}")


def _cut(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def worker_identity(role: str) -> str:
    """A worker id unique to this process: ``role@host:pid:random``.

    Leases are checked by worker id, so two processes must never share one.
    """
    host = socket.gethostname()[:64]
    return f"{role}@{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"[:_WORKER_MAX]


def backoff_delay(attempt: int, base_s: float = 5.0, cap_s: float = 600.0) -> float:
    """Seconds to wait before retrying after failed attempt number ``attempt`` (1-based).

    Exponential: ``base_s * 2**(attempt-1)``, at most ``cap_s``; 0 for ``attempt < 1``.
    Typical use: ``fail(engine, job.id, me, str(exc), retry_delay_s=backoff_delay(job.attempts))``.
    """
    if attempt < 1:
        return 0.0
    return float(min(cap_s, base_s * 2.0 ** min(attempt - 1, 60)))


# -- producing ----------------------------------------------------------------


def _active_by_key(session: Session, dedupe_key: str) -> Job | None:
    # Served by the partial unique index uq_jobs_active_dedupe (same predicate).
    return session.scalars(
        select(Job).where(Job.dedupe_key == dedupe_key, text(_ACTIVE_SQL))
    ).one_or_none()


def _merge_duplicate(session: Session, job: Job, priority: int, at: dt.datetime) -> Job:
    if priority > job.priority:
        detail = f"priority raised {job.priority} -> {priority}"
        job.priority = priority
        job.updated_at = at
    else:
        detail = f"already {job.state.value}"
    _event(session, job.id, at, "deduplicated", detail=detail)
    log.info("job %d deduplicated (%s) series=%s", job.id, detail, job.series_instance_uid)
    return job


def enqueue(
    session: Session,
    kind: JobKind,
    *,
    priority: int = 0,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    payload: dict[str, Any] | None = None,
    dedupe_key: str | None = None,
    max_attempts: int = 3,
    not_before: dt.datetime | None = None,
    now: dt.datetime | None = None,
) -> Job:
    """Add a job inside the caller's transaction and return it (flushed: ``job.id`` is set).

    When an active (queued or running) job with the same ``dedupe_key`` exists, that
    job is returned instead, its priority raised to ``priority`` if higher, and a
    ``deduplicated`` event recorded. Put whatever makes work distinct into the key
    (e.g. ``f"infer:{series_uid}:{generation}"``): a running job with the same key
    absorbs the request. A concurrent insert of the same key (PostgreSQL) is caught
    on the unique index and resolved the same way.

    ``payload`` must be JSON-serialisable. ``not_before`` delays the first claim.
    """
    kind = JobKind(kind)
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1: {max_attempts}")
    for name, uid in (("study_instance_uid", study_instance_uid), ("series_instance_uid", series_instance_uid)):
        if uid is not None and not 0 < len(uid) <= _UID_MAX:
            raise ValueError(f"{name} must be 1-{_UID_MAX} characters: {uid!r}")
    if dedupe_key is not None and not 0 < len(dedupe_key) <= _DEDUPE_MAX:
        raise ValueError(f"dedupe_key must be 1-{_DEDUPE_MAX} characters: {dedupe_key!r}")
    body = json.dumps(payload or {}, sort_keys=True, separators=(",", ":"))
    at = _now(session, now)

    if dedupe_key is not None:
        existing = _active_by_key(session, dedupe_key)
        if existing is not None:
            return _merge_duplicate(session, existing, priority, at)

    job = Job(
        kind=kind,
        state=JobState.queued,
        priority=priority,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        payload=body,
        dedupe_key=dedupe_key,
        attempts=0,
        max_attempts=max_attempts,
        not_before=as_utc(not_before) if not_before is not None else at,
        created_at=at,
        updated_at=at,
    )
    if dedupe_key is None:
        session.add(job)
        session.flush()
    else:
        try:
            with session.begin_nested():  # a savepoint: losing the race keeps the caller's work
                session.add(job)
                session.flush()
        except IntegrityError:
            existing = _active_by_key(session, dedupe_key)
            if existing is None:
                raise
            return _merge_duplicate(session, existing, priority, at)
    _event(session, job.id, at, "queued", detail=f"priority={priority}")
    session.flush()
    if not_before is None or as_utc(not_before) <= at:
        announce(session, kind)  # its consumers wake when the caller commits
    log.info(
        "job %d queued kind=%s series=%s priority=%d", job.id, kind.value, series_instance_uid, priority
    )
    return job


# -- consuming ----------------------------------------------------------------


def _work_waiting(engine: Engine, kind: JobKind, lease_s: float, now: dt.datetime | None) -> bool:
    """A read-only look before :func:`claim` writes: an eligible queued job, or a running one gone stale.

    An idle poll so never takes SQLite's write lock (nor row locks on PostgreSQL).
    """
    with Session(read_only(engine)) as s, s.begin():
        at = _now(s, now)
        cutoff = at - dt.timedelta(seconds=lease_s)
        waiting = select(Job.id).where(
            Job.kind == kind,
            or_(
                and_(Job.state == JobState.queued, Job.not_before <= at),
                and_(Job.state == JobState.running, or_(Job.heartbeat_at < cutoff, Job.heartbeat_at.is_(None))),
            ),
        )
        return s.scalar(waiting.limit(1)) is not None


def _recover(session: Session, at: dt.datetime, lease_s: float, kinds: Sequence[JobKind]) -> list[int]:
    """Requeue (or dead-letter) running jobs of ``kinds`` whose heartbeat is older than ``lease_s``."""
    cutoff = at - dt.timedelta(seconds=lease_s)
    stale_cond = or_(Job.heartbeat_at < cutoff, Job.heartbeat_at.is_(None))
    # kind IN (...) AND state = 'running' lets ix_jobs_claim serve this.
    rows = session.execute(
        select(Job.id, Job.claimed_by, Job.attempts, Job.max_attempts)
        .where(Job.kind.in_(list(kinds)), Job.state == JobState.running, stale_cond)
        .order_by(Job.id)
        .with_for_update(skip_locked=True)
    ).all()
    recovered: list[int] = []
    for job_id, worker, attempts, max_attempts in rows:
        exhausted = attempts >= max_attempts
        error = f"lease expired: no heartbeat from {worker} for more than {lease_s:g} s (attempt {attempts}/{max_attempts})"
        values: dict[str, Any] = {"last_error": error, "updated_at": at, "heartbeat_at": None}
        if exhausted:
            values.update(state=JobState.dead, finished_at=at)
        else:
            values.update(state=JobState.queued, claimed_by=None, not_before=at)
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.running, stale_cond)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if _rowcount(result) != 1:
            continue  # changed under us (heartbeat or completion won the race)
        _event(session, job_id, at, "lease-expired", worker=worker, detail=error)
        if exhausted:
            _event(session, job_id, at, "dead", worker=worker, detail=error)
        log.warning(
            "job %d lease expired (worker %s, attempt %d/%d): %s",
            job_id, worker, attempts, max_attempts, "dead-lettered" if exhausted else "requeued",
        )
        recovered.append(job_id)
    return recovered


def recover_stale(
    engine: Engine,
    lease_s: float,
    *,
    kinds: Iterable[JobKind] | None = None,
    now: dt.datetime | None = None,
) -> list[int]:
    """Take back running jobs whose ``heartbeat_at`` is older than ``lease_s`` seconds.

    Each goes back to ``queued`` (claimable at once) or, when its attempts are
    exhausted, to ``dead``; both get ``last_error`` and a ``lease-expired`` event.
    Returns the ids of the jobs taken back. :func:`claim` already does this for the
    kind it claims; call this from a periodic reaper to cover idle kinds.
    """
    if lease_s <= 0:
        raise ValueError(f"lease_s must be positive: {lease_s}")
    chosen = list(kinds) if kinds is not None else list(JobKind)
    with Session(engine) as s, s.begin():
        return _recover(s, _now(s, now), lease_s, chosen)


def claim(
    engine: Engine,
    kind: JobKind,
    worker_id: str,
    *,
    lease_s: float,
    max_wait_s: float | None = DEFAULT_MAX_WAIT_S,
    now: dt.datetime | None = None,
) -> ClaimedJob | None:
    """Take the next job of ``kind`` for ``worker_id``, or return ``None`` when there is none.

    Only queued jobs with ``not_before <= now`` are eligible. Order (the
    anti-starvation policy):

    1. **Starved first**: a job eligible for longer than ``max_wait_s`` (i.e.
       ``not_before <= now - max_wait_s``) is taken before anything else, oldest
       ``not_before`` first. This bounds the wait of routine work under a steady
       stream of urgent studies to about ``max_wait_s`` plus one job's run time.
       ``max_wait_s=None`` disables it (strict priority).
    2. Otherwise **highest priority**, then oldest ``not_before``, then lowest id.

    The wait is counted from ``not_before`` (when the job became eligible), so a
    retry's backoff is not counted as waiting.

    Before claiming, running jobs of this kind whose heartbeat is older than
    ``lease_s`` are taken back (see :func:`recover_stale`), so the queue heals
    itself as long as some worker polls. The claimed job is ``running`` with
    ``attempts + 1``, ``claimed_by = worker_id``, ``heartbeat_at = now`` and a
    ``claimed`` event. The caller then heartbeats more often than ``lease_s``.
    """
    kind = JobKind(kind)
    _check_worker(worker_id)
    if lease_s <= 0:
        raise ValueError(f"lease_s must be positive: {lease_s}")
    if not _work_waiting(engine, kind, lease_s, now):
        return None
    with Session(engine) as s, s.begin():
        at = _now(s, now)
        _recover(s, at, lease_s, [kind])
        eligible = select(Job.id).where(
            Job.kind == kind, Job.state == JobState.queued, Job.not_before <= at
        )
        queries = []
        if max_wait_s is not None:
            starved_since = at - dt.timedelta(seconds=max_wait_s)
            queries.append(
                eligible.where(Job.not_before <= starved_since).order_by(Job.not_before, Job.id)
            )
        queries.append(eligible.order_by(Job.priority.desc(), Job.not_before, Job.id))
        for _ in range(5):  # a lost conditional update only happens under a racing writer
            job_id: int | None = None
            for query in queries:
                job_id = s.scalar(query.limit(1).with_for_update(skip_locked=True))
                if job_id is not None:
                    break
            if job_id is None:
                return None
            row = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.queued)
                .values(
                    state=JobState.running,
                    attempts=Job.attempts + 1,
                    claimed_by=worker_id,
                    heartbeat_at=at,
                    updated_at=at,
                )
                .returning(
                    Job.id, Job.kind, Job.priority, Job.payload, Job.study_instance_uid,
                    Job.series_instance_uid, Job.attempts, Job.max_attempts,
                )
                .execution_options(synchronize_session=False)
            ).one_or_none()
            if row is None:
                continue  # someone else took it between our SELECT and UPDATE
            claimed = ClaimedJob(
                id=row.id,
                kind=row.kind,
                priority=row.priority,
                payload=json.loads(row.payload or "{}"),
                study_instance_uid=row.study_instance_uid,
                series_instance_uid=row.series_instance_uid,
                attempts=row.attempts,
                max_attempts=row.max_attempts,
            )
            _event(s, claimed.id, at, "claimed", worker=worker_id,
                   detail=f"attempt {claimed.attempts}/{claimed.max_attempts}")
            log.info(
                "job %d claimed by %s kind=%s series=%s priority=%d attempt %d/%d",
                claimed.id, worker_id, kind.value, claimed.series_instance_uid,
                claimed.priority, claimed.attempts, claimed.max_attempts,
            )
            return claimed
    return None


def _lease_lost(session: Session, job_id: int, worker_id: str, at: dt.datetime, what: str) -> None:
    if session.get(Job, job_id) is None:
        log.warning("job %d: %s by %s refused, no such job", job_id, what, worker_id)
        return
    _event(session, job_id, at, "lease-lost", worker=worker_id, detail=what)
    log.warning("job %d: %s by %s refused, the worker no longer holds its lease", job_id, what, worker_id)


def _held(job_id: int, worker_id: str) -> Any:
    return (Job.id == job_id) & (Job.state == JobState.running) & (Job.claimed_by == worker_id)


def heartbeat(engine: Engine, job_id: int, worker_id: str, *, now: dt.datetime | None = None) -> bool:
    """Renew the lease; ``False`` when it was lost (the job was taken back, re-claimed or finished).

    On ``False`` the worker should abandon the job: another worker may be running it.
    """
    with Session(engine) as s, s.begin():
        if holds_in(s, job_id, worker_id, now=now):
            return True
        _lease_lost(s, job_id, worker_id, _now(s, now), "heartbeat")
        return False


def holds_in(session: Session, job_id: int, worker_id: str, *, now: dt.datetime | None = None) -> bool:
    """Renew the lease inside the caller's transaction: work committed with it was done by the job's
    holder (as :func:`complete_in`, without completing); ``False``, changing nothing, when the lease is lost."""
    at = _now(session, now)
    result = session.execute(
        update(Job).where(_held(job_id, worker_id)).values(heartbeat_at=at, updated_at=at)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


def complete_in(session: Session, job_id: int, worker_id: str, detail: str | None = None, *, now: dt.datetime | None = None) -> bool:
    """Mark the job ``succeeded`` inside the caller's transaction (with the work it finishes, so both
    commit or neither does); ``False``, changing nothing, when this worker does not hold the lease."""
    at = _now(session, now)
    result = session.execute(
        update(Job).where(_held(job_id, worker_id))
        .values(state=JobState.succeeded, finished_at=at, updated_at=at, heartbeat_at=at)
        .execution_options(synchronize_session=False)
    )
    if _rowcount(result) != 1:
        return False
    _event(session, job_id, at, "succeeded", worker=worker_id, detail=_cut(detail) if detail else None)
    log.info("job %d succeeded (worker %s)", job_id, worker_id)
    return True


def complete(
    engine: Engine, job_id: int, worker_id: str, detail: str | None = None, *,
    now: dt.datetime | None = None,
) -> bool:
    """Mark the job ``succeeded``; ``False`` (and no change) when this worker lost the lease."""
    with Session(engine) as s, s.begin():
        if complete_in(s, job_id, worker_id, detail, now=now):
            return True
        _lease_lost(s, job_id, worker_id, _now(s, now), "complete")
        return False


def supersede_queued(
    session: Session, kind: JobKind, series_instance_uid: str, *, keep: Iterable[int] = (), detail: str,
    now: dt.datetime | None = None,
) -> list[int]:
    """Finish the queued jobs of ``kind`` for one series, other than ``keep``, as ``succeeded`` with a
    ``superseded`` event (newer work replaces them), inside the caller's transaction; returns their ids.

    Running jobs are left to finish.
    """
    at = _now(session, now)
    keep_ids = set(keep)
    ids = [
        job_id for job_id in session.scalars(
            select(Job.id).where(Job.kind == JobKind(kind), Job.series_instance_uid == series_instance_uid,
                                 Job.state == JobState.queued).with_for_update(skip_locked=True)
        )
        if job_id not in keep_ids
    ]
    done = []
    for job_id in ids:
        result = session.execute(
            update(Job).where(Job.id == job_id, Job.state == JobState.queued)
            .values(state=JobState.succeeded, finished_at=at, updated_at=at, last_error=None)
            .execution_options(synchronize_session=False)
        )
        if _rowcount(result) == 1:
            _event(session, job_id, at, "superseded", detail=_cut(detail))
            log.info("job %d superseded series=%s", job_id, series_instance_uid)
            done.append(job_id)
    return done


def fail(
    engine: Engine,
    job_id: int,
    worker_id: str,
    error: str,
    *,
    retry_delay_s: float = 0.0,
    retry: bool = True,
    now: dt.datetime | None = None,
) -> JobState:
    """Record a failed attempt and return the job's new state.

    ``queued`` again (claimable from ``now + retry_delay_s``) while attempts remain
    and ``retry`` is true; otherwise ``dead``. ``last_error`` keeps ``error``;
    events ``failed`` then ``retry`` or ``dead``. Use ``retry=False`` for errors
    that cannot go away (an undecodable series). When this worker no longer holds
    the lease nothing changes and the job's current state is returned. Raises
    :class:`LookupError` for an unknown job id.
    """
    if retry_delay_s < 0:
        raise ValueError(f"retry_delay_s must not be negative: {retry_delay_s}")
    error = _cut(error or "unknown error")
    with Session(engine) as s, s.begin():
        at = _now(s, now)
        row = s.execute(
            select(Job.state, Job.claimed_by, Job.attempts, Job.max_attempts)
            .where(Job.id == job_id)
            .with_for_update()
        ).one_or_none()
        if row is None:
            raise LookupError(f"no job with id {job_id}")
        if row.state != JobState.running or row.claimed_by != worker_id:
            _lease_lost(s, job_id, worker_id, at, "fail")
            return JobState(row.state)
        dead = not retry or row.attempts >= row.max_attempts
        values: dict[str, Any] = {"last_error": error, "updated_at": at, "heartbeat_at": None}
        if dead:
            values.update(state=JobState.dead, finished_at=at)
        else:
            retry_at = at + dt.timedelta(seconds=retry_delay_s)
            values.update(state=JobState.queued, claimed_by=None, not_before=retry_at)
        result = s.execute(
            update(Job).where(_held(job_id, worker_id)).values(**values)
            .execution_options(synchronize_session=False)
        )
        if _rowcount(result) != 1:  # pragma: no cover - the row is locked / the writer is alone
            _lease_lost(s, job_id, worker_id, at, "fail")
            return JobState(row.state)
        _event(s, job_id, at, "failed", worker=worker_id, detail=error)
        if dead:
            why = "no retry" if not retry else f"attempts exhausted ({row.attempts}/{row.max_attempts})"
            _event(s, job_id, at, "dead", worker=worker_id, detail=why)
            log.warning("job %d dead-lettered (%s, worker %s)", job_id, why, worker_id)
            return JobState.dead
        _event(s, job_id, at, "retry", worker=worker_id,
               detail=f"attempt {row.attempts}/{row.max_attempts} failed; not before {retry_at.isoformat()}")
        log.warning(
            "job %d attempt %d/%d failed (worker %s), retry in %.0f s",
            job_id, row.attempts, row.max_attempts, worker_id, retry_delay_s,
        )
        return JobState.queued
