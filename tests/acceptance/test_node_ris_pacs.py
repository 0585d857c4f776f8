"""Acceptance: one phantom CTPA in, the node (``pe-triage run`` as processes) sends its result to four
destinations of four kinds, each receiving it once: DICOM C-STORE (dcmtk ``storescp``), DICOMweb STOW-RS
(Orthanc's DICOMweb plugin), HL7 v2.5.1 ORU^R01 over MLLP (a python-hl7 listener) and a FHIR transaction
Bundle (an endpoint validating it with fhir.resources).

Every payload is checked against what the node stored (the ``results`` row) and what it received (the
phantom's patient and order), never against the model's accuracy; the node's log holds no patient data
although the HL7 and FHIR payloads carry it.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from pe_triage_node.db.models import Job, JobKind, JobState, TriageResult
from pe_triage_node.db.session import make_engine
from pe_triage_node.export.findings import ResultFindings, main_finding

from tests import node_support, peers, ris_peers

pytestmark = pytest.mark.slow

CENTRAL_SEED = 2  # the demo's central-PE phantom for this seed (tests/acceptance/test_node_with_orthanc.py)
TOKEN = "acceptance-bearer-token"
HL7_PRIORITY = {"STAT": "S", "URGENT": "A", "ROUTINE": "R"}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_one_study_reaches_dicom_dicomweb_hl7_and_fhir_destinations_once(
    tmp_path: Path, db_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    series = node_support.phantom_ctpa(tmp_path_factory.mktemp("phantom"), CENTRAL_SEED, "central")
    source = pydicom.dcmread(next(series.glob("*.dcm")), stop_before_pixels=True)
    manifest = node_support.DEMO_MANIFEST if node_support.DEMO_MANIFEST.is_file() else node_support.tiny_manifest(tmp_path / "model")

    storescp_port, orthanc_dicom, orthanc_http = peers.free_port(), peers.free_port(), peers.free_port()
    storescp = peers.start_storescp(storescp_port, tmp_path / "storescp")
    orthanc = peers.start_orthanc(tmp_path / "orthanc", orthanc_dicom, orthanc_http, dicomweb=True)
    ris = ris_peers.MLLPListener(["AA"]).start()
    ehr = ris_peers.FHIRServer([200]).start()
    node_port = peers.free_port()
    config = node_support.write_node_config(
        tmp_path, database_url=db_url, receiver_port=node_port, manifest=manifest,
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": storescp_port},
            {"name": "archive", "kind": "dicomweb", "url": f"http://127.0.0.1:{orthanc_http}/dicom-web"},
            {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": ris.port, "receiving_application": "RIS"},
            {"name": "ehr", "kind": "fhir", "url": ehr.url, "bearer_token": TOKEN},
        ],
    )
    log_path = tmp_path / "node.log"
    node = node_support.start_node_process(config, ["run", "--no-web"], log_path=log_path)
    engine = make_engine(db_url)
    try:
        peers.wait_for_port(node_port, proc=node, timeout=120)
        sent = peers.storescu(node_port, [series])
        assert sent.returncode == 0, sent.stderr

        def delivered() -> bool:
            with Session(engine) as s:
                exports = s.scalars(select(Job).where(Job.kind == JobKind.export)).all()
            # DICOM and DICOMweb: the SR's job, then the images'; HL7 and FHIR: one each
            return len(exports) == 6 and all(j.state == JobState.succeeded for j in exports)

        node_support.wait_until(delivered, 300, "the result delivered to all four destinations",
                                procs=[node], log_path=log_path)
        with Session(engine) as s:
            row = s.scalars(select(TriageResult)).one()
            kinds = sorted(json.loads(j.payload)["type"] for j in s.scalars(select(Job).where(Job.kind == JobKind.export)))
        assert kinds == ["dicom", "dicom", "dicomweb", "dicomweb", "fhir", "hl7"]
    finally:
        engine.dispose()
        node.send_signal(signal.SIGTERM)
        try:
            code = node.wait(timeout=150)
        except subprocess.TimeoutExpired:
            node.kill()
            raise
        ris.stop()
        ehr.stop()
        peers.stop_process(storescp)
    try:
        # DICOM and DICOMweb: the same objects, each once (the SR, the SCs and, for a positive result, the KOS)
        stored = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((tmp_path / "storescp").iterdir())]
        modalities = sorted(ds.Modality for ds in stored)
        assert modalities.count("SR") == 1 and modalities.count("KO") <= 1 and "OT" in modalities
        from dicomweb_client.api import DICOMwebClient

        web = DICOMwebClient(url=f"http://127.0.0.1:{orthanc_http}/dicom-web")
        archived = web.search_for_instances(source.StudyInstanceUID)
        assert sorted(i["00080018"]["Value"][0] for i in archived) == sorted(ds.SOPInstanceUID for ds in stored)
    finally:
        peers.stop_process(orthanc)
    assert code == 0, f"the node did not stop cleanly on SIGTERM\n{log_path.read_text()[-4000:]}"

    found = ResultFindings.from_row(row)
    # HL7: one ORU, acknowledged AA, for this patient and order, with the stored priority and finding
    assert ris.answered == ["AA"]
    [msg] = ris.received
    assert ris_peers.oru_problems(msg) == []
    assert str(msg.segment("PID")[3]) == source.PatientID and str(msg.segment("PID")[5]) == str(source.PatientName)
    assert str(msg.segment("OBR")[3]) == source.AccessionNumber
    assert str(msg.segment("OBR")[20]) == source.StudyInstanceUID
    assert str(msg.segment("TQ1")[9][0][0]) == HL7_PRIORITY[row.priority]
    pe = next(seg for seg in msg.segments("OBX") if str(seg[3][0][0]) == "59282003")
    assert str(pe[5][0][1]) == ("Present" if found.labels.get("pe_present_on_image")
                                else "Indeterminate" if found.labels.get("indeterminate") else "Absent")
    # FHIR: one valid Bundle, with the token, the stored priority and headline
    assert ehr.answered == [200] and ehr.authorizations == [f"Bearer {TOKEN}"]
    resources = {r["resourceType"]: r for r in ehr.resources()}
    assert resources["Task"]["priority"] == row.priority.lower()
    assert resources["DiagnosticReport"]["conclusion"].startswith(main_finding(found.labels))
    assert resources["DiagnosticReport"]["subject"]["identifier"]["value"] == source.PatientID
    # the payloads carried patient data; the log does not
    log_text = log_path.read_text(errors="replace")
    for phi in (source.PatientID, str(source.PatientName), source.AccessionNumber, TOKEN):
        assert phi not in log_text, f"{phi!r} in the node's log"
