"""The inference worker on SQLite and PostgreSQL: result, outputs, exports, skips, rejections, retries."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from pe_triage_node.config import NodeConfig
from pe_triage_node.db.models import Job, JobKind, JobState, Rejection, Series, SeriesState, TriageResult
from pe_triage_node.rules import Findings, priority_for, queue_priority
from pe_triage_node.rules.store import active_rules
from pe_triage_node.worker import InferenceWorker, JobOutcome
from pe_triage_node.worker.inference_worker import load_analyser

try:
    from tests import node_support
except ModuleNotFoundError:
    import node_support  # type: ignore[no-redef]

STUDY = "1.2.826.0.1.3680043.10.1453.88.1"
SERIES = "1.2.826.0.1.3680043.10.1453.88.2"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return node_support.tiny_manifest(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def series_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return node_support.tiny_series(tmp_path_factory.mktemp("series"), STUDY, SERIES)


def _cfg(tmp_path: Path, db_url: str, manifest: Path, **export: object) -> NodeConfig:
    return NodeConfig(
        node={"var_dir": tmp_path / "var"},
        database={"url": db_url},
        inference={"device": "cpu", "weights_manifest": manifest, "lung_crop": "threshold", "batch_size": 4,
                   "precision": "fp32"},
        export={"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}], **export},
        worker={"backoff_base_s": 1.0},
    )


@pytest.fixture
def worker(tmp_path: Path, db_url: str, engine: Engine, manifest: Path) -> Iterator[InferenceWorker]:
    cfg = _cfg(tmp_path, db_url, manifest)
    yield InferenceWorker(engine, cfg, load_analyser(cfg))


def test_worker_stores_result_renders_outputs_and_queues_exports(worker: InferenceWorker, series_files: list[Path]) -> None:
    job_id = node_support.seed_selected_series(worker.engine, worker.cfg.spool_dir, series_files)
    assert worker.process_one() == JobOutcome.done
    assert worker.process_one() is None

    with Session(worker.engine) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.succeeded
        row = s.scalars(select(TriageResult)).one()
        rules = active_rules(s)
        exports = s.scalars(select(Job).where(Job.kind == JobKind.export)).all()
    labels, probs, attrs = json.loads(row.labels), json.loads(row.probabilities), json.loads(row.attributes)
    assert "pe_present" in labels and "pe_present" in probs
    assert attrs["Modality"] == "CT" and "PatientName" not in attrs
    # the stored priority is the rules' decision for the stored findings (what `rules test` replays)
    decision = priority_for(Findings(labels, probs), attrs, rules)
    assert (row.priority, row.rule_name) == (decision.priority.value, decision.rule_name)
    assert row.job_id == job_id and row.series_instance_uid == SERIES and row.study_instance_uid == STUDY
    body = json.loads(row.result_json)
    assert body["series_instance_uid"] == SERIES and "worker_render" in body["timings_s"]

    out_dir = worker.cfg.resolve(worker.cfg.export.outputs_dir) / SERIES
    names = sorted(p.name for p in out_dir.iterdir())
    assert any(n.startswith("SR_") for n in names) and any(n.startswith("SC_") for n in names)
    assert "summary.png" in names
    # one export job per destination, at the result's queue priority, naming the files
    assert len(exports) == 1
    payload = json.loads(exports[0].payload)
    assert payload["destination"] == "pacs" and exports[0].priority == queue_priority(row.priority)
    assert all(Path(f).is_file() and Path(f).parent == out_dir for f in payload["files"])


def test_superseded_generation_is_skipped(worker: InferenceWorker, series_files: list[Path]) -> None:
    job_id = node_support.seed_selected_series(worker.engine, worker.cfg.spool_dir, series_files)
    with Session(worker.engine) as s, s.begin():
        s.execute(update(Series).values(generation=1))  # late instances re-opened the series
    assert worker.process_one() == JobOutcome.skipped
    with Session(worker.engine) as s:
        assert s.get(Job, job_id).state == JobState.succeeded  # type: ignore[union-attr]
        assert s.scalars(select(TriageResult)).first() is None


def test_a_series_the_engine_refuses_is_rejected_for_good(
    worker: InferenceWorker, tmp_path: Path
) -> None:
    few = node_support.tiny_series(tmp_path / "few", STUDY, SERIES, slices=5)  # fewer than one window
    job_id = node_support.seed_selected_series(worker.engine, worker.cfg.spool_dir, few)
    assert worker.process_one() == JobOutcome.rejected
    with Session(worker.engine) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.dead and "volume rejected" in (job.last_error or "")
        rej = s.scalars(select(Rejection)).one()
        assert rej.stage == "inference" and rej.series_instance_uid == SERIES and "window" in rej.reason
        assert s.scalars(select(Series)).one().state == SeriesState.rejected


def test_errors_retry_with_backoff_then_dead_letter(worker: InferenceWorker, series_files: list[Path]) -> None:
    job_id = node_support.seed_selected_series(worker.engine, worker.cfg.spool_dir, series_files, max_attempts=2)
    victim = next(worker.cfg.spool_dir.rglob("*.dcm"))
    victim.unlink()  # the spool lost a file: an error that may go away (a shared spool lagging)
    assert worker.process_one() == JobOutcome.failed
    with Session(worker.engine) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.queued and job.attempts == 1
        assert "FileNotFoundError" in (job.last_error or "")
        s.execute(update(Job).where(Job.id == job_id).values(not_before=job.created_at))  # skip the backoff
        s.commit()
    assert worker.process_one() == JobOutcome.failed
    with Session(worker.engine) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.dead and job.attempts == 2
