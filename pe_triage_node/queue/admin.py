"""Read-only views of the queue for the admin web and ``pe-triage`` commands, plus re-queueing.

The web room reads jobs through these functions instead of querying ``jobs`` /
``job_events`` itself, so the queue's tables stay private to ``queue/``.
Results are plain frozen dataclasses, safe to use after the session closed.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pe_triage_node.db.models import Job, JobEvent, JobKind, JobState
from pe_triage_node.queue.jobs import _ACTIVE_SQL, _event, _now, _rowcount

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobView:
    """One job as the queue page shows it (timestamps aware UTC)."""

    id: int
    kind: JobKind
    state: JobState
    priority: int
    study_instance_uid: str | None
    series_instance_uid: str | None
    dedupe_key: str | None
    attempts: int
    max_attempts: int
    not_before: dt.datetime
    claimed_by: str | None
    heartbeat_at: dt.datetime | None
    last_error: str | None
    created_at: dt.datetime
    finished_at: dt.datetime | None


@dataclass(frozen=True)
class JobEventView:
    """One ``job_events`` row."""

    at: dt.datetime
    event: str
    worker: str | None
    detail: str | None


def _view(job: Job) -> JobView:
    return JobView(
        id=job.id, kind=job.kind, state=job.state, priority=job.priority,
        study_instance_uid=job.study_instance_uid, series_instance_uid=job.series_instance_uid,
        dedupe_key=job.dedupe_key, attempts=job.attempts, max_attempts=job.max_attempts,
        not_before=job.not_before, claimed_by=job.claimed_by, heartbeat_at=job.heartbeat_at,
        last_error=job.last_error, created_at=job.created_at, finished_at=job.finished_at,
    )


def queue_counts(session: Session) -> dict[JobKind, dict[JobState, int]]:
    """Number of jobs per kind and state (every kind and state present, zeros included)."""
    counts = {kind: {state: 0 for state in JobState} for kind in JobKind}
    for kind, state, n in session.execute(
        select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)
    ):
        counts[kind][state] = int(n)
    return counts


def list_jobs(
    session: Session,
    *,
    states: Iterable[JobState] | None = None,
    kind: JobKind | None = None,
    series_instance_uid: str | None = None,
    limit: int = 100,
) -> list[JobView]:
    """Jobs, newest first, optionally filtered by state, kind and series."""
    query = select(Job).order_by(Job.id.desc()).limit(max(1, min(limit, 10_000)))
    if states is not None:
        query = query.where(Job.state.in_(list(states)))
    if kind is not None:
        query = query.where(Job.kind == kind)
    if series_instance_uid is not None:
        query = query.where(Job.series_instance_uid == series_instance_uid)
    return [_view(job) for job in session.scalars(query)]


def get_job(session: Session, job_id: int) -> JobView | None:
    """One job, or ``None``."""
    job = session.get(Job, job_id)
    return _view(job) if job is not None else None


def job_history(session: Session, job_id: int) -> list[JobEventView]:
    """The job's events, oldest first."""
    rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
    return [JobEventView(at=e.at, event=e.event, worker=e.worker, detail=e.detail) for e in rows]


def requeue(engine: Engine, job_id: int, *, actor: str, now: dt.datetime | None = None) -> bool:
    """Put a ``dead`` (or ``failed``) job back in the queue with a fresh attempt budget.

    ``actor`` (who asked, e.g. the admin's user name) is recorded in a ``requeued``
    event. Returns ``False``, changing nothing, when the job is not dead/failed or
    when another active job already holds its dedupe key.
    """
    with Session(engine) as s, s.begin():
        at = _now(s, now)
        job = s.get(Job, job_id)
        if job is None:
            raise LookupError(f"no job with id {job_id}")
        if job.dedupe_key is not None and s.scalar(
            select(Job.id).where(Job.dedupe_key == job.dedupe_key, text(_ACTIVE_SQL))
        ) is not None:
            return False
        try:
            with s.begin_nested():
                changed = _rowcount(s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state.in_([JobState.dead, JobState.failed]))
                    .values(state=JobState.queued, attempts=0, not_before=at, claimed_by=None,
                            heartbeat_at=None, finished_at=None, updated_at=at)
                    .execution_options(synchronize_session=False)
                ))
        except IntegrityError:  # a concurrent enqueue took the dedupe key
            return False
        if changed != 1:
            return False
        _event(s, job_id, at, "requeued", worker=actor[:128], detail="attempts reset")
        log.info("job %d requeued by an administrator", job_id)
        return True
