"""The inference worker (DESIGN.md, "Processes": worker).

One job at a time per process::

    claim infer job ──▶ still current? (series selected, same generation) ── no ──▶ complete (skipped)
         │ yes
         ▼
    instance files from the ``instances`` rows (in the spool) ──▶ engine.analyse
         │ VolumeRejected ──▶ rejections row (stage "inference"), series rejected, job dead (no retry)
         │ other error    ──▶ fail with exponential backoff; dead-lettered after max_attempts
         ▼
    priority rules (active rule set) ──▶ SR + SCs (+ PNGs) under ``<outputs_dir>/<series uid>/``
         ▼
    one transaction: ``results`` row + one export job per destination (queue priority of the result)
         ▼
    complete

A thread renews the lease every ``queue.heartbeat_s`` while the job runs; when
the lease is lost (the worker was too slow, or the job was taken back) the
worker abandons the job at the next stage boundary and stores nothing. A
worker that dies mid-job leaves a stale heartbeat: the next ``claim`` by any
worker (``queue.lease_s`` later) takes the job back and runs it again. A result
is stored at most once per job: a re-run that finds a ``results`` row for its
job id (the previous holder died between storing and completing) only
completes the job.

Logs carry job ids, UIDs and priorities, never patient identifiers.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from pe_triage_node.config import NodeConfig
from pe_triage_node.db.models import Instance, JobKind, Rejection, Series, SeriesState, TriageResult
from pe_triage_node.errors import VolumeRejected
from pe_triage_node.inference.volume import CTVolume, load_ct_volume
from pe_triage_node.queue import ClaimedJob, backoff_delay, claim, complete, fail, heartbeat, worker_identity

if TYPE_CHECKING:  # torch only where the engine is built
    from pydicom.dataset import Dataset

    from pe_triage_node.inference.engine import InferenceEngine
    from pe_triage_node.inference.result import StudyResult
    from pe_triage_node.rules import PriorityDecision

log = logging.getLogger(__name__)

#: Exit code of ``pe-triage worker`` when no model weights can be loaded (the supervisor does not restart it).
EXIT_NO_WEIGHTS = 3


class JobOutcome(str, enum.Enum):
    """What became of one claimed job."""

    done = "done"  # result stored, outputs written, exports queued, job succeeded
    skipped = "skipped"  # superseded (newer generation / series no longer selected); job succeeded
    rejected = "rejected"  # the engine refused the series; rejection recorded, job dead
    failed = "failed"  # an error; job re-queued with backoff or dead-lettered
    lease_lost = "lease-lost"  # another worker may hold it now; nothing stored


class LeaseLost(Exception):
    """The job's lease was lost while it ran (too slow a heartbeat, or taken back)."""


class _LeaseKeeper:
    """Renews a job's lease from a background thread; ``lost`` is set when a renewal is refused."""

    def __init__(self, engine: Engine, job_id: int, worker_id: str, every_s: float) -> None:
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._args = (engine, job_id, worker_id)
        self._every = every_s
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def _run(self) -> None:
        engine, job_id, worker_id = self._args
        while not self._stop.wait(self._every):
            try:
                if not heartbeat(engine, job_id, worker_id):
                    self.lost.set()
                    return
            except Exception:  # a database hiccup: try again next period (the lease is longer)
                log.warning("job %d heartbeat failed, retrying", job_id, exc_info=True)

    def check(self) -> None:
        """Raise :class:`LeaseLost` when the lease was lost."""
        if self.lost.is_set():
            raise LeaseLost

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@dataclass(frozen=True)
class _SeriesFiles:
    series_id: int
    generation: int
    study_instance_uid: str
    series_instance_uid: str
    files: list[Path]


def _attribute_text(value: Any) -> str:
    """A DICOM value as text; multi-valued ones joined with backslashes (their PS3.5 encoding)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def stored_attributes(ds: Dataset) -> dict[str, str]:
    """The attributes the rules read (``STORED_ATTRIBUTES``) from one instance's header."""
    from pe_triage_node.rules import STORED_ATTRIBUTES

    out: dict[str, str] = {}
    for keyword in STORED_ATTRIBUTES:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        out[keyword] = _attribute_text(value)
    return out


def stored_findings(result: StudyResult) -> tuple[dict[str, bool], dict[str, float]]:
    """Labels (with derived ``pe_present`` / ``acute_pe``) and probabilities as the ``results`` row keeps them.

    ``pe_present`` / ``pe_present_on_image`` probability: the study's highest
    window probability. The priority is decided from exactly these, so that
    ``pe-triage rules test`` replays give the same decision for unchanged rules.
    """
    from pe_triage_node.rules import derived_labels

    labels = derived_labels(result.labels)
    probabilities = {k: float(v) for k, v in result.probabilities.items()}
    if result.window_probabilities:
        top = float(max(result.window_probabilities))
        probabilities.setdefault("pe_present_on_image", top)
        probabilities.setdefault("pe_present", top)
    return labels, probabilities


def write_pngs(datasets: list[Dataset], out_dir: Path) -> list[Path]:
    """PNG copies of the Secondary Captures for the web study page.

    ``datasets`` in :func:`~pe_triage_node.export.outputs.render_outputs` order
    (SR, summary SC, Grad-CAM SCs): ``summary.png``, then ``gradcam-1.png``, ...
    """
    from PIL import Image

    paths = []
    scs = [ds for ds in datasets if ds.Modality != "SR" and "PixelData" in ds]
    for i, ds in enumerate(scs):
        arr = ds.pixel_array
        image = Image.fromarray(arr, "RGB" if arr.ndim == 3 else "L")
        name = "summary.png" if i == 0 else f"gradcam-{i}.png"
        tmp = out_dir / f".tmp-{name}"
        image.save(tmp, format="PNG")
        os.replace(tmp, out_dir / name)
        paths.append(out_dir / name)
    return paths


class InferenceWorker:
    """Claims and runs ``infer`` jobs for one node configuration with one loaded engine.

    ``analyser``: the :class:`~pe_triage_node.inference.engine.InferenceEngine`
    (anything with ``analyse(folder) -> StudyResult``), loaded once by the caller.
    """

    def __init__(
        self,
        engine: Engine,
        cfg: NodeConfig,
        analyser: InferenceEngine,
        *,
        worker_id: str | None = None,
        on_stage: Callable[[int, str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.cfg = cfg
        self.analyser = analyser
        self.worker_id = worker_id or worker_identity("worker")
        self.outputs_root = cfg.resolve(cfg.export.outputs_dir)
        self._on_stage = on_stage  # tests: called with (job id, stage name)

    # -- one job -----------------------------------------------------------------
    def process_one(self) -> JobOutcome | None:
        """Claim and run one due ``infer`` job; ``None`` when none was due."""
        q = self.cfg.queue
        job = claim(self.engine, JobKind.infer, self.worker_id, lease_s=q.lease_s, max_wait_s=q.max_wait_s)
        if job is None:
            return None
        every = max(0.2, min(q.heartbeat_s, q.lease_s / 3))
        try:
            with _LeaseKeeper(self.engine, job.id, self.worker_id, every) as lease:
                return self._run(job, lease)
        except LeaseLost:
            log.warning("job %d abandoned: lease lost (another worker may run it)", job.id)
            return JobOutcome.lease_lost
        except VolumeRejected as exc:
            self._reject(job, str(exc))
            return JobOutcome.rejected
        except Exception as exc:  # noqa: BLE001 - any failure becomes the job's last_error
            log.error("job %d failed series=%s", job.id, job.series_instance_uid, exc_info=True)
            w = self.cfg.worker
            delay = backoff_delay(job.attempts, w.backoff_base_s, w.backoff_cap_s)
            fail(self.engine, job.id, self.worker_id, f"{type(exc).__name__}: {exc}", retry_delay_s=delay)
            return JobOutcome.failed

    def _stage(self, job: ClaimedJob, stage: str) -> None:
        if self._on_stage is not None:
            self._on_stage(job.id, stage)

    def _run(self, job: ClaimedJob, lease: _LeaseKeeper) -> JobOutcome:
        t0 = time.perf_counter()
        current = self._current_series(job)
        if isinstance(current, str):
            log.info("job %d skipped series=%s: %s", job.id, job.series_instance_uid, current)
            complete(self.engine, job.id, self.worker_id, f"skipped: {current}")
            return JobOutcome.skipped
        self._stage(job, "loaded")
        with tempfile.TemporaryDirectory(prefix="pe-triage-job-") as tmp:
            folder = Path(tmp)
            for i, path in enumerate(current.files):
                os.symlink(path, folder / f"{i:06d}.dcm")
            t_inf = time.perf_counter()
            self._stage(job, "inference")
            # Loaded here, not by analyse(), so that the rules and the outputs read the same headers and HU.
            volume = load_ct_volume(folder, max_tilt_deg=self.analyser.max_tilt_deg, keep_datasets=True)
            load_s = time.perf_counter() - t_inf
            attributes = stored_attributes(volume.datasets[0])
            result = self.analyser.analyse(volume)
            result.timings_s["load"] = round(load_s, 4)
            result.timings_s["total"] = round(result.timings_s["total"] + load_s, 4)
            inference_s = time.perf_counter() - t_inf
            lease.check()
            if result.series_instance_uid != current.series_instance_uid:
                raise VolumeRejected("the instance files do not belong to the series of the job")
            decision, rule_set_id, labels, probabilities = self._decide(result, attributes)
            self._stage(job, "render")
            t_render = time.perf_counter()
            paths = self._write_outputs(result, volume, decision)
            render_s = time.perf_counter() - t_render
            del volume
        lease.check()
        timings = dict(result.timings_s)
        timings.update(
            worker_inference=round(inference_s, 4),
            worker_render=round(render_s, 4),
            worker_before_store=round(time.perf_counter() - t0, 4),
        )
        stored = self._store(job, current, result, decision, rule_set_id, labels, probabilities, attributes, timings, paths)
        if stored is None:
            complete(self.engine, job.id, self.worker_id, "skipped: superseded while running")
            return JobOutcome.skipped
        if not complete(self.engine, job.id, self.worker_id, f"result {stored} priority {decision.priority.value}"):
            return JobOutcome.lease_lost
        log.info(
            "job %d done series=%s priority=%s result=%d model=%s in %.2f s (inference %.2f s)",
            job.id, current.series_instance_uid, decision.priority.value, stored,
            result.model_version, time.perf_counter() - t0, inference_s,
        )
        return JobOutcome.done

    def _current_series(self, job: ClaimedJob) -> _SeriesFiles | str:
        """The series' instance files when the job is still current, else why it is not."""
        uid = job.payload.get("series_instance_uid") or job.series_instance_uid
        generation = job.payload.get("generation")
        if not isinstance(uid, str) or not uid:
            raise VolumeRejected("the job names no series")
        with Session(self.engine) as s:
            series = s.scalars(select(Series).where(Series.series_instance_uid == uid)).one_or_none()
            if series is None:
                return "the series is no longer known"
            if generation is not None and int(generation) != series.generation:
                return f"generation {generation} superseded by {series.generation}"
            if series.state != SeriesState.selected:
                return f"the series is {series.state.value}, not selected"
            rel = s.scalars(
                select(Instance.spool_path).where(Instance.series_id == series.id).order_by(Instance.id)
            ).all()
            study_uid = series.study.study_instance_uid
            sid, gen = series.id, series.generation
        spool = self.cfg.spool_dir
        files = [spool / p for p in rel]
        missing = [p for p in files if not p.is_file()]
        if not files:
            raise VolumeRejected("the series has no stored instances")
        if missing:
            # A shared spool may lag behind the database: retry with backoff.
            raise FileNotFoundError(f"{len(missing)} of {len(files)} instance files not in the spool")
        return _SeriesFiles(sid, gen, study_uid, uid, files)

    def _decide(
        self, result: StudyResult, attributes: Mapping[str, str]
    ) -> tuple[PriorityDecision, int | None, dict[str, bool], dict[str, float]]:
        from pe_triage_node.rules import Findings, priority_for
        from pe_triage_node.rules.store import active_rule_set

        labels, probabilities = stored_findings(result)
        with Session(self.engine) as s:
            active = active_rule_set(s)
        decision = priority_for(Findings(labels, probabilities), attributes, active.rules)
        return decision, active.rule_set_id, labels, probabilities

    def _write_outputs(self, result: StudyResult, volume: CTVolume, decision: PriorityDecision) -> list[Path]:
        """SR and SCs as DICOM files (and PNGs) under ``<outputs>/<source series uid>/``; stale files removed."""
        from pe_triage_node.dicom.uids import validate_uid
        from pe_triage_node.export.outputs import output_filename, render_outputs, save_atomically

        out_dir = self.outputs_root / validate_uid(result.series_instance_uid, "SeriesInstanceUID")
        out_dir.mkdir(parents=True, exist_ok=True)
        datasets = render_outputs(result, volume.datasets, decision, uid_prefix=self.cfg.export.uid_prefix, hu_of=volume.slice_hu)
        paths = []
        for ds in datasets:
            path = out_dir / output_filename(ds)
            save_atomically(ds, path)
            paths.append(path)
        keep = set(paths)
        if self.cfg.worker.write_pngs:
            keep.update(write_pngs(datasets, out_dir))
        for old in out_dir.iterdir():  # a re-run with fewer Grad-CAM maps leaves none behind
            if old.is_file() and old not in keep and old.suffix in (".dcm", ".png") and not old.name.startswith(".tmp"):
                old.unlink(missing_ok=True)
        return paths

    def _store(
        self,
        job: ClaimedJob,
        current: _SeriesFiles,
        result: StudyResult,
        decision: PriorityDecision,
        rule_set_id: int | None,
        labels: dict[str, bool],
        probabilities: dict[str, float],
        attributes: Mapping[str, str],
        timings: dict[str, float],
        paths: list[Path],
    ) -> int | None:
        """The ``results`` row and the export jobs in one transaction; ``None`` when superseded meanwhile."""
        from pe_triage_node.export.exporter import enqueue_exports

        # Renew the lease just before storing: a refused renewal means someone else holds the job.
        if not heartbeat(self.engine, job.id, self.worker_id):
            raise LeaseLost
        body = result.to_dict("summary")
        body["timings_s"] = timings
        with Session(self.engine) as s, s.begin():
            series = s.get(Series, current.series_id)
            if series is None or series.generation != current.generation or series.state != SeriesState.selected:
                log.info("job %d result not stored: series=%s superseded while running", job.id, current.series_instance_uid)
                return None
            earlier = s.scalar(select(TriageResult.id).where(TriageResult.job_id == job.id))
            if earlier is not None:  # the previous holder stored it and died before completing
                log.info("job %d result %d already stored; completing only", job.id, earlier)
                return int(earlier)
            row = TriageResult(
                study_instance_uid=current.study_instance_uid,
                series_instance_uid=current.series_instance_uid,
                job_id=job.id,
                generation=current.generation,
                model_version=result.model_version[:64],
                labels=json.dumps(labels, sort_keys=True),
                probabilities=json.dumps(probabilities, sort_keys=True),
                attributes=json.dumps(dict(attributes), sort_keys=True),
                priority=decision.priority.value,
                rule_name=decision.rule_name,
                rule_set_id=rule_set_id,
                flags=json.dumps(list(decision.flags)),
                explanation=decision.explanation,
                result_json=json.dumps(body, allow_nan=False),
            )
            s.add(row)
            s.flush()
            export_ids = enqueue_exports(s, self.cfg.export, paths, result=result, decision=decision)
            log.info("job %d stored result %d, %d export job(s) priority=%s",
                     job.id, row.id, len(export_ids), decision.priority.value)
            return int(row.id)

    def _reject(self, job: ClaimedJob, reason: str) -> None:
        """The engine refused the series: rejection row, series rejected, job dead (retrying cannot help)."""
        log.warning("job %d series=%s rejected by the inference stage", job.id, job.series_instance_uid)
        generation = job.payload.get("generation")
        with Session(self.engine) as s, s.begin():
            s.add(Rejection(
                stage="inference",
                study_instance_uid=job.study_instance_uid,
                series_instance_uid=job.series_instance_uid,
                reason=reason,
            ))
            cond = [Series.series_instance_uid == job.series_instance_uid, Series.state == SeriesState.selected]
            if generation is not None:
                cond.append(Series.generation == int(generation))
            s.execute(
                update(Series).where(*cond)
                .values(state=SeriesState.rejected, state_reason=f"refused by the inference stage: {reason}")
                .execution_options(synchronize_session=False)
            )
        fail(self.engine, job.id, self.worker_id, f"volume rejected: {reason}", retry=False)

    # -- the loop ----------------------------------------------------------------
    def run_forever(self, stop: threading.Event) -> None:
        """Run jobs until ``stop`` is set; poll every ``queue.poll_interval_s`` while idle.

        A job in progress is finished before returning (its lease would otherwise
        have to expire before another worker could take it).
        """
        log.info("worker %s started (device %s)", self.worker_id, getattr(self.analyser, "device", "?"))
        while not stop.is_set():
            try:
                outcome = self.process_one()
            except Exception:  # the database is down: wait and poll again
                log.error("worker %s: claiming failed", self.worker_id, exc_info=True)
                outcome = None
            if outcome is None:
                stop.wait(self.cfg.queue.poll_interval_s)
        log.info("worker %s stopped", self.worker_id)


def load_analyser(cfg: NodeConfig, *, random_weights: bool = False) -> InferenceEngine:
    """The engine from ``[inference]`` (raises ``WeightsError`` when the weights are missing or corrupt)."""
    from pe_triage_node.inference.engine import InferenceEngine

    if random_weights:
        log.warning("worker running RANDOM WEIGHTS: every result is meaningless (smoke tests only)")
    return InferenceEngine.from_config(cfg.inference, random_weights=random_weights)


def run_worker_service(cfg: NodeConfig, *, random_weights: bool = False) -> int:
    """The ``pe-triage worker`` process: load the engine once, run jobs until SIGTERM/SIGINT.

    Returns the exit code (:data:`EXIT_NO_WEIGHTS` when the model cannot be loaded).
    """
    from pe_triage_node.db.session import make_engine
    from pe_triage_node.errors import WeightsError

    stop = threading.Event()

    def _handler(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: the worker stops after its current job", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    try:
        analyser = load_analyser(cfg, random_weights=random_weights)
    except WeightsError as exc:
        log.critical("worker cannot start: %s", exc)
        return EXIT_NO_WEIGHTS
    from pe_triage_node.export.outputs import warm_up

    warm_up()
    try:
        log.info("model warmed up on a synthetic chest in %.2f s", analyser.warm_up())
    except Exception:  # noqa: BLE001 - a failed warm-up costs the first study time, nothing more
        log.warning("model warm-up failed; the first study pays for it", exc_info=True)
    engine = make_engine(cfg.database_url, echo=cfg.database.echo)
    try:
        InferenceWorker(engine, cfg, analyser).run_forever(stop)
    finally:
        engine.dispose()
    return 0
