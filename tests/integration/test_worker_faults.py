"""Fault tests with the node's processes: a worker killed mid-job, two workers sharing PostgreSQL,
a destination that is down for a while.

Workers run as real processes (``pe-triage worker``) on a tiny random model
(tests/node_support.py); leases are short so a dead worker's job comes back in
seconds. Waits are on conditions in the database or on ports, never fixed sleeps.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from pe_triage_node.db.models import Job, JobEvent, JobKind, JobState, TriageResult

try:
    from tests import node_support, peers
except ModuleNotFoundError:
    import node_support  # type: ignore[no-redef]
    import peers  # type: ignore[no-redef]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return node_support.tiny_manifest(tmp_path_factory.mktemp("model"))


def _events(engine: Engine, job_id: int) -> Counter[str]:
    with Session(engine) as s:
        return Counter(s.scalars(select(JobEvent.event).where(JobEvent.job_id == job_id)))


def _job(engine: Engine, job_id: int) -> Job:
    with Session(engine) as s:
        job = s.get(Job, job_id)
        if job is None:
            raise LookupError(job_id)
        s.expunge(job)
        return job


def _results_per_job(engine: Engine) -> Counter[int | None]:
    with Session(engine) as s:
        return Counter(s.scalars(select(TriageResult.job_id)))


def _worker_ready(log_path: Path, n: int = 1) -> bool:
    return log_path.is_file() and log_path.read_text(errors="replace").count(" started (device") >= n


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_worker_killed_mid_job_leaves_it_to_another_that_completes_it_once(
    tmp_path: Path, db_url: str, engine: Engine, manifest: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    config = node_support.write_node_config(
        tmp_path, database_url=db_url, receiver_port=peers.free_port(), manifest=manifest,
        sections={"queue": {"lease_s": 3.0, "heartbeat_s": 0.5, "poll_interval_s": 0.05}},
    )
    files = node_support.tiny_series(tmp_path / "series", "1.2.826.0.1.3680043.10.1453.89.1",
                                     "1.2.826.0.1.3680043.10.1453.89.2", slices=120)
    log_a, log_b = tmp_path / "worker-a.log", tmp_path / "worker-b.log"
    first = node_support.start_node_process(config, ["worker"], log_path=log_a)
    procs.append(first)
    node_support.wait_until(lambda: _worker_ready(log_a), 120, "worker A ready", procs=[first], log_path=log_a)
    job_id = node_support.seed_selected_series(engine, tmp_path / "var" / "spool", files)

    node_support.wait_until(lambda: _job(engine, job_id).state == JobState.running, 60, "worker A claims the job",
                            every=0.02, procs=[first], log_path=log_a)
    first.send_signal(signal.SIGKILL)  # mid-job: no heartbeat, no completion
    first.wait(timeout=10)
    assert _job(engine, job_id).state == JobState.running, "worker A finished before it could be killed"

    second = node_support.start_node_process(config, ["worker"], log_path=log_b)
    procs.append(second)
    node_support.wait_until(lambda: _job(engine, job_id).state == JobState.succeeded, 120,
                            "worker B completes the job after the lease expired", procs=[second], log_path=log_b)
    events = _events(engine, job_id)
    assert events["claimed"] == 2 and events["lease-expired"] == 1 and events["succeeded"] == 1
    assert _results_per_job(engine) == Counter({job_id: 1})
    assert _job(engine, job_id).claimed_by is not None and f":{second.pid}:" in (_job(engine, job_id).claimed_by or "")


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_two_workers_sharing_postgresql_run_each_of_20_jobs_exactly_once(
    tmp_path: Path, db_url: str, engine: Engine, manifest: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    config = node_support.write_node_config(
        tmp_path, database_url=db_url, receiver_port=peers.free_port(), manifest=manifest,
        sections={"queue": {"poll_interval_s": 0.05}},
    )
    logs = [tmp_path / "worker-1.log", tmp_path / "worker-2.log"]
    for log_path in logs:
        procs.append(node_support.start_node_process(config, ["worker"], log_path=log_path,
                                                     env={"OMP_NUM_THREADS": "1"}))
    for proc, log_path in zip(procs, logs):
        node_support.wait_until(lambda lp=log_path: _worker_ready(lp), 120, "worker ready", procs=[proc], log_path=log_path)

    job_ids = []
    for i in range(20):
        files = node_support.tiny_series(tmp_path / f"s{i}", f"1.2.826.0.1.3680043.10.1453.90.{i}.1",
                                         f"1.2.826.0.1.3680043.10.1453.90.{i}.2", slices=20)
        job_ids.append(node_support.seed_selected_series(engine, tmp_path / "var" / "spool", files))

    def all_finished() -> bool:
        with Session(engine) as s:
            states = s.scalars(select(Job.state).where(Job.kind == JobKind.infer)).all()
        return len(states) == 20 and all(st in (JobState.succeeded, JobState.dead) for st in states)

    node_support.wait_until(all_finished, 300, "20 jobs finished", procs=procs, log_path=logs[0])
    with Session(engine) as s:
        jobs = s.scalars(select(Job).where(Job.kind == JobKind.infer)).all()
        claims = Counter(s.scalars(select(JobEvent.job_id).where(JobEvent.event == "claimed")))
    assert all(j.state == JobState.succeeded for j in jobs), [j.last_error for j in jobs if j.state != JobState.succeeded]
    assert claims == Counter({j: 1 for j in job_ids}), "every job claimed exactly once"
    assert _results_per_job(engine) == Counter({j: 1 for j in job_ids}), "one result per job"
    workers = Counter((j.claimed_by or "").split(":")[1] for j in jobs)
    assert len(workers) == 2, f"both workers took jobs: {workers}"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_results_reach_a_destination_that_was_down_exactly_once(
    tmp_path: Path, db_url: str, engine: Engine, manifest: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    pacs_port, node_port = peers.free_port(), peers.free_port()
    config = node_support.write_node_config(
        tmp_path, database_url=db_url, receiver_port=node_port, manifest=manifest,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        sections={"export": {"backoff_base_s": 0.5, "backoff_cap_s": 1.0, "acse_timeout_s": 5.0}},
    )
    log_path = tmp_path / "node.log"
    node = node_support.start_node_process(config, ["run", "--no-web"], log_path=log_path)
    procs.append(node)
    peers.wait_for_port(node_port, proc=node, timeout=120)
    series = tmp_path / "series"
    node_support.tiny_series(series, "1.2.826.0.1.3680043.10.1453.91.1", "1.2.826.0.1.3680043.10.1453.91.2")
    sent = peers.storescu(node_port, [series])
    assert sent.returncode == 0, sent.stderr

    def export_failed_once() -> Job | None:
        with Session(engine) as s:
            job = s.scalars(select(Job).where(Job.kind == JobKind.export)).first()
            if job is not None:
                s.expunge(job)
        return job if job is not None and job.attempts >= 1 and job.state == JobState.queued else None

    job = node_support.wait_until(export_failed_once, 180, "an export attempt failing on the closed port",
                                  procs=[node], log_path=log_path)
    assert job.last_error, "the failed attempt recorded its error"

    out = tmp_path / "pacs"
    out.mkdir()
    pacs = subprocess.Popen([peers.dcmtk("storescp"), "+uf", "-aet", "PACS", "-od", str(out), str(pacs_port)],
                            env=peers.dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(pacs)
    peers.wait_for_port(pacs_port, proc=pacs)
    def exports() -> list[Job]:
        with Session(engine) as s:
            jobs = list(s.scalars(select(Job).where(Job.kind == JobKind.export).order_by(Job.id)))
            s.expunge_all()
        return jobs

    # the SR's job, then the images' job (queued once they were rendered)
    node_support.wait_until(lambda: len(exports()) == 2 and all(j.state == JobState.succeeded for j in exports()), 60,
                            "the exports delivered once the destination is up", procs=[node], log_path=log_path)
    sent_files = [Path(f).name for j in exports() for f in json.loads(j.payload)["files"]]
    assert sent_files[0].startswith("SR_") and len(sent_files) == len(set(sent_files))
    received = sorted(p.name for p in out.iterdir() if p.is_file())
    assert len(received) == len(sent_files), f"each object delivered exactly once: {received}"
    assert sum(1 for n in received if n.startswith("SR")) == 1
