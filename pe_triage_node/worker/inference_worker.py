"""The inference worker (DESIGN.md, "Processes": worker).

One job at a time per process::

    claim infer job ──▶ still current? (series selected, same generation) ── no ──▶ complete (skipped)
         │ yes
         ▼
    load the instance files by their paths in the spool ──▶ engine.analyse
         │ (slices decoded ahead while the series arrived come from memory, :mod:`.prefetch`)
         │ InputRejected (the engine refuses the series, a reason a person can read)
         │     ──▶ one transaction: rejections row, series rejected, job complete (never a dead letter)
         │ other error (a file missing, the node's own trouble)
         │     ──▶ fail with exponential backoff; dead-lettered after max_attempts
         ▼
    priority rules (active rule set) ──▶ the SR written to a staging folder
         ▼
    one transaction: still current and still ours? ── no ──▶ nothing placed, nothing deleted (skipped)
         │ yes: the SR moved into ``<outputs_dir>/<series uid>/`` (older generations' files removed),
         │      ``results`` row, one export job per destination (the SR; HL7, FHIR, webhook), older
         ▼      queued exports superseded; the job stays running
    SCs + KOS (+ PNGs) written to the staging folder
         ▼
    one transaction: still current and still ours? ── no ──▶ nothing more placed (skipped)
         │ yes: the images moved beside the SR, one export job per file destination, job complete
         ▼
    done

The SR reaches each destination while the images are rendered (a destination
gets the SR, then the SCs and the KOS, each set in its own association). A
worker that dies between the two transactions leaves its job running: it is
taken back like any other, run again, finds the result its SR was stored with
and stores only the images (one result per job, the SR queued once).

A thread renews the lease every ``queue.heartbeat_s`` while the job runs; when
the lease is lost (the worker was too slow, or the job was taken back) the
worker abandons the job at the next stage boundary and stores nothing more. A
worker that dies mid-job leaves a stale heartbeat: the next ``claim`` by any
worker (``queue.lease_s`` later) takes the job back and runs it again. The
result and its SR commit together, the images and the job's completion
together, so a succeeded job has its result and all its outputs.

Each series generation gets its own output UIDs and its SR names the previous
result's SR as its predecessor (:mod:`pe_triage_node.export.identity`).

Logs carry job ids, UIDs and priorities, never patient identifiers; library
warnings raised while reading headers or building outputs are logged without
their text (:func:`~pe_triage_node.export.source.library_warnings_logged`).
"""

from __future__ import annotations

import enum
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import CursorResult, Engine, select, update
from sqlalchemy.orm import Session

from pe_triage_node.config import NodeConfig
from pe_triage_node.db.models import Instance, JobKind, Rejection, Series, SeriesState, TriageResult
from pe_triage_node.errors import InputRejected
from pe_triage_node.export.identity import OutputUIDs
from pe_triage_node.export.outputs import OutputSource, render_images, render_sr, write_datasets
from pe_triage_node.export.source import library_warnings_logged
from pe_triage_node.inference.volume import load_ct_volume
from pe_triage_node.queue import (
    ClaimedJob,
    LeaseKeeper,
    LeaseLost,
    backoff_delay,
    claim,
    complete,
    complete_in,
    fail,
    holds_in,
    renewal_period,
    run_until_stopped,
    supersede_queued,
    worker_identity,
)
from pe_triage_node.queue.wakeup import Wakeup
from pe_triage_node.stopping import stop_on_signals
from pe_triage_node.worker.prefetch import (
    HeapReserve,
    SlicePrefetch,
    heap_keeps_freed_memory,
    run_idle,
    volume_pages_reuse_freed_slices,
)

if TYPE_CHECKING:  # torch only where the engine is built
    from pydicom.dataset import Dataset

    from pe_triage_node.inference.engine import InferenceEngine
    from pe_triage_node.inference.result import StudyResult
    from pe_triage_node.rules import PriorityDecision, Triage

log = logging.getLogger(__name__)

#: Exit code of ``pe-triage worker`` when no model weights can be loaded (the supervisor does not restart it).
EXIT_NO_WEIGHTS = 3

#: Folder under ``export.outputs_dir`` where a job renders before its outputs are placed (same file system).
STAGING_DIR = ".staging"
#: A staging folder older than this was left by a worker that died mid-job: removed at start-up.
STALE_STAGING_S = 24 * 3600.0


class JobOutcome(str, enum.Enum):
    """What became of one claimed job."""

    done = "done"  # result stored, outputs placed, exports queued, job succeeded
    skipped = "skipped"  # superseded (newer generation / series no longer selected); job succeeded
    rejected = "rejected"  # the engine refused the series; rejection recorded, job succeeded
    failed = "failed"  # an error; job re-queued with backoff or dead-lettered
    lease_lost = "lease-lost"  # another worker may hold it now; nothing stored


class JobUnusable(Exception):
    """A job that cannot run however often it is retried (no series named, no instances recorded)."""


@dataclass(frozen=True)
class _SeriesFiles:
    series_id: int
    generation: int
    study_instance_uid: str
    series_instance_uid: str
    files: list[Path]


class _Superseded(Exception):
    """The series moved on (new generation, no longer selected) while the job ran."""


class InferenceWorker:
    """Claims and runs ``infer`` jobs for one node configuration with one loaded model.

    ``model``: the :class:`~pe_triage_node.inference.engine.InferenceEngine`
    (anything with ``analyse(volume) -> StudyResult`` and ``max_tilt_deg``), loaded once by the caller.
    Spool and outputs paths are made absolute once, here: the worker never depends on its current folder.
    """

    def __init__(
        self,
        engine: Engine,
        cfg: NodeConfig,
        model: InferenceEngine,
        *,
        worker_id: str | None = None,
        on_stage: Callable[[int, str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.cfg = cfg
        self.model = model
        self.worker_id = worker_id or worker_identity("worker")
        self.spool_dir = cfg.spool_dir.absolute()
        self.outputs_root = cfg.resolve(cfg.export.outputs_dir).absolute()
        self._on_stage = on_stage  # tests: called with (job id, stage name)
        budget = cfg.worker.prefetch_mb * 1024 * 1024
        self.prefetch = SlicePrefetch(engine, self.spool_dir, budget) if budget > 0 else None
        self.heap_reserve: HeapReserve | None = None  # set by the worker process (run_worker_service)

    # -- one job -----------------------------------------------------------------
    def process_one(self) -> JobOutcome | None:
        """Claim and run one due ``infer`` job; ``None`` when none was due."""
        q = self.cfg.queue
        job = claim(self.engine, JobKind.infer, self.worker_id, lease_s=q.lease_s, max_wait_s=q.max_wait_s)
        if job is None:
            return None
        try:
            with LeaseKeeper(self.engine, job.id, self.worker_id, renewal_period(q.heartbeat_s, q.lease_s)) as lease:
                return self._run(job, lease)
        except LeaseLost:
            log.warning("job %d abandoned: lease lost (another worker may run it)", job.id)
            return JobOutcome.lease_lost
        except JobUnusable as exc:
            log.error("job %d cannot run series=%s: %s", job.id, job.series_instance_uid, exc)
            fail(self.engine, job.id, self.worker_id, str(exc), retry=False)
            return JobOutcome.failed
        except Exception as exc:  # noqa: BLE001 - any failure becomes the job's last_error
            log.error("job %d failed series=%s", job.id, job.series_instance_uid, exc_info=True)
            w = self.cfg.worker
            delay = backoff_delay(job.attempts, w.backoff_base_s, w.backoff_cap_s)
            fail(self.engine, job.id, self.worker_id, f"{type(exc).__name__}: {exc}", retry_delay_s=delay)
            return JobOutcome.failed

    def _stage(self, job: ClaimedJob, stage: str) -> None:
        if self._on_stage is not None:
            self._on_stage(job.id, stage)

    def _skip(self, job: ClaimedJob, why: str) -> JobOutcome:
        log.info("job %d skipped series=%s: %s", job.id, job.series_instance_uid, why)
        if not complete(self.engine, job.id, self.worker_id, f"skipped: {why}"):
            return JobOutcome.lease_lost
        return JobOutcome.skipped

    def _run(self, job: ClaimedJob, lease: LeaseKeeper) -> JobOutcome:
        t0 = time.perf_counter()
        if self.heap_reserve is not None:
            self.heap_reserve.release()  # mapped pages for this job's volume
        current = self._current_series(job)
        if isinstance(current, str):
            return self._skip(job, current)
        self._stage(job, "loaded")
        uid = current.series_instance_uid
        try:
            with library_warnings_logged(f"job {job.id} series={uid}"):
                # Loaded here, not by analyse(), so that the rules and the outputs read the same headers and HU.
                used = self.prefetch.used if self.prefetch is not None else 0
                volume = load_ct_volume(current.files, max_tilt_deg=self.model.max_tilt_deg, keep_datasets=True,
                                        prefetched=self.prefetch.take if self.prefetch is not None else None)
                load_s = time.perf_counter() - t0
                if self.prefetch is not None:
                    log.info("job %d: %d of %d slices decoded ahead, series loaded in %.2f s",
                             job.id, self.prefetch.used - used, len(current.files), load_s)
                if volume.series_instance_uid != uid:
                    raise RuntimeError("the spool files recorded for the series hold another series")
                self._stage(job, "inference")
                result = self.model.analyse(volume)
        except InputRejected as exc:
            try:
                return self._reject(job, current, str(exc))
            except _Superseded as why:
                return self._skip(job, f"superseded while running ({why})")
        result.timings_s["load"] = round(load_s, 4)
        result.timings_s["total"] = round(result.timings_s["total"] + load_s, 4)
        inference_s = time.perf_counter() - t0
        lease.check()
        verdict, rule_set_id, previous = self._decide(current, result, volume.datasets[0])
        self._stage(job, "render")
        t_render = time.perf_counter()
        staging_root = self.outputs_root / STAGING_DIR
        staging_root.mkdir(parents=True, exist_ok=True)
        earlier = self._stored_result(job, current, result)
        # An earlier attempt's decision, when it stored one: the images say what its SR says.
        stored, decision = earlier if earlier is not None else (None, verdict.decision)
        with tempfile.TemporaryDirectory(dir=staging_root, prefix=f"job-{job.id}-") as staging:
            source = OutputSource.of(result, volume, decision, uid_prefix=self.cfg.export.uid_prefix,
                                     generation=current.generation, previous=previous)
            del volume  # the source holds what the images still need
            try:
                if stored is None:  # the SR first: stored, placed and queued before the images are rendered
                    sr_paths = write_datasets([render_sr(source)], Path(staging))
                    render_s = time.perf_counter() - t_render
                    self._stage(job, "store")
                    timings = dict(result.timings_s)
                    timings.update(worker_inference=round(inference_s, 4), worker_render=round(render_s, 4),
                                   worker_before_store=round(time.perf_counter() - t0, 4))
                    lease.renew()
                    stored = self._store(job, current, result, verdict, rule_set_id, timings, sr_paths)
                else:
                    log.info("job %d: result %d and its SR were stored by an earlier attempt", job.id, stored)
                self._stage(job, "images")
                images = write_datasets(render_images(source), Path(staging), pngs=self.cfg.worker.write_pngs)
                del source
                lease.renew()
                self._store_images(job, current, result, decision, stored, images)
            except _Superseded as exc:
                return self._skip(job, f"superseded while running ({exc})")
        log.info(
            "job %d done series=%s priority=%s result=%d model=%s in %.2f s (inference %.2f s)",
            job.id, uid, decision.priority.value, stored, result.model_version, time.perf_counter() - t0, inference_s,
        )
        return JobOutcome.done

    def _current_series(self, job: ClaimedJob) -> _SeriesFiles | str:
        """The series' instance files (absolute paths) when the job is still current, else why it is not."""
        uid = job.payload.get("series_instance_uid") or job.series_instance_uid
        generation = job.payload.get("generation")
        if not isinstance(uid, str) or not uid:
            raise JobUnusable("the job names no series")
        with Session(self.engine) as s:
            series = s.scalars(select(Series).where(Series.series_instance_uid == uid)).one_or_none()
            if series is None:
                return "the series is no longer known"
            if generation is not None and int(generation) != series.generation:
                return f"generation {generation} superseded by {series.generation}"
            if series.state != SeriesState.selected:
                return f"the series is {series.state.value}, not selected"
            stored = s.scalars(
                select(Instance.spool_path).where(Instance.series_id == series.id).order_by(Instance.id)
            ).all()
            study_uid = series.study.study_instance_uid
            sid, gen = series.id, series.generation
        if not stored:
            raise JobUnusable("the series has no stored instances")
        files = [p if p.is_absolute() else self.spool_dir / p for p in map(Path, stored)]
        missing = [p for p in files if not p.is_file()]
        if missing:
            # A shared spool may lag behind the database: retry with backoff.
            raise FileNotFoundError(f"{len(missing)} of {len(files)} instance files not in the spool")
        return _SeriesFiles(sid, gen, study_uid, uid, files)

    def _decide(self, current: _SeriesFiles, result: StudyResult, header: Dataset) -> tuple[Triage, int | None, OutputUIDs | None]:
        """The triage (active rules), the rule set's id, and the output set this result corrects (if any)."""
        from pe_triage_node.rules import triage
        from pe_triage_node.rules.store import active_rule_set

        with Session(self.engine) as s:
            active = active_rule_set(s)
            earlier = s.execute(
                select(TriageResult.generation, TriageResult.model_version)
                .where(TriageResult.series_instance_uid == current.series_instance_uid)
                .order_by(TriageResult.id.desc())
            ).all()
        with library_warnings_logged(f"rules attributes of series={current.series_instance_uid}"):
            verdict = triage(result, header, active.rules)
        mine = (current.generation, result.model_version[:64])
        previous = next(
            (OutputUIDs(current.series_instance_uid, version, self.cfg.export.uid_prefix, gen)
             for gen, version in earlier if (gen, version) != mine),
            None,
        )
        return verdict, active.rule_set_id, previous

    def _hold_series(self, s: Session, current: _SeriesFiles, **values: object) -> bool:
        """Lock the series row for this transaction if it is still at our generation and selected.

        A conditional UPDATE (checked by rowcount): it takes the row lock on
        PostgreSQL and the write lock on SQLite, so no other job can place
        outputs for this series until we commit.
        """
        result = s.execute(
            update(Series)
            .where(Series.id == current.series_id, Series.generation == current.generation,
                   Series.state == SeriesState.selected)
            .values(generation=current.generation, **values)
            .execution_options(synchronize_session=False)
        )
        return cast(CursorResult[Any], result).rowcount == 1

    def _stored_result(self, job: ClaimedJob, current: _SeriesFiles,
                       result: StudyResult) -> tuple[int, PriorityDecision] | None:
        """The ``results`` row (id, decision) an earlier attempt of this job stored with its SR, then
        died before the images were stored, for this generation and model; ``None`` when there is none."""
        from pe_triage_node.rules import Priority, PriorityDecision

        with Session(self.engine) as s:
            row = s.scalars(
                select(TriageResult)
                .where(TriageResult.job_id == job.id, TriageResult.generation == current.generation,
                       TriageResult.model_version == result.model_version[:64])
                .order_by(TriageResult.id.desc()).limit(1)
            ).one_or_none()
            if row is None:
                return None
            flags = tuple(str(f) for f in json.loads(row.flags or "[]"))
            return int(row.id), PriorityDecision(Priority(row.priority), row.rule_name, None, flags, row.explanation or "")

    def _store(
        self,
        job: ClaimedJob,
        current: _SeriesFiles,
        result: StudyResult,
        verdict: Triage,
        rule_set_id: int | None,
        timings: dict[str, float],
        staged: list[Path],
    ) -> int:
        """One transaction: place the SR, store the ``results`` row, queue the exports (the SR to each
        file destination, HL7, FHIR, webhook). The job stays running (its lease renewed) until
        :meth:`_store_images` completes it; a worker that dies in between leaves the job to be run
        again, which finds this row (:meth:`_stored_result`) and stores only the images.

        Raises :class:`_Superseded` (nothing placed) when the series moved on,
        :class:`LeaseLost` (nothing placed) when the job is no longer ours.
        """
        from pe_triage_node.export.exporter import enqueue_exports

        decision = verdict.decision
        body = result.to_dict("summary")
        body["timings_s"] = timings
        with Session(self.engine) as s, s.begin():
            if not self._hold_series(s, current):
                raise _Superseded(f"generation {current.generation} is no longer the selected one")
            if not holds_in(s, job.id, self.worker_id):
                raise LeaseLost
            row = TriageResult(
                study_instance_uid=current.study_instance_uid,
                series_instance_uid=current.series_instance_uid,
                job_id=job.id,
                generation=current.generation,
                model_version=result.model_version[:64],
                labels=json.dumps(dict(verdict.findings.labels), sort_keys=True),
                probabilities=json.dumps(dict(verdict.findings.probabilities), sort_keys=True),
                attributes=json.dumps(verdict.attributes, sort_keys=True),
                priority=decision.priority.value,
                rule_name=decision.rule_name,
                rule_set_id=rule_set_id,
                flags=json.dumps(list(decision.flags)),
                explanation=decision.explanation,
                result_json=json.dumps(body, allow_nan=False),
            )
            s.add(row)
            s.flush()
            paths = self._place(current, staged, remove_others=True)
            export_ids = enqueue_exports(s, self.cfg.export, paths, result=result, decision=decision, result_id=row.id)
            superseded = supersede_queued(s, JobKind.export, current.series_instance_uid, keep=export_ids,
                                          detail=f"superseded by result {row.id}")
            log.info("job %d stored result %d with its SR, %d export job(s) priority=%s, %d older export(s) superseded",
                     job.id, row.id, len(export_ids), decision.priority.value, len(superseded))
            return int(row.id)

    def _store_images(self, job: ClaimedJob, current: _SeriesFiles, result: StudyResult,
                      decision: PriorityDecision, result_id: int, staged: list[Path]) -> None:
        """One transaction: place the SCs and the KOS beside the SR, queue them to each file destination,
        complete the job. Raises :class:`_Superseded` / :class:`LeaseLost` (nothing placed) as :meth:`_store`."""
        from pe_triage_node.export.exporter import enqueue_exports

        with Session(self.engine) as s, s.begin():
            if not self._hold_series(s, current):
                raise _Superseded(f"generation {current.generation} is no longer the selected one")
            if not complete_in(s, job.id, self.worker_id, f"result {result_id} priority {decision.priority.value}"):
                raise LeaseLost
            paths = self._place(current, staged, remove_others=False)
            export_ids = enqueue_exports(s, self.cfg.export, paths, result=result, decision=decision,
                                         result_id=result_id, files_only=True)
            log.info("job %d stored the images of result %d, %d export job(s)", job.id, result_id, len(export_ids))

    def _place(self, current: _SeriesFiles, staged: list[Path], *, remove_others: bool) -> list[Path]:
        """Move the staged outputs (and their PNGs) into ``<outputs>/<series uid>/``; with ``remove_others``
        (the SR, placed first) remove every other output file there (an earlier generation's, or a
        re-run's with fewer Grad-CAM maps). Returns the DICOM paths. Runs while the series row is held
        (:meth:`_hold_series`)."""
        from pe_triage_node.dicom.uids import validate_uid

        out_dir = self.outputs_root / validate_uid(current.series_instance_uid, "SeriesInstanceUID")
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = staged[0].parent
        keep = set()
        for src in sorted(staging.iterdir()):
            if src.is_file() and not src.name.startswith(".tmp"):
                os.replace(src, out_dir / src.name)
                keep.add(src.name)
        if remove_others:
            for old in out_dir.iterdir():
                if old.is_file() and old.name not in keep and old.suffix in (".dcm", ".png") and not old.name.startswith(".tmp"):
                    old.unlink(missing_ok=True)
        return [out_dir / p.name for p in staged]

    def _reject(self, job: ClaimedJob, current: _SeriesFiles, reason: str) -> JobOutcome:
        """The engine refused the series: one transaction for the rejections row, the series rejected
        with the reason, and the job completed (retrying cannot help, and nothing failed)."""
        with Session(self.engine) as s, s.begin():
            held = self._hold_series(s, current, state=SeriesState.rejected,
                                     state_reason=f"refused by the inference stage: {reason}")
            if not held:
                raise _Superseded(f"generation {current.generation} is no longer the selected one")
            s.add(Rejection(
                stage="inference",
                study_instance_uid=current.study_instance_uid,
                series_instance_uid=current.series_instance_uid,
                reason=reason,
            ))
            if not complete_in(s, job.id, self.worker_id, f"rejected: {reason}"):
                raise LeaseLost
        log.warning("job %d series=%s rejected by the inference stage", job.id, current.series_instance_uid)
        return JobOutcome.rejected

    def remove_stale_staging(self, older_than_s: float = STALE_STAGING_S) -> int:
        """Remove staging folders left by workers that died mid-job (older than ``older_than_s``); returns how many."""
        root = self.outputs_root / STAGING_DIR
        if not root.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        stale = [p for p in root.iterdir() if p.is_dir() and p.stat().st_mtime < cutoff]
        for folder in stale:
            shutil.rmtree(folder, ignore_errors=True)
        if stale:
            log.info("removed %d stale staging folder(s) under %s", len(stale), root)
        return len(stale)

    # -- the loop ----------------------------------------------------------------
    def _idle(self, interrupted: Callable[[], bool]) -> bool:
        """Decode slices ahead; when there are none, touch the heap reserve."""
        if run_idle(self.prefetch, interrupted=interrupted):
            return True
        return self.heap_reserve is not None and self.heap_reserve.step()

    def run_forever(self, stop: threading.Event) -> None:
        """Run jobs until ``stop`` is set; poll every ``queue.poll_interval_s`` while idle, and claim at
        once when a new job is announced (:mod:`pe_triage_node.queue.wakeup`). While idle, decode
        the slices of series still arriving (:mod:`.prefetch`).

        A job in progress is finished before returning (its lease would otherwise
        have to expire before another worker could take it).
        """
        log.info("worker %s started (device %s)", self.worker_id, getattr(self.model, "device", "?"))
        self.remove_stale_staging()
        with Wakeup(self.engine, JobKind.infer) as wakeup:
            run_until_stopped(self.process_one, stop, self.cfg.queue.poll_interval_s, f"worker {self.worker_id}",
                              wakeup=wakeup, idle=lambda: self._idle(lambda: wakeup.wait(0)))
        log.info("worker %s stopped", self.worker_id)


def load_model(cfg: NodeConfig, *, random_weights: bool = False) -> InferenceEngine:
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

    stop = stop_on_signals("the worker stops after its current job")
    if not volume_pages_reuse_freed_slices():
        log.info("numpy's huge-page switch not found: loading a series may cost more")
    reserve = cfg.worker.heap_reserve_mb << 20
    if reserve and not heap_keeps_freed_memory(reserve):
        log.info("the C library keeps no freed memory (not glibc): each job maps fresh pages")
        reserve = 0
    try:
        model = load_model(cfg, random_weights=random_weights)
    except WeightsError as exc:
        log.critical("worker cannot start: %s", exc)
        return EXIT_NO_WEIGHTS
    from pe_triage_node.export.outputs import warm_up

    warm_up()
    try:
        log.info("model warmed up on a synthetic chest in %.2f s", model.warm_up())
    except Exception:  # noqa: BLE001 - a failed warm-up costs the first study time, nothing more
        log.warning("model warm-up failed; the first study pays for it", exc_info=True)
    engine = make_engine(cfg.database_url, echo=cfg.database.echo)
    try:
        worker = InferenceWorker(engine, cfg, model)
        worker.heap_reserve = HeapReserve(reserve) if reserve else None
        worker.run_forever(stop)
    finally:
        engine.dispose()
    return 0
