"""Export jobs on the SQL queue (SQLite and PostgreSQL): enqueue/dedupe, C-STORE to an in-process SCP,
warning statuses, retries with backoff, dead-letter, destination down then up, webhook, the polling loop."""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydantic import SecretStr
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from pe_triage_node.config import DestinationSection, NodeConfig
from pe_triage_node.db.models import JobState
from pe_triage_node.export.exporter import Exporter, enqueue_exports, webhook_body
from pe_triage_node.export.sender import send_files
from pe_triage_node.inference.result import StudyResult
from pe_triage_node.queue import get_job, job_history
from pe_triage_node.rules import Priority

from tests import export_support as es
from tests import peers


# -- fixtures -----------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Six CT files standing in for an output set (the transport does not care what it sends)."""
    d = es.write_series(tmp_path_factory.mktemp("export_files"))
    return sorted(d.glob("*.dcm"))[:6]


def make_result() -> StudyResult:
    return es.minimal_result()


class StoreSCP:
    """A pynetdicom Storage SCP on loopback answering every C-STORE with ``status``; counts what it kept."""

    def __init__(self, status: int = 0x0000, port: int | None = None, delay_s: float = 0.0) -> None:
        self.status = status
        self.delay_s = delay_s  # a slow PACS: each C-STORE answered this much later
        self.port = port or peers.free_port()
        self.received: list[str] = []
        self.calling: list[str] = []
        self._server: Any = None

    def _on_store(self, event: evt.Event) -> int:
        time.sleep(self.delay_s)
        if self.status in (0x0000, 0xB000, 0xB006, 0xB007):
            self.received.append(str(event.dataset.SOPInstanceUID))
        self.calling.append(event.assoc.requestor.ae_title)
        return self.status

    def start(self) -> StoreSCP:
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        peers.wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


@pytest.fixture
def scp() -> Iterator[StoreSCP]:
    s = StoreSCP().start()
    yield s
    s.stop()


def config(tmp_path: Path, ports: dict[str, int], **export: Any) -> NodeConfig:
    dests = [{"name": n, "ae_title": "PACS", "host": "127.0.0.1", "port": p} for n, p in ports.items()]
    settings = {"destinations": dests, "backoff_base_s": 0.05, "backoff_cap_s": 0.2, "acse_timeout_s": 5.0, "poll_interval_s": 0.1, **export}
    return NodeConfig(node={"var_dir": tmp_path}, export=settings, queue={"heartbeat_s": 1.0, "lease_s": 30.0})


def enqueue(engine: Engine, cfg: NodeConfig, files: list[Path], priority: Priority = Priority.STAT) -> list[int]:
    with Session(engine) as s, s.begin():
        return enqueue_exports(s, cfg.export, files, result=make_result(), decision=es.decision(priority))


def state(engine: Engine, job_id: int) -> Any:
    with Session(engine) as s:
        return get_job(s, job_id)


def events(engine: Engine, job_id: int) -> list[str]:
    with Session(engine) as s:
        return [e.event for e in job_history(s, job_id)]


def run_until(engine: Engine, exporter: Exporter, job_id: int, states: set[JobState], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exporter.process_one()
        job = state(engine, job_id)
        if job.state in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {state(engine, job_id).state} after {timeout} s")


# -- tests --------------------------------------------------------------------


def test_one_job_per_destination_plus_webhook_deduplicated(engine: Engine, files: list[Path], tmp_path: Path) -> None:
    cfg = config(tmp_path, {"pacs": 1104, "archive": 1105}, webhook_url="http://127.0.0.1:9/hook", webhook_min_priority="URGENT")
    ids = enqueue(engine, cfg, files, Priority.STAT)
    assert len(ids) == 3
    assert enqueue(engine, cfg, files, Priority.STAT) == ids  # same outputs again: no duplicate while active
    with Session(engine) as s:
        jobs = [get_job(s, i) for i in ids]
    keys = [j.dedupe_key or "" for j in jobs if j is not None]
    assert keys[0].startswith("export:pacs:") and keys[1].startswith("export:archive:") and keys[2].startswith("export:webhook:")
    assert all(j is not None and j.max_attempts == cfg.export.max_attempts and j.priority == 100 for j in jobs)
    routine = enqueue(engine, cfg, files[:2], Priority.ROUTINE)
    assert len(routine) == 2  # below the webhook's minimum priority: no webhook job


def test_delivers_and_completes_with_the_calling_ae(engine: Engine, files: list[Path], tmp_path: Path, scp: StoreSCP) -> None:
    cfg = config(tmp_path, {"pacs": scp.port}, calling_ae_title="TRIAGE1")
    [job_id] = enqueue(engine, cfg, files)
    job = run_until(engine, Exporter(engine, cfg), job_id, {JobState.succeeded, JobState.dead})
    assert job.state == JobState.succeeded
    assert sorted(scp.received) == sorted(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files)
    assert set(scp.calling) == {"TRIAGE1"}


@pytest.mark.parametrize("status", [0xB000, 0xB006, 0xB007])
def test_warning_statuses_count_as_delivered(engine: Engine, files: list[Path], tmp_path: Path, status: int) -> None:
    scp = StoreSCP(status).start()
    try:
        cfg = config(tmp_path, {"pacs": scp.port})
        [job_id] = enqueue(engine, cfg, files[:2])
        job = run_until(engine, Exporter(engine, cfg), job_id, {JobState.succeeded, JobState.dead})
        assert job.state == JobState.succeeded and job.attempts == 1
        assert len(scp.received) == 2
    finally:
        scp.stop()


def test_failure_status_retries_with_backoff_then_dead_letters(engine: Engine, files: list[Path], tmp_path: Path) -> None:
    scp = StoreSCP(0xA700).start()  # out of resources, every time
    try:
        cfg = config(tmp_path, {"pacs": scp.port}, max_attempts=3)
        [job_id] = enqueue(engine, cfg, files[:1])
        exporter = Exporter(engine, cfg)
        assert exporter.process_one()
        job = state(engine, job_id)
        assert job.state == JobState.queued and job.attempts == 1 and "0xA700" in job.last_error
        assert not exporter.process_one()  # backoff: not due yet
        job = run_until(engine, exporter, job_id, {JobState.dead})
        assert job.attempts == 3 and "C-STORE status 0xA700" in job.last_error
        assert events(engine, job_id).count("retry") == 2 and events(engine, job_id)[-1] == "dead"
    finally:
        scp.stop()


def test_destination_down_then_up_is_delivered_exactly_once(engine: Engine, files: list[Path], tmp_path: Path) -> None:
    port = peers.free_port()
    cfg = config(tmp_path, {"pacs": port}, max_attempts=10)
    [job_id] = enqueue(engine, cfg, files)
    exporter = Exporter(engine, cfg)
    assert exporter.process_one()  # nobody listening
    job = state(engine, job_id)
    assert job.state == JobState.queued and "association" in job.last_error
    scp = StoreSCP(port=port).start()
    try:
        job = run_until(engine, exporter, job_id, {JobState.succeeded, JobState.dead})
        assert job.state == JobState.succeeded
        while exporter.process_one():
            pass
        assert len(scp.received) == len(files) == len(set(scp.received))
    finally:
        scp.stop()


def test_unknown_destination_is_dead_at_once(engine: Engine, files: list[Path], tmp_path: Path) -> None:
    cfg = config(tmp_path, {"pacs": 1104})
    [job_id] = enqueue(engine, cfg, files[:1])
    other = config(tmp_path, {"elsewhere": 1104})
    Exporter(engine, other).process_one()
    job = state(engine, job_id)
    assert job.state == JobState.dead and "not configured" in job.last_error and job.attempts == 1


class _Hook(http.server.BaseHTTPRequestHandler):
    bodies: list[bytes] = []
    fail_first = 0

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).bodies.append(body)
        code = 500 if type(self).fail_first > 0 else 204
        type(self).fail_first -= 1
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_webhook_posts_json_without_phi_and_is_retried(engine: Engine, tmp_path: Path) -> None:
    _Hook.bodies, _Hook.fail_first = [], 1
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        cfg = config(tmp_path, {}, webhook_url=url, webhook_min_priority="STAT", webhook_timeout_s=5.0)
        ids = enqueue(engine, cfg, [], Priority.STAT)
        assert len(ids) == 1
        job = run_until(engine, Exporter(engine, cfg), ids[0], {JobState.succeeded, JobState.dead})
        assert job.state == JobState.succeeded and job.attempts == 2  # HTTP 500 first, then delivered
    finally:
        server.shutdown()
    assert len(_Hook.bodies) == 2
    raw = _Hook.bodies[-1].decode()
    body = json.loads(raw)
    assert body["study_instance_uid"] == es.IDENTITY.study_instance_uid
    assert body["priority"] == "STAT" and "central_pe" in body["findings"]
    assert body["main_finding"] == "central PE, RV/LV>=1"
    for phi in (es.PATIENT_NAME, es.PATIENT_ID, "Patient", "ACC77"):
        assert phi not in raw
    assert webhook_body(make_result(), es.decision()) == body


def test_run_forever_sends_while_polling_quietly_and_stops(
    engine: Engine, files: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A send that outlasts many poll intervals (a slow PACS) logs no warning: one loop, no overlapping runs."""
    scp = StoreSCP(delay_s=0.5).start()
    cfg = config(tmp_path, {"pacs": scp.port})
    caplog.set_level(logging.INFO)
    exporter = Exporter(engine, cfg)
    stop = threading.Event()
    started = threading.Event()
    thread = threading.Thread(target=exporter.run_forever, args=(stop,), kwargs={"on_start": started.set}, daemon=True)
    thread.start()
    try:
        assert started.wait(10)
        [job_id] = enqueue(engine, cfg, files[:3])
        deadline = time.monotonic() + 20
        while state(engine, job_id).state != JobState.succeeded and time.monotonic() < deadline:
            time.sleep(0.1)
        assert state(engine, job_id).state == JobState.succeeded
    finally:
        stop.set()
        thread.join(15)
        scp.stop()
    assert not thread.is_alive()
    assert len(scp.received) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [], warnings
    assert not any("maximum number of running instances" in r.getMessage() for r in caplog.records)


def test_sender_proposes_only_the_sop_classes_it_sends(files: list[Path], scp: StoreSCP, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    original = AE.associate

    def spy(self: AE, *args: Any, **kwargs: Any) -> Any:
        seen.append(sorted({str(cx.abstract_syntax) for cx in self.requested_contexts}))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AE, "associate", spy)
    dest = DestinationSection(name="pacs", ae_title="PACS", host="127.0.0.1", port=scp.port)
    report = send_files(dest, files[:2], calling_ae_title="PETRIAGE")
    assert report.ok and len(report.delivered) == 2
    assert seen == [["1.2.840.10008.5.1.4.1.1.2"]]  # CT Image Storage only


def test_exporter_service_runs_until_stopped(engine: Engine, db_url: str, files: list[Path], tmp_path: Path, scp: StoreSCP) -> None:
    from pe_triage_node.export.exporter import run_exporter_service

    cfg = config(tmp_path, {"pacs": scp.port})
    cfg.database.url = SecretStr(db_url)
    [job_id] = enqueue(engine, cfg, files[:1])
    stop = threading.Event()
    thread = threading.Thread(target=run_exporter_service, args=(cfg, stop), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while state(engine, job_id).state != JobState.succeeded and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    thread.join(15)
    assert state(engine, job_id).state == JobState.succeeded and not thread.is_alive()
