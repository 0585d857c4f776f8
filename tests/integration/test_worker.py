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
from pe_triage_node.worker.inference_worker import load_model

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
    yield InferenceWorker(engine, cfg, load_model(cfg))


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
    # two export jobs per DICOM destination, at the result's queue priority, naming the files:
    # the SR alone (queued with the result), then the SCs and the KOS (queued once rendered)
    assert len(exports) == 2
    first, then = (json.loads(e.payload) for e in sorted(exports, key=lambda e: e.id))
    assert [Path(f).name[:3] for f in first["files"]] == ["SR_"]
    assert then["files"] and all(Path(f).name[:3] in ("SC_", "KO_") for f in then["files"])
    assert {Path(f).name for f in first["files"] + then["files"]} == {n for n in names if n.endswith(".dcm")}
    for export, payload in zip(sorted(exports, key=lambda e: e.id), (first, then)):
        assert payload["destination"] == "pacs" and export.priority == queue_priority(row.priority)
        assert all(Path(f).is_file() and Path(f).parent == out_dir for f in payload["files"])


def test_a_worker_failing_after_the_sr_was_stored_completes_with_the_images_once(
    tmp_path: Path, db_url: str, engine: Engine, manifest: Path, series_files: list[Path]
) -> None:
    """The SR is stored and queued before the images are rendered; a worker that fails (or dies) in
    between leaves the job to be run again, which stores the images only: one result, each file queued once."""
    cfg = _cfg(tmp_path, db_url, manifest)
    failing = True

    def crash_before_images(_job_id: int, stage: str) -> None:
        if stage == "images" and failing:
            raise RuntimeError("the worker died after storing the SR")

    worker = InferenceWorker(engine, cfg, load_model(cfg), on_stage=crash_before_images)
    job_id = node_support.seed_selected_series(engine, cfg.spool_dir, series_files)
    assert worker.process_one() == JobOutcome.failed
    with Session(engine) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.queued and "died after storing the SR" in (job.last_error or "")
        (sr_job,) = s.scalars(select(Job).where(Job.kind == JobKind.export)).all()
        assert [Path(f).name[:3] for f in json.loads(sr_job.payload)["files"]] == ["SR_"]
        assert len(s.scalars(select(TriageResult)).all()) == 1
        s.execute(update(Job).where(Job.id == job_id).values(not_before=job.created_at))  # skip the backoff
        s.commit()
    failing = False
    assert worker.process_one() == JobOutcome.done
    with Session(engine) as s:
        assert s.get(Job, job_id).state == JobState.succeeded  # type: ignore[union-attr]
        (row,) = s.scalars(select(TriageResult)).all()
        assert row.job_id == job_id
        exports = sorted(s.scalars(select(Job).where(Job.kind == JobKind.export)).all(), key=lambda e: e.id)
    files = [Path(f).name for e in exports for f in json.loads(e.payload)["files"]]
    assert len(exports) == 2 and len(files) == len(set(files)), "each output queued once"
    out_dir = cfg.resolve(cfg.export.outputs_dir) / SERIES
    assert set(files) == {p.name for p in out_dir.glob("*.dcm")}
    assert files[0].startswith("SR_") and any(f.startswith("SC_") for f in files[1:])


def test_superseded_generation_is_skipped(worker: InferenceWorker, series_files: list[Path]) -> None:
    job_id = node_support.seed_selected_series(worker.engine, worker.cfg.spool_dir, series_files)
    with Session(worker.engine) as s, s.begin():
        s.execute(update(Series).values(generation=1))  # late instances re-opened the series
    assert worker.process_one() == JobOutcome.skipped
    with Session(worker.engine) as s:
        assert s.get(Job, job_id).state == JobState.succeeded  # type: ignore[union-attr]
        assert s.scalars(select(TriageResult)).first() is None


def test_a_series_the_engine_refuses_is_rejected_with_its_reason_and_the_job_completes(
    worker: InferenceWorker, tmp_path: Path
) -> None:
    few = node_support.tiny_series(tmp_path / "few", STUDY, SERIES, slices=5)  # fewer than one window
    job_id = node_support.seed_selected_series(worker.engine, worker.cfg.spool_dir, few)
    assert worker.process_one() == JobOutcome.rejected
    with Session(worker.engine) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.succeeded, "a readable rejection is not a dead letter"
        assert job.last_error is None
        rej = s.scalars(select(Rejection)).one()
        assert rej.stage == "inference" and rej.series_instance_uid == SERIES and "window" in rej.reason
        series = s.scalars(select(Series)).one()
        assert series.state == SeriesState.rejected and "window" in (series.state_reason or "")
        assert s.scalars(select(TriageResult)).first() is None


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


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_relative_var_dir_works_whatever_the_current_folder(
    tmp_path: Path, db_url: str, engine: Engine, manifest: Path, series_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quick start's default ``var_dir = "var"``: spool paths are relative; the worker loads the files
    by their paths (once, symlinks from a temporary folder made every one of them dangle)."""
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path, db_url, manifest).model_copy(update={"node": NodeConfig(node={"var_dir": "var"}).node})
    worker = InferenceWorker(engine, cfg, load_model(cfg))
    job_id = node_support.seed_selected_series(engine, cfg.spool_dir, series_files)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the process's folder changed after start-up
    assert worker.process_one() == JobOutcome.done
    with Session(engine) as s:
        assert s.get(Job, job_id).state == JobState.succeeded  # type: ignore[union-attr]
    assert any((tmp_path / "var" / "outputs" / SERIES).glob("SR_*.dcm"))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_malformed_private_element_in_every_slice_does_not_fail_the_study(
    worker: InferenceWorker, tmp_path: Path
) -> None:
    """A Philips (01F1,1026) holding text in a binary VR, in every slice: analysed, rendered, exported."""
    from tests import export_support

    files = node_support.tiny_series(tmp_path / "philips", STUDY, SERIES)
    export_support.add_malformed_private_element(files)
    job_id = node_support.seed_selected_series(worker.engine, worker.cfg.spool_dir, files)
    assert worker.process_one() == JobOutcome.done
    with Session(worker.engine) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.succeeded and job.attempts == 1
        assert s.scalars(select(TriageResult)).one().job_id == job_id
        assert len(s.scalars(select(Job).where(Job.kind == JobKind.export)).all()) == 2  # the SR, then the images


#: Values a sender wrote that the outputs need but cannot use as they are.
NON_CONFORMING = {
    "PatientBirthDate": "19XX0101",  # not a date: highdicom parses it
    "PatientSex": "Q",  # not M, F or O: highdicom's enumeration
    "ReferringPhysicianName": "DOE^JOHN\\ROE^RICHARD",  # two values where one is allowed
    "StudyTime": "99:99",
    "PatientAge": "200Z",
    "PatientID": "X" * 100,  # longer than LO allows: copied as it came (the PACS files the study under it)
}


def test_non_conforming_values_the_outputs_copy_do_not_fail_the_study(worker: InferenceWorker, tmp_path: Path) -> None:
    import pydicom

    files = node_support.tiny_series(tmp_path / "odd", STUDY, SERIES)
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in NON_CONFORMING.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
    job_id = node_support.seed_selected_series(worker.engine, worker.cfg.spool_dir, files)
    assert worker.process_one() == JobOutcome.done
    with Session(worker.engine) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.succeeded and job.attempts == 1
    (sr,) = (worker.cfg.export.outputs_dir / SERIES).glob("SR_*.dcm")
    out = pydicom.dcmread(sr)
    assert out.PatientID == "X" * 100 and out.PatientBirthDate == "" and out.PatientSex == ""


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_infer_outputs_and_the_worker_decide_the_same_priority(
    worker: InferenceWorker, manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One decision: the rule reads a multi-valued attribute and the study's pe_present probability
    (the standalone path once had neither: ``str(MultiValue)`` and no window probability)."""
    import pydicom

    from pe_triage_node.cli import main
    from pe_triage_node.rules.store import activate
    from pe_triage_node.synth.ct_series import StudyIdentity, write_ct_series
    from tests import export_support

    rules = tmp_path / "rules.toml"
    rules.write_text(
        'default_priority = "ROUTINE"\n'
        "[[rules]]\n"
        'name = "Sharp kernel, any PE probability"\n'
        'priority = "STAT"\n'
        'when.all = [ { attribute = "ConvolutionKernel", equals = "B30f\\\\SHARP" },'
        ' { probability = "pe_present", gte = 0.0 } ]\n'
    )
    with Session(worker.engine) as s, s.begin():
        activate(s, rules.read_text(), "test", "the same rules as the file")
    series = tmp_path / "series"
    write_ct_series(export_support.chest_volume(), series, pixel_spacing=(1.5, 1.5), slice_spacing=2.0,
                    study=StudyIdentity(study_instance_uid=STUDY), series_instance_uid=SERIES,
                    kernel="B30f\\SHARP", extra=export_support.CONTRAST)
    node_support.seed_selected_series(worker.engine, worker.cfg.spool_dir, sorted(series.glob("*.dcm")))
    assert worker.process_one() == JobOutcome.done
    with Session(worker.engine) as s:
        row = s.scalars(select(TriageResult)).one()
    assert (row.priority, row.rule_name) == ("STAT", "Sharp kernel, any PE probability")

    out = tmp_path / "outputs"
    assert main(["infer", str(series), "--weights", str(manifest), "--device", "cpu", "--outputs", str(out),
                 "--rules", str(rules)]) == 0
    assert "priority STAT: " in capsys.readouterr().out
    [sr] = out.glob("SR_*.dcm")
    assert pydicom.dcmread(sr).SeriesDescription.startswith("AI PE TRIAGE: STAT")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_unreadable_spool_file_is_the_nodes_failure_not_a_rejection(
    worker: InferenceWorker, series_files: list[Path]
) -> None:
    job_id = node_support.seed_selected_series(worker.engine, worker.cfg.spool_dir, series_files)
    next(worker.cfg.spool_dir.rglob("*.dcm")).write_bytes(b"not DICOM: a damaged disk")
    assert worker.process_one() == JobOutcome.failed
    with Session(worker.engine) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.queued and "InvalidDicomError" in (job.last_error or "")
        assert s.scalars(select(Rejection)).first() is None
        assert s.scalars(select(Series)).one().state == SeriesState.selected
