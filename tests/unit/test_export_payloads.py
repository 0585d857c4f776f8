"""HL7 ORU^R01 and FHIR Bundle payloads as pure functions of a stored result; the answers they map; the
destination kinds in the configuration. No sockets, no processes: the peers' checks run on the bytes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import hl7
import pytest
from pydicom.dataset import Dataset

from pe_triage_node.cli import main
from pe_triage_node.config import DestinationSection, FHIRDestination, HL7Destination, NodeConfig, load_config
from pe_triage_node.db.models import Study, TriageResult
from pe_triage_node.errors import ConfigError
from pe_triage_node.export import fhir
from pe_triage_node.export import hl7 as oru
from pe_triage_node.export.delivery import Outcome, http_outcome
from pe_triage_node.export.exporter import destination_job, wants
from pe_triage_node.export.findings import ResultFindings
from pe_triage_node.export.messages import write_messages
from pe_triage_node.export.record import PatientOrder, ResultRecord
from pe_triage_node.inference.labels import STUDY_LABELS, WINDOW_LABEL
from pe_triage_node.rules import Priority

from tests import export_support as es
from tests import ris_peers

WHEN = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
STUDY_UID = "1.2.826.0.1.3680043.10.1453.77.1"
SERIES_UID = "1.2.826.0.1.3680043.10.1453.77.2"


def labels(positive: bool = True) -> dict[str, bool]:
    out = {k: False for k in STUDY_LABELS}
    if positive:
        out.update({WINDOW_LABEL: True, "central_pe": True, "rightsided_pe": True, "rv_lv_ratio_gte_1": True})
    else:
        out.update({WINDOW_LABEL: False, "negative_exam_for_pe": True})
    return out


def record(priority: Priority = Priority.STAT, positive: bool = True, **patient: str) -> ResultRecord:
    found = labels(positive)
    person = {"patient_id": "PID-1", "patient_name": "Doe^Jane^Q^Dr^III", "birth_date": "19600101", "sex": "F",
              "accession_number": "ACC77", "study_date": "20260101", "study_time": "120000.5", **patient}
    return ResultRecord(
        study_instance_uid=STUDY_UID, series_instance_uid=SERIES_UID, generation=0, model_name="test-model",
        model_version="1.0", meaningless=False,
        findings=ResultFindings(found, {k: 0.8 if found[k] else 0.1 for k in STUDY_LABELS}, {}),
        priority=priority, rule_name="Central PE", flags=(), created_at=WHEN, patient=PatientOrder(**person),
    )


def message(rec: ResultRecord, control_id: str = "PT7") -> hl7.Message:
    return hl7.parse(oru.build_oru(rec, control_id=control_id, now=WHEN))


# -- the record ---------------------------------------------------------------------------


def test_a_record_from_the_stored_rows_equals_the_one_from_the_analysis() -> None:
    """What the exporter reads back (results + studies rows) is what infer --outputs builds in memory."""
    result = es.minimal_result()
    header = Dataset()
    header.PatientID, header.PatientName, header.PatientBirthDate, header.PatientSex = "PID-1", "Doe^Jane", "19600101", "F"
    header.AccessionNumber, header.StudyDate, header.StudyTime = "ACC77", "20260101", "120000"
    from_analysis = ResultRecord.from_analysis(result, es.decision(Priority.STAT), header, when=WHEN)
    row = TriageResult(
        id=5, study_instance_uid=result.study_instance_uid, series_instance_uid=result.series_instance_uid, generation=0,
        model_version="1.0", labels=json.dumps(result.labels), probabilities=json.dumps(result.probabilities),
        priority="STAT", rule_name="Central PE", flags="[]", result_json=json.dumps(result.to_dict("summary")),
        created_at=WHEN.replace(tzinfo=None),
    )
    study = Study(study_instance_uid=result.study_instance_uid, patient_id="PID-1", patient_name="Doe^Jane",
                  patient_birth_date="19600101", patient_sex="F", accession_number="ACC77", study_date="20260101",
                  study_time="120000")
    from_row = ResultRecord.from_row(row, study)
    assert from_row.result_id == 5 and from_row.created_at == WHEN
    assert dataclasses.replace(from_row, result_id=None) == from_analysis
    assert oru.build_oru(from_row, control_id="X", now=WHEN) == oru.build_oru(from_analysis, control_id="X", now=WHEN)
    assert fhir.bundle_json(fhir.build_bundle(from_row)) == fhir.bundle_json(fhir.build_bundle(from_analysis))
    assert ResultRecord.from_row(row, None).patient == PatientOrder()  # a study the node no longer knows


# -- HL7 ------------------------------------------------------------------------------------


def test_oru_passes_the_independent_parsers_checks_and_carries_the_order() -> None:
    msg = message(record())
    assert ris_peers.oru_problems(msg) == []
    assert [str(s[0]) for s in msg][:7] == ["MSH", "SFT", "PID", "ORC", "OBR", "NTE", "TQ1"]
    assert str(msg.segment("MSH")[7]) == "20260304050607+0000" and str(msg.segment("MSH")[10]) == "PT7"
    assert str(msg.segment("PID")[5]) == "Doe^Jane^Q^III^Dr"  # PN family^given^middle^prefix^suffix -> XPN order
    assert str(msg.segment("OBR")[7]) == "20260101120000.5"
    assert str(msg.segment("OBR")[4]) == "418272005^CT angiography^SCT"
    impression = next(seg for seg in msg.segments("OBX") if str(seg[3][0][0]) == "121073")
    assert str(impression[5]) == "AI PE triage: central PE, RV/LV>=1 - priority STAT"  # the findings module's wording


@pytest.mark.parametrize(("priority", "code"), [(Priority.STAT, "S"), (Priority.URGENT, "A"), (Priority.ROUTINE, "R")])
def test_priority_goes_to_tq1_9_and_the_v23_fields(priority: Priority, code: str) -> None:
    msg = message(record(priority))
    assert str(msg.segment("TQ1")[9][0][0]) == code
    assert str(msg.segment("ORC")[7][0][5]) == str(msg.segment("OBR")[27][0][5]) == code
    obx = {str(s[3][0][0]): str(s[5][0][0]) for s in msg.segments("OBX")}
    assert obx["TRIAGE-PRIORITY"] == priority.value


def test_delimiters_in_patient_data_are_escaped_not_interpreted() -> None:
    rec = record(patient_id="A|B^C", patient_name="O'Neil&Sons^Mary~Ann", accession_number="ACC\\9")
    text = oru.build_oru(rec, control_id="PT1", now=WHEN)
    assert "A\\F\\B\\S\\C" in text and "O'Neil\\T\\Sons^Mary\\R\\Ann" in text and "ACC\\E\\9" in text
    msg = hl7.parse(text)
    assert ris_peers.oru_problems(msg) == []
    assert msg.unescape(str(msg.segment("PID")[3])) == "A|B^C"
    assert len(msg.segments("OBX")) == len(message(record()).segments("OBX"))


def test_a_negative_result_without_accession_uses_the_study_uid_as_order_number() -> None:
    msg = message(record(Priority.ROUTINE, positive=False, accession_number="", study_date=""))
    assert str(msg.segment("OBR")[3]) == STUDY_UID and str(msg.segment("ORC")[2]) == STUDY_UID
    assert str(msg.segment("OBR")[7]) == ""
    coded = {str(s[3][0][0]): str(s[5]) for s in msg.segments("OBX") if str(s[2]) == "CE"}
    assert coded["59282003"] == "272519000^Absent^SCT"
    assert "CENTRAL-PE" not in coded and "RVLV-RATIO" not in coded  # location and RV/LV only for a positive study


def _ack(code: str, control_id: str = "PT7", reason: str = "") -> bytes:
    ack = message(record()).create_ack(code)
    ack.segment("MSA").assign_field(control_id, 2)
    if reason:
        ack.segment("MSA").assign_field(reason, 3)
    return str(ack).encode()


@pytest.mark.parametrize(("code", "outcome"), [("AA", Outcome.delivered), ("CA", Outcome.delivered), ("AE", Outcome.retry),
                                               ("CE", Outcome.retry), ("AR", Outcome.dead), ("CR", Outcome.dead)])
def test_ack_codes_map_to_delivered_retry_dead(code: str, outcome: Outcome) -> None:
    ack = oru.parse_ack(_ack(code, reason="why \\T\\ because"))
    assert (ack.code, ack.control_id, ack.reason) == (code, "PT7", "why & because")
    delivery = oru.ack_delivery(ack, "PT7")
    assert delivery.outcome == outcome and "why & because" in delivery.detail


def test_an_ack_for_another_message_or_no_msa_is_not_delivered() -> None:
    assert oru.ack_delivery(oru.parse_ack(_ack("AA", control_id="PT8")), "PT7").outcome == Outcome.retry
    with pytest.raises(ValueError):
        oru.parse_ack(b"MSH|^~\\&|RIS\rPID|1\r")
    with pytest.raises(ValueError):
        oru.parse_ack(b"<html>not HL7</html>")


# -- FHIR -------------------------------------------------------------------------------------


def test_bundle_validates_resolves_and_is_deterministic() -> None:
    text = fhir.bundle_json(fhir.build_bundle(record()))
    assert ris_peers.bundle_problems(text.encode()) == []
    assert fhir.bundle_json(fhir.build_bundle(record())) == text  # a re-send is the same bundle
    entries = json.loads(text)["entry"]
    assert all(e["request"]["ifNoneExist"].startswith("identifier=") for e in entries)
    report = next(e["resource"] for e in entries if e["resource"]["resourceType"] == "DiagnosticReport")
    sr_uid = record().output_uids().sr_instance
    assert report["identifier"][0]["value"] == f"urn:oid:{sr_uid}"  # the report is the SR's content
    later = fhir.bundle_json(fhir.build_bundle(dataclasses.replace(record(), generation=1)))
    assert later != text and ris_peers.bundle_problems(later.encode()) == []


@pytest.mark.parametrize("priority", list(Priority))
def test_task_priority_is_the_fhir_request_priority(priority: Priority) -> None:
    entries = json.loads(fhir.bundle_json(fhir.build_bundle(record(priority))))["entry"]
    task = next(e["resource"] for e in entries if e["resource"]["resourceType"] == "Task")
    assert task["priority"] == priority.value.lower() and task["intent"] == "proposal"


def test_bundle_without_patient_id_or_accession_has_no_subject_or_order() -> None:
    text = fhir.bundle_json(fhir.build_bundle(record(positive=False, patient_id="", accession_number="")))
    assert ris_peers.bundle_problems(text.encode()) == []
    for entry in json.loads(text)["entry"]:
        assert "subject" not in entry["resource"] and "for" not in entry["resource"] and "basedOn" not in entry["resource"]


def test_operation_outcome_text_and_http_statuses() -> None:
    body = json.dumps(ris_peers.operation_outcome("unknown patient")).encode()
    assert fhir.outcome_text(body) == "error: unknown patient"
    assert fhir.outcome_text(b"gateway timeout") == "gateway timeout"
    assert [http_outcome(s) for s in (200, 201, 400, 401, 404, 409, 422, 408, 429, 500, 503)] == [
        Outcome.delivered, Outcome.delivered, Outcome.dead, Outcome.dead, Outcome.dead, Outcome.dead, Outcome.dead,
        Outcome.retry, Outcome.retry, Outcome.retry, Outcome.retry]


def test_messages_written_for_a_site_to_read(tmp_path: Path) -> None:
    oru_path, bundle_path = write_messages(record(), tmp_path)
    assert oru_path.parent.name == "hl7" and bundle_path.parent.name == "fhir"
    assert ris_peers.oru_problems(hl7.parse(oru_path.read_bytes().decode("utf-8"))) == []
    assert ris_peers.bundle_problems(bundle_path.read_bytes()) == []


# -- destinations in the configuration ----------------------------------------------------------


def test_destinations_by_kind_with_dicom_the_default(tmp_path: Path) -> None:
    f = tmp_path / "node.toml"
    f.write_text(
        '[[export.destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "pacs"\nport = 104\n\n'
        '[[export.destinations]]\nname = "ris"\nkind = "hl7"\nhost = "ris"\nport = 2575\nmin_priority = "URGENT"\n\n'
        '[[export.destinations]]\nname = "ehr"\nkind = "fhir"\nurl = "https://ehr/fhir"\nbearer_token = "tok-123"\n\n'
        '[[export.destinations]]\nname = "archive"\nkind = "dicomweb"\nurl = "http://archive/dicom-web"\n'
    )
    pacs, ris, ehr, archive = load_config(f).export.destinations
    assert isinstance(pacs, DestinationSection) and pacs.kind == "dicom" and pacs.min_priority == "ROUTINE"
    assert isinstance(ris, HL7Destination) and ris.sending_application == "PETRIAGE" and ris.timeout_s == 30.0
    assert isinstance(ehr, FHIRDestination) and ehr.bearer_token is not None
    assert archive.kind == "dicomweb"
    assert not wants(ris, Priority.ROUTINE) and wants(ris, Priority.URGENT) and wants(pacs, Priority.ROUTINE)


def test_the_documented_destination_examples_load(tmp_path: Path) -> None:
    """The commented [[export.destinations]] examples of config/node.toml, uncommented, are a valid configuration."""
    text = (Path(__file__).resolve().parents[2] / "config" / "node.toml").read_text()
    examples = text[text.index("\ndestinations = []\n"):text.index("\n[worker]\n")]
    lines = [line[2:] for line in examples.splitlines() if line.startswith("# ")]
    f = tmp_path / "node.toml"
    f.write_text("\n".join(lines) + "\n")
    kinds = [d.kind for d in load_config(f).export.destinations]
    assert kinds == ["dicom", "dicomweb", "hl7", "fhir"]


def test_the_bearer_token_is_masked_in_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "node.toml"
    f.write_text('[[export.destinations]]\nname = "ehr"\nkind = "fhir"\nurl = "https://ehr/fhir"\nbearer_token = "tok-123"\n')
    assert main(["check-config", "--config", str(f)]) == 0
    out = capsys.readouterr().out
    assert "tok-123" not in out and json.loads(out)["export"]["destinations"][0]["bearer_token"] == "**********"
    f.write_text('[[export.destinations]]\nname = "ehr"\nkind = "fhir"\nurl = "ftp://ehr"\nbearer_token = 987654\n')
    with pytest.raises(ConfigError) as err:
        load_config(f)
    message = str(err.value)
    assert "export.destinations.0.fhir.url" in message and "export.destinations.0.fhir.bearer_token = ****" in message
    assert "987654" not in message


@pytest.mark.parametrize("toml", ['kind = "smtp"\nname = "x"\n', 'kind = "hl7"\nname = "x"\nhost = "h"\n',
                                  'name = "x"\nurl = "http://h"\n'])
def test_a_destination_of_an_unknown_kind_or_missing_keys_is_refused(tmp_path: Path, toml: str) -> None:
    f = tmp_path / "node.toml"
    f.write_text("[[export.destinations]]\n" + toml)
    with pytest.raises(ConfigError, match="export.destinations.0"):
        load_config(f)


def test_jobs_carry_files_for_dicom_kinds_and_the_result_for_the_others() -> None:
    cfg = NodeConfig(export={"destinations": [
        {"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104},
        {"name": "web", "kind": "dicomweb", "url": "http://h/dicom-web"},
        {"name": "ris", "kind": "hl7", "host": "h", "port": 2575},
    ]}).export
    pacs, web, ris = cfg.destinations
    assert destination_job(pacs, [], "k", 5, "1.0") is None  # nothing rendered: nothing to send
    assert destination_job(ris, ["/a.dcm"], "k", None, "1.0") is None  # no stored result: nothing to build from
    payload, key = destination_job(web, ["/a.dcm"], "k", 5, "1.0") or ({}, "")
    assert payload == {"type": "dicomweb", "destination": "web", "files": ["/a.dcm"], "model_version": "1.0"}
    assert key == "export:web:k"
    assert destination_job(ris, [], "k", 5, "1.0") == ({"type": "hl7", "destination": "ris", "result_id": 5},
                                                       "export:ris:result-5")
