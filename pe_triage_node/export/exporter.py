"""The exporter: export jobs from the SQL queue, one per destination; retries, dead-letter, webhook.

Every place a result goes is a destination (``[[export.destinations]]``, chosen
by ``kind``) with one small interface: build the payload from what the node
stored, send it, map the peer's answer to a :class:`~.delivery.Delivery`
(delivered / retry / dead):

========== ============================ ========================================= =====================
kind       payload of the job           built from                                sent by
========== ============================ ========================================= =====================
dicom      the SR, SC and KOS files     the files the worker wrote                C-STORE (:mod:`.sender`)
dicomweb   the SR, SC and KOS files     the files the worker wrote                STOW-RS (:mod:`.dicomweb`)
hl7        the ``results`` row id       the row + its ``studies`` row (ORU^R01)   MLLP (:mod:`.hl7`)
fhir       the ``results`` row id       the row + its ``studies`` row (Bundle)    HTTP POST (:mod:`.fhir`)
========== ============================ ========================================= =====================

Producer side (the worker, inside its own transaction, after writing the outputs)::

    with Session(engine) as s, s.begin():
        job_ids = enqueue_exports(s, cfg.export, paths, result=result, decision=decision, result_id=row.id)

The worker does this twice: the SR with the result (every destination's job),
then the SCs and the KOS once rendered (``files_only=True``), so a DICOM
destination gets the SR first, in an association of its own.

One ``export`` job per destination whose ``min_priority`` the result reaches
(payload ``{"type": KIND, "destination": NAME, "files": [...]}`` or ``{..., "result_id": N}``;
a DICOM job names its files, so a subset, e.g. the SR alone, can be queued as a job of its own),
plus one ``{"type": "webhook"}`` job when a webhook is configured and the priority is at or above
``export.webhook_min_priority``. Dedupe keys name the destination and the output set (the derived
SOP Instance UIDs) or the result, so enqueueing the same outputs again while a job is active does not
duplicate it. HL7 and FHIR payloads are built when the job runs, never stored in the queue: they carry
patient data. No new tables: everything lives in ``jobs`` and ``job_events``.

Consumer side: :class:`Exporter` claims export jobs one at a time, heartbeats
while sending, completes on delivery, otherwise records the failure with an
exponential backoff (``backoff_delay``) until ``max_attempts`` and then
dead-letters the job with its last error; an answer that retrying cannot change
(an HL7 AR, an HTTP 4xx, an unknown destination) dead-letters it at once.
:meth:`Exporter.run_forever` runs jobs one after the other and polls every
``export.poll_interval_s`` while none is due.

Logs and webhook bodies never carry patient names or IDs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from pe_triage_node.config import Destination, ExportSection, NodeConfig
from pe_triage_node.db.models import JobKind, Study, TriageResult
from pe_triage_node.export import identity
from pe_triage_node.export.delivery import Delivery, Outcome
from pe_triage_node.export.findings import main_finding, positive_findings
from pe_triage_node.export.record import ResultRecord
from pe_triage_node.inference.result import StudyResult
from pe_triage_node.queue import (
    ClaimedJob,
    LeaseKeeper,
    backoff_delay,
    claim,
    complete,
    enqueue,
    fail,
    renewal_period,
    run_until_stopped,
    worker_identity,
)
from pe_triage_node.queue.wakeup import Wakeup
from pe_triage_node.rules import Priority, PriorityDecision, priority_rank

log = logging.getLogger(__name__)

PAYLOAD_WEBHOOK = "webhook"
#: Destination kinds whose jobs send the output files; the others are built from the stored result.
FILE_KINDS = frozenset({"dicom", "dicomweb"})


# -- producing ----------------------------------------------------------------


def output_set_key(paths: Sequence[Path]) -> str:
    """A short digest naming an output set (its file names carry the derived SOP Instance UIDs)."""
    names = "\n".join(sorted(Path(p).name for p in paths))
    return hashlib.sha256(names.encode("ascii", "replace")).hexdigest()[:24]


def webhook_body(result: StudyResult, decision: PriorityDecision) -> dict[str, Any]:
    """The webhook's JSON: UIDs, priority, findings, model. Never patient names, IDs or dates."""
    return {
        "event": "pe-triage.result",
        "study_instance_uid": result.study_instance_uid,
        "series_instance_uid": result.series_instance_uid,
        "priority": decision.priority.value,
        "rule": decision.rule_name,
        "flags": list(decision.flags),
        "main_finding": main_finding(result.labels),
        "findings": positive_findings(result),
        "probabilities": {k: round(float(v), 4) for k, v in result.probabilities.items()},
        "model": {"name": result.model_name, "version": result.model_version, "meaningless": result.meaningless},
        "disclaimer": identity.NOT_FOR_DIAGNOSTIC_USE,
    }


def wants_webhook(cfg: ExportSection, priority: Priority) -> bool:
    """A webhook is configured and ``priority`` is at or above ``webhook_min_priority``."""
    return cfg.webhook_url is not None and priority_rank(priority) >= priority_rank(cfg.webhook_min_priority)


def wants(dest: Destination, priority: Priority) -> bool:
    """``priority`` is at or above the destination's ``min_priority`` (as :func:`wants_webhook` for the webhook)."""
    return priority_rank(priority) >= priority_rank(dest.min_priority)


def destination_job(dest: Destination, files: list[str], key: str, result_id: int | None,
                    model_version: str) -> tuple[dict[str, Any], str] | None:
    """The payload and dedupe key of ``dest``'s job, or ``None`` when there is nothing for it to send."""
    if dest.kind in FILE_KINDS:
        if not files:
            return None
        return {"type": dest.kind, "destination": dest.name, "files": files, "model_version": model_version}, \
            f"export:{dest.name}:{key}"
    if result_id is None:
        return None
    return {"type": dest.kind, "destination": dest.name, "result_id": int(result_id)}, f"export:{dest.name}:result-{result_id}"


def enqueue_exports(
    session: Session,
    cfg: ExportSection,
    paths: Sequence[Path],
    *,
    result: StudyResult,
    decision: PriorityDecision,
    result_id: int | None = None,
    files_only: bool = False,
) -> list[int]:
    """Queue one export job per destination due (and the webhook when due) inside the caller's transaction.

    ``result_id``: the stored ``results`` row, which HL7 and FHIR jobs are built
    from (without it they are not queued). ``files_only``: only the jobs of the
    destinations that send files (``dicom``, ``dicomweb``), for outputs rendered
    after the first ones were queued (the worker queues the SR with everything
    else, then the SCs and the KOS). Returns the job ids (an already
    active job with the same dedupe key is returned instead of a new one).
    Nothing due: ``[]``.
    """
    files = [str(Path(p).resolve()) for p in paths]
    key = output_set_key(paths)
    common = {
        "priority": decision.queue_priority,
        "study_instance_uid": result.study_instance_uid,
        "series_instance_uid": result.series_instance_uid,
        "max_attempts": cfg.max_attempts,
    }
    ids = []
    for dest in cfg.destinations:
        if not wants(dest, decision.priority) or (files_only and dest.kind not in FILE_KINDS):
            continue
        planned = destination_job(dest, files, key, result_id, result.model_version)
        if planned is None:
            if dest.kind not in FILE_KINDS:
                log.warning("no %s export to %s for series=%s: the result is not stored", dest.kind, dest.name,
                            result.series_instance_uid)
            continue
        payload, dedupe_key = planned
        job = enqueue(session, JobKind.export, payload=payload, dedupe_key=dedupe_key, **common)  # type: ignore[arg-type]
        ids.append(job.id)
    if not files_only and wants_webhook(cfg, decision.priority):
        job = enqueue(
            session,
            JobKind.export,
            payload={"type": PAYLOAD_WEBHOOK, "body": webhook_body(result, decision)},
            dedupe_key=f"export:webhook:{key or result.series_instance_uid}",
            **common,  # type: ignore[arg-type]
        )
        ids.append(job.id)
    return ids


# -- delivering ---------------------------------------------------------------


class PermanentExportError(Exception):
    """An export that cannot succeed by retrying (unknown destination, output files gone)."""


def post_webhook(url: str, body: dict[str, Any], *, timeout_s: float) -> int:
    """POST ``body`` as JSON; returns the HTTP status, raises :class:`OSError` on failure or a non-2xx answer."""
    data = json.dumps(body, separators=(",", ":")).encode("utf-8")
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json", "User-Agent": "pe-triage-node"})
    with urllib.request.urlopen(req, timeout=timeout_s) as rsp:  # noqa: S310 - URL from validated config (http/https)
        status = int(rsp.status)
    if not 200 <= status < 300:
        raise OSError(f"webhook answered HTTP {status}")
    return status


def _files(job: ClaimedJob) -> list[Path]:
    files = [Path(p) for p in job.payload.get("files", [])]
    missing = [p.name for p in files if not p.is_file()]
    if missing or not files:
        raise PermanentExportError(f"output files missing: {', '.join(missing[:5]) or 'none listed'}")
    return files


class Exporter:
    """Claims and runs export jobs (one per destination, webhook POSTs) for one node configuration."""

    def __init__(self, engine: Engine, cfg: NodeConfig, *, worker_id: str | None = None) -> None:
        self.engine = engine
        self.cfg = cfg
        self.worker_id = worker_id or worker_identity("exporter")
        self._destinations: dict[str, Destination] = {d.name: d for d in cfg.export.destinations}

    # one job
    def process_one(self) -> bool:
        """Claim and run one due export job; ``False`` when none was due."""
        ex = self.cfg.export
        job = claim(self.engine, JobKind.export, self.worker_id, lease_s=ex.lease_s, max_wait_s=self.cfg.queue.max_wait_s)
        if job is None:
            return False
        every = renewal_period(self.cfg.queue.heartbeat_s, ex.lease_s, floor_s=0.5)
        try:
            with LeaseKeeper(self.engine, job.id, self.worker_id, every):
                delivery = self._run(job)
        except PermanentExportError as exc:
            delivery = Delivery.dead(str(exc))
        except Exception as exc:  # noqa: BLE001 - any failure becomes the job's last_error
            delivery = Delivery.retry(f"{type(exc).__name__}: {exc}")
        if delivery.outcome is Outcome.delivered:
            complete(self.engine, job.id, self.worker_id, delivery.detail)
        elif delivery.outcome is Outcome.dead:
            fail(self.engine, job.id, self.worker_id, delivery.detail, retry=False)
        else:
            delay = backoff_delay(job.attempts, ex.backoff_base_s, ex.backoff_cap_s)
            fail(self.engine, job.id, self.worker_id, delivery.detail, retry_delay_s=delay)
        return True

    def _run(self, job: ClaimedJob) -> Delivery:
        kind = job.payload.get("type")
        if kind == PAYLOAD_WEBHOOK:
            url = self.cfg.export.webhook_url
            if url is None:
                raise PermanentExportError("webhook job but export.webhook_url is not set")
            status = post_webhook(url, job.payload.get("body", {}), timeout_s=self.cfg.export.webhook_timeout_s)
            log.info("job %d webhook delivered (HTTP %d) series=%s", job.id, status, job.series_instance_uid)
            return Delivery.delivered(f"webhook HTTP {status}")
        name = job.payload.get("destination")
        dest = self._destinations.get(str(name))
        if dest is None:
            raise PermanentExportError(f"destination {name!r} is not configured (export.destinations)")
        if dest.kind != kind:
            raise PermanentExportError(f"destination {dest.name!r} is of kind {dest.kind!r} now; the job was for {kind!r}")
        delivery = self._deliver(job, dest)
        if delivery.outcome is Outcome.delivered:
            log.info("job %d delivered to %s (%s) series=%s", job.id, dest.name, dest.kind, job.series_instance_uid)
        return delivery

    def _deliver(self, job: ClaimedJob, dest: Destination) -> Delivery:
        """Build ``dest``'s payload for ``job`` and send it (senders import here: each kind's library only when used)."""
        ex = self.cfg.export
        if dest.kind == "dicom":
            from pe_triage_node.export.sender import send_files

            report = send_files(
                dest, _files(job), calling_ae_title=ex.calling_ae_title,
                acse_timeout_s=ex.acse_timeout_s, dimse_timeout_s=ex.dimse_timeout_s, network_timeout_s=ex.network_timeout_s,
            )
            return Delivery(Outcome.delivered if report.ok else Outcome.retry, report.summary())
        if dest.kind == "dicomweb":
            from pe_triage_node.export.dicomweb import stow

            return stow(dest, _files(job))
        record = self._record(job)
        if dest.kind == "hl7":
            from pe_triage_node.export.hl7 import MessageHeader, build_oru, send_oru

            control_id = f"PT{job.id}"
            message = build_oru(record, control_id=control_id, now=dt.datetime.now(dt.UTC), header=MessageHeader.of(dest))
            return send_oru(dest, message, control_id)
        from pe_triage_node.export.fhir import build_bundle, bundle_json, post_bundle

        bundle = build_bundle(record, uid_prefix=ex.uid_prefix, patient_identifier_system=dest.patient_identifier_system)
        return post_bundle(dest, bundle_json(bundle))

    def _record(self, job: ClaimedJob) -> ResultRecord:
        """The stored result the job names, with its study's patient and order (HL7 and FHIR jobs)."""
        result_id = job.payload.get("result_id")
        if not isinstance(result_id, int):
            raise PermanentExportError("the job names no stored result (result_id)")
        with Session(self.engine) as s:
            row = s.get(TriageResult, result_id)
            if row is None:
                raise PermanentExportError(f"result {result_id} is no longer stored")
            study = s.scalars(select(Study).where(Study.study_instance_uid == row.study_instance_uid)).one_or_none()
            return ResultRecord.from_row(row, study)

    # the loop
    def run_forever(self, stop_event: threading.Event, *, on_start: Callable[[], None] | None = None) -> None:
        """Run export jobs one after the other until ``stop_event`` is set; poll every
        ``export.poll_interval_s`` while none is due (a retry is due once its backoff passed),
        and claim at once when a new one is announced (:mod:`pe_triage_node.queue.wakeup`).

        One loop, one job at a time: a send that takes longer than the poll
        interval simply delays the next poll. A job in progress is finished before returning.
        """
        log.info("exporter %s started: %d destination(s), webhook %s",
                 self.worker_id, len(self._destinations), "on" if self.cfg.export.webhook_url else "off")
        if on_start is not None:
            on_start()
        with Wakeup(self.engine, JobKind.export) as wakeup:
            run_until_stopped(self.process_one, stop_event, self.cfg.export.poll_interval_s, f"exporter {self.worker_id}",
                              wakeup=wakeup)
        log.info("exporter %s stopped", self.worker_id)


def run_exporter_service(cfg: NodeConfig, stop_event: threading.Event | None = None) -> None:
    """The exporter process: one engine, the polling loop, SIGTERM/SIGINT stop it cleanly.

    Signal handlers are installed only when called from the main thread.
    """
    from pe_triage_node.db.session import make_engine
    from pe_triage_node.stopping import stop_on_signals

    stop = stop_on_signals("the exporter stops after its current job", stop_event)
    engine = make_engine(cfg.database_url)
    try:
        Exporter(engine, cfg).run_forever(stop)
    finally:
        engine.dispose()
