"""The SQL job queue (DESIGN.md, "The queue"): the only code touching ``jobs`` / ``job_events``.

Producer (inside its own transaction)::

    with Session(engine) as s, s.begin():
        job = enqueue(s, JobKind.infer, priority=2, series_instance_uid=uid,
                      dedupe_key=f"infer:{uid}:{generation}")

Worker loop::

    me = worker_identity("worker")
    job = claim(engine, JobKind.infer, me, lease_s=cfg.queue.lease_s)
    if job is not None:
        with LeaseKeeper(engine, job.id, me, every_s=cfg.queue.heartbeat_s) as lease:
            ...  # lease.check() between stages: LeaseLost when another worker took the job
        complete(engine, job.id, me)  # or: fail(engine, job.id, me, str(exc),
                                      #          retry_delay_s=backoff_delay(job.attempts))

Admin web (read-only views, plus re-queueing a dead job): ``queue_counts``,
``list_jobs``, ``get_job``, ``job_history``, ``requeue``.
"""

from __future__ import annotations

from pe_triage_node.db.models import JobKind, JobState
from pe_triage_node.queue.admin import (
    JobEventView,
    JobView,
    get_job,
    job_history,
    list_jobs,
    queue_counts,
    requeue,
)
from pe_triage_node.queue.jobs import (
    DEFAULT_MAX_WAIT_S,
    ClaimedJob,
    as_utc,
    backoff_delay,
    claim,
    complete,
    complete_in,
    enqueue,
    fail,
    heartbeat,
    holds_in,
    recover_stale,
    supersede_queued,
    worker_identity,
)
from pe_triage_node.queue.lease import LeaseKeeper, LeaseLost, renewal_period, run_until_stopped
from pe_triage_node.queue.wakeup import Wakeup, announce

__all__ = [
    "DEFAULT_MAX_WAIT_S",
    "ClaimedJob",
    "JobEventView",
    "JobView",
    "JobKind",
    "JobState",
    "LeaseKeeper",
    "LeaseLost",
    "Wakeup",
    "announce",
    "as_utc",
    "backoff_delay",
    "claim",
    "complete",
    "complete_in",
    "enqueue",
    "fail",
    "get_job",
    "heartbeat",
    "holds_in",
    "job_history",
    "list_jobs",
    "queue_counts",
    "recover_stale",
    "renewal_period",
    "requeue",
    "run_until_stopped",
    "supersede_queued",
    "worker_identity",
]
