"""The SQL job queue on SQLite and PostgreSQL: ordering, concurrency, leases, retries.

Time is explicit (``now=``) wherever staleness or ordering matters: no sleeps.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from pe_triage_node.db.models import Job, JobEvent
from pe_triage_node.db.session import make_engine
from pe_triage_node.queue import lease as lease_module
from pe_triage_node.queue import (
    ClaimedJob,
    JobKind,
    JobState,
    LeaseKeeper,
    LeaseLost,
    backoff_delay,
    claim,
    complete,
    enqueue,
    fail,
    get_job,
    heartbeat,
    job_history,
    list_jobs,
    queue_counts,
    recover_stale,
    requeue,
    worker_identity,
)

T0 = dt.datetime(2030, 1, 1, 8, 0, tzinfo=dt.timezone.utc)
LEASE = 120.0


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def add(engine: Engine, kind: JobKind = JobKind.infer, *, when: float = 0.0, **kw: object) -> int:
    """Enqueue one job at ``T0 + when`` and return its id."""
    with Session(engine) as s, s.begin():
        job = enqueue(s, kind, now=at(when), **kw)  # type: ignore[arg-type]
        return job.id


def load(engine: Engine, job_id: int) -> Job:
    with Session(engine, expire_on_commit=False) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def events(engine: Engine, job_id: int) -> list[str]:
    with Session(engine) as s:
        return list(s.scalars(select(JobEvent.event).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def take(engine: Engine, worker: str = "w1", when: float = 0.0, **kw: object) -> ClaimedJob:
    job = claim(engine, JobKind.infer, worker, lease_s=LEASE, now=at(when), **kw)  # type: ignore[arg-type]
    assert job is not None
    return job


# -- enqueue -----------------------------------------------------------------


def test_enqueue_writes_a_queued_job_and_event(engine: Engine) -> None:
    job_id = add(engine, priority=2, study_instance_uid="1.2.3", series_instance_uid="1.2.3.4",
                 payload={"generation": 1}, max_attempts=5)
    job = load(engine, job_id)
    assert (job.kind, job.state, job.priority, job.attempts, job.max_attempts) == (
        JobKind.infer, JobState.queued, 2, 0, 5)
    assert job.not_before == T0 and job.not_before.tzinfo == dt.timezone.utc  # aware UTC on both DBs
    assert events(engine, job_id) == ["queued"]


def test_dedupe_returns_the_active_job_and_raises_its_priority(engine: Engine) -> None:
    first = add(engine, priority=1, dedupe_key="infer:1.2.3.4:0")
    again = add(engine, priority=0, dedupe_key="infer:1.2.3.4:0", when=1)
    higher = add(engine, priority=3, dedupe_key="infer:1.2.3.4:0", when=2)
    assert first == again == higher
    assert load(engine, first).priority == 3
    assert events(engine, first) == ["queued", "deduplicated", "deduplicated"]
    # Still deduplicated while running; a finished job no longer blocks the key.
    job = take(engine, when=3)
    assert add(engine, dedupe_key="infer:1.2.3.4:0", when=4) == first
    assert complete(engine, job.id, "w1", now=at(5))
    assert add(engine, dedupe_key="infer:1.2.3.4:0", when=6) != first


def test_concurrent_enqueues_of_one_key_make_one_job(db_url: str, engine: Engine) -> None:
    ids: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def producer() -> None:
        eng = make_engine(db_url)
        try:
            start.wait()
            with Session(eng) as s, s.begin():
                ids.append(enqueue(s, JobKind.export, dedupe_key="export:x").id)
        except BaseException as exc:
            errors.append(exc)
        finally:
            eng.dispose()

    threads = [threading.Thread(target=producer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(ids)) == 1 and len(ids) == 4
    with Session(engine) as s:
        assert s.scalars(select(Job.id)).all() == ids[:1]


def test_enqueue_rejects_bad_arguments(engine: Engine) -> None:
    with Session(engine) as s, s.begin():
        with pytest.raises(ValueError, match="max_attempts"):
            enqueue(s, JobKind.infer, max_attempts=0)
        with pytest.raises(ValueError, match="series_instance_uid"):
            enqueue(s, JobKind.infer, series_instance_uid="1." * 40)


# -- claim order ---------------------------------------------------------------


def test_claim_takes_highest_priority_then_oldest(engine: Engine) -> None:
    routine_old = add(engine, priority=0, when=0)
    urgent_new = add(engine, priority=5, when=20)
    urgent_old = add(engine, priority=5, when=10)
    routine_new = add(engine, priority=0, when=30)
    order = [take(engine, when=60).id for _ in range(4)]
    assert order == [urgent_old, urgent_new, routine_old, routine_new]
    assert claim(engine, JobKind.infer, "w1", lease_s=LEASE, now=at(60)) is None


def test_claim_takes_a_starved_job_first(engine: Engine) -> None:
    """Aging: routine work eligible for longer than max_wait_s beats fresh urgent work."""
    routine = add(engine, priority=0, when=0)
    urgent = add(engine, priority=9, when=500)
    # Waited 550 s < 600 s: priority wins.
    assert take(engine, when=550, max_wait_s=600).id == urgent
    urgent2 = add(engine, priority=9, when=590)
    # Waited 600 s: the routine job goes first, then urgent work again.
    assert take(engine, when=600, max_wait_s=600).id == routine
    assert take(engine, when=600, max_wait_s=600).id == urgent2


def test_strict_priority_without_aging(engine: Engine) -> None:
    add(engine, priority=0, when=0)
    urgent = add(engine, priority=1, when=10_000)
    assert take(engine, when=10_000, max_wait_s=None).id == urgent


def test_claim_respects_not_before_and_kind(engine: Engine) -> None:
    later = add(engine, when=0, not_before=at(100))
    add(engine, JobKind.export, when=0)
    assert claim(engine, JobKind.infer, "w1", lease_s=LEASE, now=at(99)) is None
    job = take(engine, when=100)
    assert job.id == later and job.kind is JobKind.infer
    exported = claim(engine, JobKind.export, "w1", lease_s=LEASE, now=at(100))
    assert exported is not None and exported.kind is JobKind.export


def test_claimed_job_carries_the_job(engine: Engine) -> None:
    job_id = add(engine, priority=3, study_instance_uid="1.2", series_instance_uid="1.2.3",
                 payload={"model": "v1", "slabs": [1, 2]}, max_attempts=4)
    job = take(engine, "worker-a", when=1)
    assert job == ClaimedJob(id=job_id, kind=JobKind.infer, priority=3,
                             payload={"model": "v1", "slabs": [1, 2]}, study_instance_uid="1.2",
                             series_instance_uid="1.2.3", attempts=1, max_attempts=4)
    row = load(engine, job_id)
    assert (row.state, row.claimed_by, row.heartbeat_at) == (JobState.running, "worker-a", at(1))
    assert events(engine, job_id) == ["queued", "claimed"]


def test_concurrent_workers_never_claim_the_same_job(db_url: str, engine: Engine) -> None:
    with Session(engine) as s, s.begin():
        ids = {enqueue(s, JobKind.infer, priority=i % 3).id for i in range(50)}
    claimed: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(n: int) -> None:
        eng = make_engine(db_url)  # one engine per "process"
        me = worker_identity(f"w{n}")
        try:
            start.wait()
            while (job := claim(eng, JobKind.infer, me, lease_s=LEASE)) is not None:
                claimed.append(job.id)
                if not complete(eng, job.id, me):
                    raise RuntimeError(f"lost lease of job {job.id}")
        except BaseException as exc:
            errors.append(exc)
        finally:
            eng.dispose()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(claimed) == sorted(ids)  # every job exactly once
    with Session(engine) as s:
        claims = Counter(s.scalars(select(JobEvent.job_id).where(JobEvent.event == "claimed")))
        states = set(s.scalars(select(Job.state)))
        attempts = set(s.scalars(select(Job.attempts)))
    assert set(claims.values()) == {1} and set(claims) == ids
    assert states == {JobState.succeeded} and attempts == {1}


# -- leases ------------------------------------------------------------------


def test_heartbeat_renews_the_lease(engine: Engine) -> None:
    add(engine)
    job = take(engine, when=0)
    assert heartbeat(engine, job.id, "w1", now=at(100))
    assert load(engine, job.id).heartbeat_at == at(100)
    # 200 s after the claim but only 100 s after the heartbeat: not stale.
    assert recover_stale(engine, LEASE, now=at(200)) == []
    assert not heartbeat(engine, job.id, "someone-else", now=at(200))
    assert load(engine, job.id).heartbeat_at == at(100)


def test_stale_job_is_requeued_and_the_old_lease_is_lost(engine: Engine) -> None:
    add(engine)
    job = take(engine, "w1", when=0)
    assert recover_stale(engine, LEASE, now=at(LEASE)) == []  # exactly lease_s: not yet stale
    assert recover_stale(engine, LEASE, now=at(LEASE + 1)) == [job.id]
    row = load(engine, job.id)
    assert (row.state, row.claimed_by, row.heartbeat_at) == (JobState.queued, None, None)
    assert row.last_error is not None and "lease expired" in row.last_error
    assert not heartbeat(engine, job.id, "w1", now=at(LEASE + 2))
    again = take(engine, "w2", when=LEASE + 2)
    assert (again.id, again.attempts) == (job.id, 2)
    assert not complete(engine, job.id, "w1", now=at(LEASE + 3))  # the old worker can't finish it
    assert fail(engine, job.id, "w1", "late", now=at(LEASE + 3)) is JobState.running
    assert complete(engine, job.id, "w2", "ok", now=at(LEASE + 4))
    assert events(engine, job.id) == [
        "queued", "claimed", "lease-expired", "lease-lost", "claimed", "lease-lost", "lease-lost",
        "succeeded",
    ]


def test_claim_recovers_stale_jobs_of_its_kind(engine: Engine) -> None:
    add(engine)
    stuck = take(engine, "crashed", when=0)
    job = take(engine, "w2", when=LEASE + 1)
    assert (job.id, job.attempts) == (stuck.id, 2)


def test_lease_expiry_on_the_last_attempt_dead_letters(engine: Engine) -> None:
    job_id = add(engine, max_attempts=1)
    take(engine, when=0)
    assert recover_stale(engine, LEASE, now=at(LEASE + 1)) == [job_id]
    row = load(engine, job_id)
    assert row.state is JobState.dead and row.finished_at == at(LEASE + 1)
    assert row.last_error is not None and "lease expired" in row.last_error
    assert events(engine, job_id)[-2:] == ["lease-expired", "dead"]


# -- failure, retry, dead letter -----------------------------------------------


def test_fail_requeues_with_backoff(engine: Engine) -> None:
    job_id = add(engine, max_attempts=3)
    job = take(engine, when=0)
    delay = backoff_delay(job.attempts)
    assert fail(engine, job.id, "w1", "GPU out of memory", retry_delay_s=delay, now=at(10)) is JobState.queued
    row = load(engine, job_id)
    assert (row.state, row.not_before, row.last_error, row.claimed_by) == (
        JobState.queued, at(10 + delay), "GPU out of memory", None)
    assert claim(engine, JobKind.infer, "w1", lease_s=LEASE, now=at(10 + delay - 0.5)) is None
    assert take(engine, when=10 + delay).attempts == 2
    assert events(engine, job_id) == ["queued", "claimed", "failed", "retry", "claimed"]


def test_dead_letter_after_max_attempts(engine: Engine) -> None:
    job_id = add(engine, max_attempts=2)
    take(engine, when=0)
    assert fail(engine, job_id, "w1", "first", now=at(1)) is JobState.queued
    take(engine, when=2)
    assert fail(engine, job_id, "w1", "association rejected", retry_delay_s=5, now=at(3)) is JobState.dead
    row = load(engine, job_id)
    assert (row.state, row.attempts, row.last_error, row.finished_at) == (
        JobState.dead, 2, "association rejected", at(3))
    assert claim(engine, JobKind.infer, "w1", lease_s=LEASE, now=at(100)) is None
    assert events(engine, job_id) == [
        "queued", "claimed", "failed", "retry", "claimed", "failed", "dead"]


def test_fail_without_retry_is_dead_at_once(engine: Engine) -> None:
    job_id = add(engine, max_attempts=3)
    take(engine, when=0)
    assert fail(engine, job_id, "w1", "undecodable series", retry=False, now=at(1)) is JobState.dead
    assert load(engine, job_id).attempts == 1


def test_unknown_job(engine: Engine) -> None:
    with pytest.raises(LookupError):
        fail(engine, 12345, "w1", "x")
    assert not heartbeat(engine, 12345, "w1") and not complete(engine, 12345, "w1")


def test_backoff_delay_is_exponential_and_capped() -> None:
    assert [backoff_delay(n) for n in (0, 1, 2, 3, 4)] == [0.0, 5.0, 10.0, 20.0, 40.0]
    assert backoff_delay(50) == 600.0 and backoff_delay(10_000, base_s=1, cap_s=30) == 30.0


# -- admin views ---------------------------------------------------------------


def test_admin_views_and_requeue_of_a_dead_job(engine: Engine) -> None:
    job_id = add(engine, series_instance_uid="1.2.3", dedupe_key="infer:1.2.3:0", max_attempts=1)
    add(engine, JobKind.export)
    take(engine, when=0)
    assert fail(engine, job_id, "w1", "boom", now=at(1)) is JobState.dead
    with Session(engine) as s:
        counts = queue_counts(s)
        dead = list_jobs(s, states=[JobState.dead])
        history = job_history(s, job_id)
    assert counts[JobKind.infer][JobState.dead] == 1 and counts[JobKind.export][JobState.queued] == 1
    assert counts[JobKind.infer][JobState.queued] == 0
    assert [(j.id, j.last_error, j.finished_at) for j in dead] == [(job_id, "boom", at(1))]
    assert [e.event for e in history] == ["queued", "claimed", "failed", "dead"]
    assert history[0].at == T0

    assert not requeue(engine, add(engine, when=2), actor="admin", now=at(2))  # not dead
    assert requeue(engine, job_id, actor="admin", now=at(3))
    assert not requeue(engine, job_id, actor="admin", now=at(3))  # already queued
    with Session(engine) as s:
        job = get_job(s, job_id)
    assert job is not None and (job.state, job.attempts, job.finished_at) == (JobState.queued, 0, None)
    assert events(engine, job_id)[-1] == "requeued"


def test_requeue_refuses_when_the_dedupe_key_is_taken(engine: Engine) -> None:
    job_id = add(engine, dedupe_key="k", max_attempts=1)
    take(engine, when=0)
    fail(engine, job_id, "w1", "boom", now=at(1))
    newer = add(engine, dedupe_key="k", when=2)
    assert newer != job_id
    assert not requeue(engine, job_id, actor="admin", now=at(3))


# -- the lease keeper -----------------------------------------------------------


def _wait(condition: object, what: str, timeout: float = 30.0) -> None:
    deadline = threading.Event()
    timer = threading.Timer(timeout, deadline.set)
    timer.start()
    try:
        while not condition():  # type: ignore[operator]
            if deadline.wait(0.02):
                raise AssertionError(f"timed out waiting for {what}")
    finally:
        timer.cancel()


def test_lease_keeper_survives_a_database_error_and_keeps_renewing(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    add(engine)
    job = take(engine, "w1", when=0)  # claimed at T0: every real renewal moves heartbeat_at
    calls: list[str] = []

    def flaky(*args: object, **kwargs: object) -> bool:
        calls.append("call")
        if len(calls) == 1:
            raise OSError("database unreachable for a moment")
        return heartbeat(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(lease_module, "heartbeat", flaky)
    before = load(engine, job.id).heartbeat_at
    with LeaseKeeper(engine, job.id, "w1", every_s=0.05) as keeper:
        _wait(lambda: load(engine, job.id).heartbeat_at != before, "a renewal after the failed one")
        keeper.check()  # not lost
    assert len(calls) >= 2 and not keeper.lost.is_set()


def test_lease_keeper_reports_a_lease_taken_back(engine: Engine) -> None:
    add(engine)
    job = take(engine, "w1", when=0)
    with LeaseKeeper(engine, job.id, "w1", every_s=0.05) as keeper:
        assert complete(engine, job.id, "w1")  # the job is no longer running: the next renewal is refused
        _wait(keeper.lost.is_set, "the keeper to notice")
        with pytest.raises(LeaseLost):
            keeper.check()
        with pytest.raises(LeaseLost):
            keeper.renew()
