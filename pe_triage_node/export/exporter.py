"""The exporter: export jobs from the SQL queue, C-STORE to each destination, retries, dead-letter, webhook.

Producer side (the worker, inside its own transaction, after ``write_outputs``)::

    with Session(engine) as s, s.begin():
        job_ids = enqueue_exports(s, cfg.export, paths, result=result, decision=decision)

One ``export`` job per configured destination (payload: ``{"type": "dicom",
"destination": NAME, "files": [...]}``), plus one ``{"type": "webhook"}`` job
when a webhook is configured and the priority is at or above
``export.webhook_min_priority``. Dedupe keys name the destination and the
output set (the derived SOP Instance UIDs), so enqueueing the same outputs
again while a job is active does not duplicate it. No new tables: everything
lives in ``jobs`` and ``job_events``.

Consumer side: :class:`Exporter` claims export jobs one at a time, heartbeats
while sending, completes on delivery (warning statuses 0xB000/0xB006/0xB007
count as delivered), otherwise records the failure with an exponential backoff
(``backoff_delay``) until ``max_attempts`` and then dead-letters the job with
its last error. :meth:`Exporter.run_forever` runs jobs one after the other and
polls every ``export.poll_interval_s`` while none is due.

Logs and webhook bodies never carry patient names or IDs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from pe_triage_node.config import ExportSection, NodeConfig
from pe_triage_node.db.models import JobKind
from pe_triage_node.export import identity
from pe_triage_node.export.findings import main_finding, positive_findings
from pe_triage_node.export.sender import SendReport, send_files
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
from pe_triage_node.rules import Priority, PriorityDecision, priority_rank

log = logging.getLogger(__name__)

PAYLOAD_DICOM = "dicom"
PAYLOAD_WEBHOOK = "webhook"


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


def enqueue_exports(
    session: Session,
    cfg: ExportSection,
    paths: Sequence[Path],
    *,
    result: StudyResult,
    decision: PriorityDecision,
) -> list[int]:
    """Queue one export job per destination (and the webhook when due) inside the caller's transaction.

    Returns the job ids (an already active job with the same dedupe key is
    returned instead of a new one). No destinations and no webhook: ``[]``.
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
    if files:
        for dest in cfg.destinations:
            job = enqueue(
                session,
                JobKind.export,
                payload={"type": PAYLOAD_DICOM, "destination": dest.name, "files": files, "model_version": result.model_version},
                dedupe_key=f"export:{dest.name}:{key}",
                **common,  # type: ignore[arg-type]
            )
            ids.append(job.id)
    if wants_webhook(cfg, decision.priority):
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


class Exporter:
    """Claims and runs export jobs (C-STORE per destination, webhook POSTs) for one node configuration."""

    def __init__(self, engine: Engine, cfg: NodeConfig, *, worker_id: str | None = None) -> None:
        self.engine = engine
        self.cfg = cfg
        self.worker_id = worker_id or worker_identity("exporter")
        self._destinations = {d.name: d for d in cfg.export.destinations}

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
                detail = self._run(job)
        except PermanentExportError as exc:
            fail(self.engine, job.id, self.worker_id, str(exc), retry=False)
            return True
        except Exception as exc:  # noqa: BLE001 - any failure becomes the job's last_error
            delay = backoff_delay(job.attempts, ex.backoff_base_s, ex.backoff_cap_s)
            fail(self.engine, job.id, self.worker_id, f"{type(exc).__name__}: {exc}", retry_delay_s=delay)
            return True
        complete(self.engine, job.id, self.worker_id, detail)
        return True

    def _run(self, job: ClaimedJob) -> str:
        kind = job.payload.get("type")
        if kind == PAYLOAD_DICOM:
            return self._send(job)
        if kind == PAYLOAD_WEBHOOK:
            url = self.cfg.export.webhook_url
            if url is None:
                raise PermanentExportError("webhook job but export.webhook_url is not set")
            status = post_webhook(url, job.payload.get("body", {}), timeout_s=self.cfg.export.webhook_timeout_s)
            log.info("job %d webhook delivered (HTTP %d) series=%s", job.id, status, job.series_instance_uid)
            return f"webhook HTTP {status}"
        raise PermanentExportError(f"unknown export payload type {kind!r}")

    def _send(self, job: ClaimedJob) -> str:
        name = job.payload.get("destination")
        dest = self._destinations.get(str(name))
        if dest is None:
            raise PermanentExportError(f"destination {name!r} is not configured (export.destinations)")
        files = [Path(p) for p in job.payload.get("files", [])]
        missing = [p.name for p in files if not p.is_file()]
        if missing or not files:
            raise PermanentExportError(f"output files missing: {', '.join(missing[:5]) or 'none listed'}")
        ex = self.cfg.export
        report: SendReport = send_files(
            dest, files, calling_ae_title=ex.calling_ae_title,
            acse_timeout_s=ex.acse_timeout_s, dimse_timeout_s=ex.dimse_timeout_s, network_timeout_s=ex.network_timeout_s,
        )
        if not report.ok:
            raise OSError(report.summary())
        log.info("job %d delivered to %s series=%s objects=%d", job.id, dest.name, job.series_instance_uid, len(report.delivered))
        return report.summary()

    # the loop
    def run_forever(self, stop_event: threading.Event, *, on_start: Callable[[], None] | None = None) -> None:
        """Run export jobs one after the other until ``stop_event`` is set; poll every
        ``export.poll_interval_s`` while none is due (a retry is due once its backoff passed).

        One loop, one job at a time: a send that takes longer than the poll
        interval simply delays the next poll. A job in progress is finished before returning.
        """
        log.info("exporter %s started: %d destination(s), webhook %s",
                 self.worker_id, len(self._destinations), "on" if self.cfg.export.webhook_url else "off")
        if on_start is not None:
            on_start()
        run_until_stopped(self.process_one, stop_event, self.cfg.export.poll_interval_s, f"exporter {self.worker_id}")
        log.info("exporter %s stopped", self.worker_id)


def run_exporter_service(cfg: NodeConfig, stop_event: threading.Event | None = None) -> None:
    """The exporter process: one engine, the polling loop, SIGTERM/SIGINT stop it cleanly.

    Signal handlers are installed only when called from the main thread.
    """
    import signal

    from pe_triage_node.db.session import make_engine

    stop = stop_event or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    engine = make_engine(cfg.database_url)
    try:
        Exporter(engine, cfg).run_forever(stop)
    finally:
        engine.dispose()
