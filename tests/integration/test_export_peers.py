"""Results to real peers on loopback: dcmtk ``storescp``, Orthanc by C-STORE and by STOW-RS (its DICOMweb
plugin): the SR, SCs and KOS land under the original study."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from pe_triage_node.config import NodeConfig
from pe_triage_node.db.migrate import upgrade
from pe_triage_node.db.models import JobState
from pe_triage_node.db.session import make_engine
from pe_triage_node.export.exporter import Exporter, enqueue_exports
from pe_triage_node.export.outputs import OutputSource, write_outputs
from pe_triage_node.inference.result import StudyResult
from pe_triage_node.queue import get_job
from pe_triage_node.rules import Priority

from tests import export_support as es
from tests import peers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return es.write_series(tmp_path_factory.mktemp("peer_series"))


@pytest.fixture(scope="module")
def result(series_dir: Path) -> StudyResult:
    return es.positive(es.analyse(series_dir))


@pytest.fixture(scope="module")
def outputs(result: StudyResult, series_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_outputs(OutputSource.of(result, es.load_volume(series_dir), es.decision(Priority.STAT)), tmp_path_factory.mktemp("outputs"))


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    eng = make_engine(url)
    yield eng
    eng.dispose()


def export_to(engine: Engine, tmp_path: Path, port: int, paths: list[Path], result: StudyResult,
              destination: dict[str, Any] | None = None) -> Any:
    dest = destination or {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}
    cfg = NodeConfig(node={"var_dir": tmp_path}, export={"destinations": [dest], "backoff_base_s": 0.1})
    with Session(engine) as s, s.begin():
        [job_id] = enqueue_exports(s, cfg.export, paths, result=result, decision=es.decision(Priority.STAT))
    exporter = Exporter(engine, cfg)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        exporter.process_one()
        with Session(engine) as s:
            job = get_job(s, job_id)
        if job is not None and job.state in (JobState.succeeded, JobState.dead):
            return job
        time.sleep(0.1)
    raise AssertionError("export job did not finish")


def test_storescp_receives_valid_objects(sqlite_engine: Engine, outputs: list[Path], result: StudyResult, tmp_path: Path) -> None:
    port = peers.free_port()
    received = tmp_path / "storescp"
    proc = peers.start_storescp(port, received)
    try:
        job = export_to(sqlite_engine, tmp_path, port, outputs, result)
    finally:
        peers.stop_process(proc)
    assert job.state == JobState.succeeded, job.last_error
    files = sorted(received.iterdir())
    assert len(files) == len(outputs)
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in outputs}
    got = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}
    assert got == sent
    for f in files:
        assert es.dciodvfy_errors(f) == [], f.name
    sr = next(f for f in files if pydicom.dcmread(f, stop_before_pixels=True).Modality == "SR")
    assert "AI triage priority" in es.dsrdump(sr)


def _get(http_port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=10) as rsp:
        return json.loads(rsp.read())


def test_orthanc_files_the_results_under_the_original_study_and_a_rerun_replaces(
    sqlite_engine: Engine, outputs: list[Path], result: StudyResult, series_dir: Path, tmp_path: Path
) -> None:
    dicom_port, http_port = peers.free_port(), peers.free_port()
    proc = peers.start_orthanc(tmp_path / "orthanc", dicom_port, http_port)
    try:
        sent = peers.storescu(dicom_port, [series_dir], called="PACS")
        assert sent.returncode == 0, sent.stderr
        job = export_to(sqlite_engine, tmp_path, dicom_port, outputs, result)
        assert job.state == JobState.succeeded, job.last_error
        studies = _get(http_port, "/studies?expand")
        assert len(studies) == 1  # the results joined the source study, no new study
        study = studies[0]
        assert study["MainDicomTags"]["StudyInstanceUID"] == result.study_instance_uid
        series = _get(http_port, f"/studies/{study['ID']}/series?expand")
        by_modality = {s["MainDicomTags"].get("Modality"): s for s in series}
        assert set(by_modality) == {"CT", "SR", "OT", "KO"}
        sr_series = by_modality["SR"]
        assert sr_series["MainDicomTags"]["SeriesDescription"] == "AI PE TRIAGE: STAT - central PE, RV/LV>=1"
        tags = _get(http_port, f"/instances/{sr_series['Instances'][0]}/simplified-tags")
        assert tags["VerificationFlag"] == "UNVERIFIED" and tags["PatientID"] == es.PATIENT_ID
        assert len(by_modality["OT"]["Instances"]) == len(outputs) - 2  # all but the SR and the KOS
        before = _get(http_port, "/statistics")["CountInstances"]
        again = export_to(sqlite_engine, tmp_path, dicom_port, outputs, result)  # a re-run: same derived UIDs
        assert again.state == JobState.succeeded
        assert _get(http_port, "/statistics")["CountInstances"] == before
    finally:
        peers.stop_process(proc)


def _make_pki(d: Path) -> None:
    """A throw-away CA, a server certificate for 127.0.0.1 (subjectAltName) and a client certificate."""
    import subprocess

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    d.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=export-test-ca", "-keyout", "ca.key", "-out", "ca.crt")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", "san.ext", "-out", f"{name}.crt")


def test_tls_destination_with_client_certificate(files_for_tls: list[Path], tmp_path: Path) -> None:
    """DICOM TLS (PS3.15 B.1): the peer's certificate is verified and ours is presented."""
    import ssl

    from pynetdicom import AE, AllStoragePresentationContexts, evt

    from pe_triage_node.config import DestinationSection
    from pe_triage_node.export.sender import send_files

    pki = tmp_path / "pki"
    _make_pki(pki)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    server_ctx.load_cert_chain(str(pki / "server.crt"), str(pki / "server.key"))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    port = peers.free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=server_ctx, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None
    try:
        peers.wait_for_port(port)
        dest = DestinationSection(
            name="tls-pacs", ae_title="PACS", host="127.0.0.1", port=port, tls=True,
            ca_certificates=pki / "ca.crt", certificate=pki / "client.crt", private_key=pki / "client.key",
        )
        report = send_files(dest, files_for_tls, calling_ae_title="PETRIAGE", acse_timeout_s=10)
        assert report.ok, report.summary()
        assert len(received) == len(files_for_tls)
        no_cert = dest.model_copy(update={"certificate": None, "private_key": None})
        assert not send_files(no_cert, files_for_tls, calling_ae_title="PETRIAGE", acse_timeout_s=5).ok
    finally:
        server.shutdown()


@pytest.fixture
def files_for_tls(outputs: list[Path]) -> list[Path]:
    return outputs[:2]


def test_stow_rs_to_orthanc_then_qido_finds_and_wado_returns_the_sr(
    sqlite_engine: Engine, outputs: list[Path], result: StudyResult, series_dir: Path, tmp_path: Path
) -> None:
    """A DICOMweb destination: the SR, SCs and KOS by STOW-RS into Orthanc's DICOMweb plugin; QIDO-RS then finds
    the SR series under the original study, WADO-RS returns the SR, and the KOS references the original series."""
    from dicomweb_client.api import DICOMwebClient

    dicom_port, http_port = peers.free_port(), peers.free_port()
    proc = peers.start_orthanc(tmp_path / "orthanc", dicom_port, http_port, dicomweb=True)
    root = f"http://127.0.0.1:{http_port}/dicom-web"
    try:
        sent = peers.storescu(dicom_port, [series_dir], called="PACS")
        assert sent.returncode == 0, sent.stderr
        job = export_to(sqlite_engine, tmp_path, dicom_port, outputs, result,
                        {"name": "archive", "kind": "dicomweb", "url": root, "timeout_s": 30.0})
        assert job.state == JobState.succeeded, job.last_error
        assert job.attempts == 1
        web = DICOMwebClient(url=root)
        study_uid = result.study_instance_uid
        assert len(web.search_for_studies(search_filters={"StudyInstanceUID": study_uid})) == 1  # no new study
        modalities = {s["00080060"]["Value"][0]: s for s in web.search_for_series(study_uid)}
        assert set(modalities) == {"CT", "SR", "OT", "KO"}
        sr_series = modalities["SR"]["0020000E"]["Value"][0]
        [sr_item] = web.search_for_instances(study_uid, sr_series)
        sr_file = next(p for p in outputs if p.name.startswith("SR_"))
        sr_uid = pydicom.dcmread(sr_file, stop_before_pixels=True).SOPInstanceUID
        assert sr_item["00080018"]["Value"][0] == sr_uid
        sr = web.retrieve_instance(study_uid, sr_series, sr_uid)
        assert sr.VerificationFlag == "UNVERIFIED" and sr.SeriesDescription.startswith("AI PE TRIAGE: STAT")
        kos_series = modalities["KO"]["0020000E"]["Value"][0]
        [kos_item] = web.search_for_instances(study_uid, kos_series)
        kos = web.retrieve_instance(study_uid, kos_series, kos_item["00080018"]["Value"][0])
        referenced = kos.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert referenced.SeriesInstanceUID == result.series_instance_uid
    finally:
        peers.stop_process(proc)


def test_stow_rs_to_a_dead_archive_is_retried(sqlite_engine: Engine, outputs: list[Path], result: StudyResult, tmp_path: Path) -> None:
    from pe_triage_node.config import DicomWebDestination
    from pe_triage_node.export.delivery import Outcome
    from pe_triage_node.export.dicomweb import stow

    dest = DicomWebDestination(name="archive", kind="dicomweb", url=f"http://127.0.0.1:{peers.free_port()}/dicom-web", timeout_s=3)
    delivery = stow(dest, outputs[:1])
    assert delivery.outcome == Outcome.retry and "ConnectionError" in delivery.detail
