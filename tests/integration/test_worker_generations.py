"""A corrected result replaces the old one: late instances re-open a series (a new generation).

* in order: the second result gets new UIDs, its SR names the first as its
  predecessor, the first's files leave the outputs folder and its queued exports are superseded;
* concurrently: a job of the superseded generation that reaches its store step
  after the new generation's result is in place writes and deletes nothing.

Both on SQLite and PostgreSQL (the series row lock differs: write lock vs row lock).
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from pe_triage_node.config import NodeConfig
from pe_triage_node.db.models import Job, JobEvent, JobKind, JobState, TriageResult
from pe_triage_node.export.identity import OutputUIDs
from pe_triage_node.worker import InferenceWorker, JobOutcome
from pe_triage_node.worker.inference_worker import STAGING_DIR, load_model

try:
    from tests import node_support
except ModuleNotFoundError:
    import node_support  # type: ignore[no-redef]

STUDY = "1.2.826.0.1.3680043.10.1453.87.1"
SERIES = "1.2.826.0.1.3680043.10.1453.87.2"
FIRST = 30  # slices of the first generation; the late instances bring the series to 40


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return node_support.tiny_manifest(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    files = node_support.tiny_series(tmp_path_factory.mktemp("series"), STUDY, SERIES, slices=40)
    return sorted(files, key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber))


@pytest.fixture
def cfg(tmp_path: Path, db_url: str, manifest: Path) -> NodeConfig:
    return NodeConfig(
        node={"var_dir": tmp_path / "var"},
        database={"url": db_url},
        inference={"device": "cpu", "weights_manifest": manifest, "lung_crop": "threshold", "batch_size": 4},
        export={"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}]},
    )


def _outputs(cfg: NodeConfig) -> Path:
    return cfg.resolve(cfg.export.outputs_dir) / SERIES


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _exports(engine: Engine) -> list[Job]:
    with Session(engine) as s:
        jobs = s.scalars(select(Job).where(Job.kind == JobKind.export).order_by(Job.id)).all()
        s.expunge_all()
    return list(jobs)


def test_late_instances_give_a_new_result_that_replaces_the_old_one(
    cfg: NodeConfig, engine: Engine, slices: list[Path]
) -> None:
    worker = InferenceWorker(engine, cfg, load_model(cfg))
    node_support.seed_selected_series(engine, cfg.spool_dir, slices[:FIRST], generation=0)
    assert worker.process_one() == JobOutcome.done
    first_files = _snapshot(_outputs(cfg))
    first_exports = _exports(engine)  # the SR, then the images
    assert len(first_exports) == 2
    assert all(j.state == JobState.queued for j in first_exports)  # the PACS has not taken them yet

    node_support.seed_selected_series(engine, cfg.spool_dir, slices, generation=1)  # the late instances
    assert worker.process_one() == JobOutcome.done

    with Session(engine) as s:
        rows = s.scalars(select(TriageResult).order_by(TriageResult.id)).all()
        superseded = s.scalars(select(JobEvent.event).where(JobEvent.job_id.in_([j.id for j in first_exports]))).all()
    assert [r.generation for r in rows] == [0, 1]
    second_files = _snapshot(_outputs(cfg))
    dicom = {n for n in first_files if n.endswith(".dcm")}, {n for n in second_files if n.endswith(".dcm")}
    assert dicom[0] and dicom[1] and not dicom[0] & dicom[1], "every object of the corrected result is a new instance"
    assert first_files["summary.png"] != second_files["summary.png"], "the web shows the new result"
    old = OutputUIDs(SERIES, rows[0].model_version, cfg.export.uid_prefix, 0)
    new = OutputUIDs(SERIES, rows[1].model_version, cfg.export.uid_prefix, 1)
    assert f"SR_{old.sr_instance}.dcm" in first_files and f"SR_{new.sr_instance}.dcm" in second_files
    sr = pydicom.dcmread(_outputs(cfg) / f"SR_{new.sr_instance}.dcm")
    predecessor = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.SeriesInstanceUID == old.sr_series
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old.sr_instance

    exports = _exports(engine)
    assert [j.state for j in exports] == [JobState.succeeded] * 2 + [JobState.queued] * 2
    assert superseded.count("superseded") == 2, "the old result's exports are not sent after the new one"
    files = [f for j in exports[2:] for f in json.loads(j.payload)["files"]]
    assert sorted(Path(f).name for f in files) == sorted(dicom[1])


def test_a_job_of_a_superseded_generation_writes_and_deletes_nothing(
    cfg: NodeConfig, engine: Engine, slices: list[Path]
) -> None:
    """Generation 0's job is held just before its store step while generation 1's job runs to the end."""
    at_store, release = threading.Event(), threading.Event()
    stale_job: list[int] = []

    def hold(job_id: int, stage: str) -> None:
        if stage == "store" and job_id in stale_job:
            at_store.set()
            if not release.wait(120):
                raise RuntimeError("never released")

    model = load_model(cfg)
    stale = InferenceWorker(engine, cfg, model, on_stage=hold)
    current = InferenceWorker(engine, cfg, model)
    stale_job.append(node_support.seed_selected_series(engine, cfg.spool_dir, slices[:FIRST], generation=0))
    outcome: list[JobOutcome | None] = []
    thread = threading.Thread(target=lambda: outcome.append(stale.process_one()))
    thread.start()
    try:
        assert at_store.wait(120), "the stale job reached its store step"
        node_support.seed_selected_series(engine, cfg.spool_dir, slices, generation=1)
        assert current.process_one() == JobOutcome.done
        placed = _snapshot(_outputs(cfg))
        exports = _exports(engine)
    finally:
        release.set()
        thread.join(120)
    assert outcome == [JobOutcome.skipped]
    assert _snapshot(_outputs(cfg)) == placed, "the superseded job wrote and deleted nothing"
    assert [(j.id, j.state) for j in _exports(engine)] == [(j.id, j.state) for j in exports], "and queued no export"
    with Session(engine) as s:
        rows = s.scalars(select(TriageResult)).all()
        job = s.get(Job, stale_job[0])
        assert job is not None and job.state == JobState.succeeded and "superseded" in (
            s.scalars(select(JobEvent.detail).where(JobEvent.job_id == job.id, JobEvent.event == "succeeded")).one() or "")
    assert [r.generation for r in rows] == [1]
    assert list((cfg.resolve(cfg.export.outputs_dir) / STAGING_DIR).iterdir()) == [], "its staged files are gone"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_staging_left_by_a_dead_worker_is_removed_at_start_up(cfg: NodeConfig, engine: Engine) -> None:
    import os

    worker = InferenceWorker(engine, cfg, load_model(cfg))
    root = cfg.resolve(cfg.export.outputs_dir) / STAGING_DIR
    old, fresh = root / "job-1-dead", root / "job-2-running"
    for folder in (old, fresh):
        folder.mkdir(parents=True)
        (folder / "SR_1.2.3.dcm").write_bytes(b"x")
    os.utime(old, (1_000_000_000, 1_000_000_000))
    assert worker.remove_stale_staging() == 1
    assert not old.exists() and fresh.exists()
