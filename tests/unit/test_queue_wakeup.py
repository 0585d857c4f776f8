"""Job wake-ups on SQLite (a named pipe beside the database) and PostgreSQL (LISTEN/NOTIFY):
a committed job wakes its kind's consumers, a rolled-back or deferred one does not, and a
consumer loop with an hour-long poll claims a new job as soon as it is committed."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from pe_triage_node.queue import (
    JobKind,
    Wakeup,
    claim,
    complete,
    enqueue,
    run_until_stopped,
)
from pe_triage_node.queue.wakeup import pipe_path, poke


def _queue(engine: Engine, kind: JobKind = JobKind.export, **kwargs: object) -> int:
    with Session(engine) as s, s.begin():
        return enqueue(s, kind, series_instance_uid="1.2.3", **kwargs).id  # type: ignore[arg-type]


def test_a_committed_job_wakes_the_consumers_of_its_kind(engine: Engine) -> None:
    with Wakeup(engine, JobKind.export) as exports, Wakeup(engine, JobKind.infer) as infers:
        assert exports.wait(0) is False and infers.wait(0) is False  # listening, nothing announced
        _queue(engine)
        assert exports.wait(30) is True
        assert infers.wait(0.05) is False, "an export job does not wake the workers"
        assert exports.wait(0.05) is False, "one announcement, one wake-up"


def test_a_rolled_back_or_deferred_job_wakes_nobody(engine: Engine) -> None:
    with Wakeup(engine, JobKind.export) as exports:
        assert exports.wait(0) is False
        with pytest.raises(RuntimeError), Session(engine) as s, s.begin():
            enqueue(s, JobKind.export, series_instance_uid="1.2.3")
            raise RuntimeError("the producer's transaction fails")
        _queue(engine, not_before=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
        assert exports.wait(0.2) is False


def test_a_consumer_loop_polling_hourly_claims_a_new_job_when_it_is_committed(engine: Engine) -> None:
    claimed: list[int] = []
    done, stop = threading.Event(), threading.Event()

    def process_one() -> bool:
        job = claim(engine, JobKind.export, "exporter-test", lease_s=60)
        if job is None:
            return False
        claimed.append(job.id)
        complete(engine, job.id, "exporter-test")
        done.set()
        return True

    with Wakeup(engine, JobKind.export) as wakeup:
        loop = threading.Thread(target=run_until_stopped, args=(process_one, stop, 3600.0, "test"),
                                kwargs={"wakeup": wakeup})
        loop.start()
        try:
            job_id = _queue(engine)
            assert done.wait(60), "the loop claimed the job before its next poll (an hour away)"
        finally:
            stop.set()
            _queue(engine, dedupe_key="wake the loop to stop")  # its next poll is an hour away
            loop.join(60)
    assert claimed == [job_id] and not loop.is_alive()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_something_else_where_the_pipe_goes_leaves_the_consumers_polling(engine: Engine) -> None:
    path = pipe_path(engine, JobKind.export)
    assert path is not None and path.parent == Path(str(engine.url.database)).absolute().parent
    path.write_bytes(b"not a pipe")
    with Wakeup(engine, JobKind.export) as exports:
        _queue(engine)
        assert exports.wait(0.05) is False  # no wake-up channel: the consumer polls
    assert poke(path) is False and path.read_bytes() == b"not a pipe", "a regular file is never written"
