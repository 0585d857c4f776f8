"""HL7 v2 and FHIR destinations against real peers on loopback (SQLite and PostgreSQL queues).

The peers are built on other libraries than the node's: an MLLP listener on
python-hl7 that parses and checks every ORU^R01 and answers AA, AE or AR; a
FHIR endpoint that validates every resource of the Bundle with fhir.resources
and answers 200, 400 with an OperationOutcome, or 503. The payloads are built
by the exporter from the ``results`` row and the ``studies`` row, as in the node.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from pe_triage_node.config import NodeConfig
from pe_triage_node.db.models import Job, JobState, Study, TriageResult
from pe_triage_node.export.exporter import Exporter, enqueue_exports
from pe_triage_node.export.findings import main_finding
from pe_triage_node.inference.labels import STUDY_LABELS
from pe_triage_node.inference.result import StudyResult
from pe_triage_node.queue import get_job
from pe_triage_node.rules import Priority

from tests import export_support as es
from tests import peers, ris_peers

TOKEN = "s3cret-bearer-token"
BIRTH_DATE = "19471103"
PHI = (es.PATIENT_NAME, es.PATIENT_ID, "ACC77", BIRTH_DATE)


def store(engine: Engine, priority: Priority = Priority.STAT) -> tuple[StudyResult, int]:
    """The study as the receiver keeps it and the result as the worker stores it; returns the result and its row id."""
    result = es.minimal_result()
    with Session(engine) as s, s.begin():
        s.add(Study(study_instance_uid=result.study_instance_uid, patient_id=es.PATIENT_ID, patient_name=es.PATIENT_NAME,
                    patient_birth_date=BIRTH_DATE, patient_sex="F", accession_number="ACC77", study_date="20260101",
                    study_time="120000"))
        row = TriageResult(
            study_instance_uid=result.study_instance_uid, series_instance_uid=result.series_instance_uid,
            model_version=result.model_version, labels=json.dumps(result.labels), probabilities=json.dumps(result.probabilities),
            priority=priority.value, rule_name="Central PE", result_json=json.dumps(result.to_dict("summary")),
        )
        s.add(row)
        s.flush()
        return result, int(row.id)


def config(tmp_path: Path, *destinations: dict[str, Any], **export: Any) -> NodeConfig:
    settings = {"destinations": list(destinations), "backoff_base_s": 0.05, "backoff_cap_s": 0.2, **export}
    return NodeConfig(node={"var_dir": tmp_path}, export=settings, queue={"heartbeat_s": 1.0, "lease_s": 30.0})


def hl7_destination(port: int, **more: Any) -> dict[str, Any]:
    return {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": port, "timeout_s": 5.0,
            "receiving_application": "RIS", "receiving_facility": "HOSPITAL", **more}


def fhir_destination(url: str, **more: Any) -> dict[str, Any]:
    return {"name": "ehr", "kind": "fhir", "url": url, "bearer_token": TOKEN, "timeout_s": 5.0, **more}


def enqueue(engine: Engine, cfg: NodeConfig, result: StudyResult, result_id: int, priority: Priority = Priority.STAT) -> list[int]:
    with Session(engine) as s, s.begin():
        return enqueue_exports(s, cfg.export, [], result=result, decision=es.decision(priority), result_id=result_id)


def run_until(engine: Engine, exporter: Exporter, job_id: int, states: set[JobState], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exporter.process_one()
        with Session(engine) as s:
            job = get_job(s, job_id)
        assert job is not None
        if job.state in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not in {states} after {timeout} s")


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)
    yield caplog
    text = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (*PHI, TOKEN):
        assert secret not in text, f"{secret!r} reached the logs"


# -- HL7 v2 over MLLP -----------------------------------------------------------------


def test_hl7_oru_is_delivered_once_on_aa_and_says_what_the_node_stored(engine: Engine, tmp_path: Path, logs: Any) -> None:
    with ris_peers.MLLPListener(["AA"]) as ris:
        cfg = config(tmp_path, hl7_destination(ris.port))
        result, result_id = store(engine)
        [job_id] = enqueue(engine, cfg, result, result_id)
        job = run_until(engine, Exporter(engine, cfg), job_id, {JobState.succeeded, JobState.dead})
        assert not Exporter(engine, cfg).process_one()  # nothing left: delivered once
    assert job.state == JobState.succeeded and job.attempts == 1, job.last_error
    assert ris.answered == ["AA"]
    [msg] = ris.received
    assert ris_peers.oru_problems(msg) == []
    msh, pid, orc, obr, tq1 = (msg.segment(n) for n in ("MSH", "PID", "ORC", "OBR", "TQ1"))
    assert str(msh[10]) == f"PT{job_id}" and str(msh[5]) == "RIS" and str(msh[18]) == "UNICODE UTF-8"
    assert str(pid[3]) == es.PATIENT_ID and str(pid[5]) == "Export^Test"
    assert str(pid[7]) == BIRTH_DATE and str(pid[8]) == "F"
    assert str(orc[2]) == str(orc[3]) == str(obr[2]) == str(obr[3]) == "ACC77"
    assert str(obr[20]) == result.study_instance_uid and str(obr[25]) == "P" and str(obr[7]) == "20260101120000"
    assert str(tq1[9]) == "S^Stat^HL70485" and str(orc[7][0][5]) == "S" and str(obr[27][0][5]) == "S"
    obx = {str(seg[3][0][0]): seg for seg in msg.segments("OBX")}
    assert str(obx["113014"][5]).startswith(result.study_instance_uid)
    assert str(obx["59282003"][5]) == "52101004^Present^SCT"  # pulmonary embolism: present (SNOMED CT)
    assert str(obx["CENTRAL-PE"][5]) == "52101004^Present^SCT" and str(obx["LEFT-PE"][5]) == "272519000^Absent^SCT"
    assert str(obx["RVLV-RATIO"][5]).startswith("RVLV-GTE-1^") and str(obx["PE-CHRONICITY"][5]).startswith("ACUTE^")
    assert str(obx["TRIAGE-PRIORITY"][5]).startswith("STAT^")
    numeric = [seg for seg in msg.segments("OBX") if str(seg[2]) == "NM"]
    assert len(numeric) == len(STUDY_LABELS) + 1 and all(str(seg[6]) == "1^no units^UCUM" for seg in numeric)
    assert float(str(obx["P-CENTRAL"][5])) == pytest.approx(0.7)
    assert str(obx["111001"][5]) == "test-model" and str(obx["111003"][5]) == "1.0"


def test_hl7_ae_is_retried_then_delivered(engine: Engine, tmp_path: Path, logs: Any) -> None:
    with ris_peers.MLLPListener(["AE", "AA"], reason="interface busy") as ris:
        cfg = config(tmp_path, hl7_destination(ris.port))
        result, result_id = store(engine)
        [job_id] = enqueue(engine, cfg, result, result_id)
        exporter = Exporter(engine, cfg)
        exporter.process_one()
        with Session(engine) as s:
            first = get_job(s, job_id)
        assert first is not None and first.state == JobState.queued and "ACK AE: interface busy" in (first.last_error or "")
        job = run_until(engine, exporter, job_id, {JobState.succeeded, JobState.dead})
    assert job.state == JobState.succeeded and job.attempts == 2
    assert ris.answered == ["AE", "AA"]
    assert [str(m.segment("MSH")[10]) for m in ris.received] == [f"PT{job_id}"] * 2  # the same message again


def test_hl7_ar_is_dead_lettered_at_once_with_the_reason(engine: Engine, tmp_path: Path, logs: Any) -> None:
    with ris_peers.MLLPListener(["AR"], reason="unknown order ACC77") as ris:
        cfg = config(tmp_path, hl7_destination(ris.port), max_attempts=5)
        result, result_id = store(engine)
        [job_id] = enqueue(engine, cfg, result, result_id)
        job = run_until(engine, Exporter(engine, cfg), job_id, {JobState.succeeded, JobState.dead})
    assert job.state == JobState.dead and job.attempts == 1
    assert "rejected, ACK AR: unknown order ACC77" in job.last_error
    assert len(ris.received) == 1


def test_hl7_peer_down_is_retried_within_the_timeout(engine: Engine, tmp_path: Path) -> None:
    cfg = config(tmp_path, hl7_destination(peers.free_port(), timeout_s=2.0))
    result, result_id = store(engine)
    [job_id] = enqueue(engine, cfg, result, result_id)
    Exporter(engine, cfg).process_one()
    with Session(engine) as s:
        job = get_job(s, job_id)
    assert job is not None and job.state == JobState.queued and "MLLP 127.0.0.1" in (job.last_error or "")


def test_hl7_only_for_the_priorities_it_asks_for(engine: Engine, tmp_path: Path) -> None:
    cfg = config(tmp_path, hl7_destination(peers.free_port(), min_priority="URGENT"),
                 fhir_destination("http://127.0.0.1:9/fhir"))
    result, result_id = store(engine, Priority.ROUTINE)
    ids = enqueue(engine, cfg, result, result_id, Priority.ROUTINE)
    with Session(engine) as s:
        destinations = [json.loads(s.get_one(Job, i).payload)["destination"] for i in ids]
    assert destinations == ["ehr"]  # FHIR takes every priority, HL7 only URGENT and STAT
    assert len(enqueue(engine, cfg, result, result_id, Priority.URGENT)) == 2


# -- FHIR -------------------------------------------------------------------------------


def test_fhir_bundle_is_valid_and_delivered_with_the_token(engine: Engine, tmp_path: Path, logs: Any) -> None:
    with ris_peers.FHIRServer([200]) as ehr:
        cfg = config(tmp_path, fhir_destination(ehr.url, patient_identifier_system="urn:oid:1.2.3.4"))
        result, result_id = store(engine)
        [job_id] = enqueue(engine, cfg, result, result_id)
        job = run_until(engine, Exporter(engine, cfg), job_id, {JobState.succeeded, JobState.dead})
    assert job.state == JobState.succeeded and job.attempts == 1, job.last_error
    assert ehr.answered == [200] and ehr.authorizations == [f"Bearer {TOKEN}"]
    resources = ehr.resources()
    kinds = [r["resourceType"] for r in resources]
    assert kinds.count("Device") == kinds.count("DiagnosticReport") == kinds.count("Task") == 1
    by_kind = {r["resourceType"]: r for r in resources}
    report, task, device = by_kind["DiagnosticReport"], by_kind["Task"], by_kind["Device"]
    study = {"system": "urn:dicom:uid", "value": f"urn:oid:{result.study_instance_uid}"}
    assert report["status"] == "preliminary" and report["imagingStudy"][0]["identifier"] == study
    assert report["conclusion"].startswith(main_finding(result.labels) + ". AI triage priority STAT.")
    assert report["conclusionCode"][0]["coding"][0]["code"] == "59282003"
    assert report["subject"]["identifier"] == {"system": "urn:oid:1.2.3.4", "value": es.PATIENT_ID}
    assert report["basedOn"][0]["identifier"]["value"] == "ACC77"
    assert len(report["result"]) == kinds.count("Observation")
    assert task["priority"] == "stat" and task["focus"]["identifier"] == study
    assert device["deviceName"][0]["name"] == "test-model" and device["version"][0]["value"] == "1.0"
    observations = [r for r in resources if r["resourceType"] == "Observation"]
    assert all(o["status"] == "preliminary" for o in observations)
    coded = {o["code"]["coding"][0]["code"]: o for o in observations if "valueCodeableConcept" in o}
    assert coded["59282003"]["valueCodeableConcept"]["coding"][0]["code"] == "52101004"
    assert len([o for o in observations if "valueQuantity" in o]) == len(STUDY_LABELS) + 1


def test_fhir_503_is_retried_and_400_dead_lettered_with_the_outcome(engine: Engine, tmp_path: Path, logs: Any) -> None:
    with ris_peers.FHIRServer([503, 200]) as ehr:
        cfg = config(tmp_path, fhir_destination(ehr.url))
        result, result_id = store(engine)
        [job_id] = enqueue(engine, cfg, result, result_id)
        job = run_until(engine, Exporter(engine, cfg), job_id, {JobState.succeeded, JobState.dead})
    assert job.state == JobState.succeeded and job.attempts == 2 and ehr.answered == [503, 200]
    with ris_peers.FHIRServer([400], reason="Patient EXPORT-0001 unknown") as ehr:
        cfg = config(tmp_path, fhir_destination(ehr.url), max_attempts=5)
        with Session(engine) as s, s.begin():
            s.query(TriageResult).delete()
            s.query(Study).delete()
        result, result_id = store(engine, Priority.URGENT)
        [job_id] = enqueue(engine, cfg, result, result_id, Priority.URGENT)
        job = run_until(engine, Exporter(engine, cfg), job_id, {JobState.succeeded, JobState.dead})
    assert job.state == JobState.dead and job.attempts == 1
    assert "HTTP 400: error: Patient EXPORT-0001 unknown" in job.last_error
    assert ris_peers.bundle_problems(ehr.bodies[0]) == []  # refused by the server's rules, not for being invalid
