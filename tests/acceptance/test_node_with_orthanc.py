"""Acceptance: Orthanc forwards two phantom CTPA studies to the node; the SR and SCs come back under them.

Real peers: Orthanc (the PACS) and the node as real processes (``pe-triage run``
with a temporary configuration, Orthanc as the export destination), on SQLite
and on PostgreSQL. Orthanc pushes the studies (REST ``POST /modalities/triage/store``),
as a PACS forwarding rule would; the test reads what came back through Orthanc's
REST API, checks the findings and priorities against what the node stored and
what the rules decide, runs ``dciodvfy`` on each object and ``dsrdump`` on the SR,
and stops the node with SIGTERM (it must exit cleanly). A second test sends
one series in two parts (late instances) and finds the corrected SR in Orthanc
beside the first, with its default ``OverwriteInstances: false``.

The model is the shipped demo weights when present, else a tiny random model;
either way the test checks consistency (the SR says what the node stored, and
that is what the active rules decide for the stored findings), not the model's
accuracy, which the evaluation room measures.
"""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from pe_triage_node.db.models import Job, JobKind, JobState, TriageResult
from pe_triage_node.db.session import make_engine
from pe_triage_node.rules import Findings, priority_for
from pe_triage_node.rules.store import active_rules
from pe_triage_node.services.demo import sr_lines

from tests import export_support, node_support, peers

pytestmark = pytest.mark.slow

SLICES = 40
CENTRAL_SEED = 2  # the demo's phantom with an acute central embolus for this seed (slices of at most 3 mm)
NEGATIVE_SEED = 11


class OrthancREST:
    """The few Orthanc REST calls the test needs."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def call(self, method: str, path: str, body: bytes | dict[str, Any] | list[Any] | None = None) -> Any:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=120) as rsp:  # noqa: S310 - loopback test peer
                raw = rsp.read()
        except urllib.error.HTTPError as exc:  # Orthanc explains its errors in the body
            raise AssertionError(f"Orthanc {method} {path}: HTTP {exc.code}: {exc.read()[:2000]!r}") from exc
        ctype = rsp.headers.get("Content-Type", "")
        return json.loads(raw) if "json" in ctype else raw

    def series_by_modality(self, study_id: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for se in self.call("GET", f"/studies/{study_id}/series"):
            out.setdefault(se["MainDicomTags"].get("Modality", ""), []).extend(se["Instances"])
        return out


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("phantoms")
    return {case: node_support.phantom_ctpa(tmp, seed, case, slices=SLICES)
            for case, seed in (("central", CENTRAL_SEED), ("negative", NEGATIVE_SEED))}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if node_support.DEMO_MANIFEST.is_file():
        return node_support.DEMO_MANIFEST
    return node_support.tiny_manifest(tmp_path_factory.mktemp("model"))


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[tuple[OrthancREST, int]]:
    dicom_port, http_port = peers.free_port(), peers.free_port()
    proc = peers.start_orthanc(tmp_path / "orthanc", dicom_port, http_port, aet="PACS")
    try:
        yield OrthancREST(http_port), dicom_port
    finally:
        peers.stop_process(proc)


def test_orthanc_forwards_two_studies_and_gets_sr_and_scs_back(
    tmp_path: Path, db_url: str, orthanc: tuple[OrthancREST, int], phantoms: dict[str, Path], manifest: Path
) -> None:
    rest, orthanc_dicom = orthanc
    # the PACS holds the two studies
    study_ids: dict[str, str] = {}
    for name, folder in phantoms.items():
        for path in sorted(folder.glob("*.dcm")):
            study_ids[name] = rest.call("POST", "/instances", path.read_bytes())["ParentStudy"]

    node_port = peers.free_port()
    config = node_support.write_node_config(
        tmp_path, database_url=db_url, receiver_port=node_port, manifest=manifest,
        destinations=[{"name": "orthanc", "ae_title": "PACS", "host": "127.0.0.1", "port": orthanc_dicom}],
    )
    log_path = tmp_path / "node.log"
    node = node_support.start_node_process(config, ["run", "--no-web"], log_path=log_path)
    try:
        peers.wait_for_port(node_port, proc=node, timeout=120)
        rest.call("PUT", "/modalities/triage", {"AET": "PETRIAGE", "Host": "127.0.0.1", "Port": node_port})
        rest.call("POST", "/modalities/triage/store", {"Resources": list(study_ids.values()), "Synchronous": True})

        engine = make_engine(db_url)

        def all_delivered() -> bool:
            with Session(engine) as s:
                exports = s.scalars(select(Job).where(Job.kind == JobKind.export)).all()
                results = s.scalars(select(TriageResult)).all()
            # each result: the SR's job, then the images'
            return len(results) == 2 and len(exports) == 4 and all(j.state == JobState.succeeded for j in exports)

        node_support.wait_until(all_delivered, 240, "both results delivered to Orthanc", procs=[node], log_path=log_path)

        with Session(engine) as s:
            results = {r.study_instance_uid: r for r in s.scalars(select(TriageResult))}
            rules = active_rules(s)
        engine.dispose()

        for name, study_id in study_ids.items():
            by_modality = rest.series_by_modality(study_id)
            assert len(by_modality.get("SR", [])) == 1, f"{name}: one SR under the original study"
            assert len(by_modality.get("OT", []) + by_modality.get("SC", [])) >= 1, f"{name}: SCs under the study"
            source = pydicom.dcmread(next(phantoms[name].glob("*.dcm")), stop_before_pixels=True)
            row = results[source.StudyInstanceUID]

            # every object returned is valid for its IOD and belongs to the patient and study
            for instance in [i for mod, ids in by_modality.items() if mod != "CT" for i in ids]:
                path = tmp_path / f"{name}-{instance}.dcm"
                path.write_bytes(rest.call("GET", f"/instances/{instance}/file"))
                ds = pydicom.dcmread(path)
                assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
                assert export_support.dciodvfy_errors(path) == [], f"{name} {ds.Modality}: dciodvfy errors"
                if ds.Modality == "SR":
                    tree = export_support.dsrdump(path)
                    assert "CONTAINER" in tree and row.priority in tree
                    sr = ds

            # the SR says what the node stored, and that is what the rules decide for the stored findings
            labels, probs, attrs = (json.loads(row.labels), json.loads(row.probabilities), json.loads(row.attributes))
            decision = priority_for(Findings(labels, probs), attrs, rules)
            assert row.priority == decision.priority.value
            lines = [line.strip() for line in sr_lines(sr)]
            assert f"AI triage priority: {row.priority}" in lines
            expected_pe = ("Present" if labels["pe_present"]
                           else "Indeterminate" if labels.get("indeterminate") else "Absent")
            assert f"Pulmonary embolism: {expected_pe}" in lines
            assert row.priority in str(sr.SeriesDescription)
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            code = node.wait(timeout=150)
        except subprocess.TimeoutExpired:
            node.kill()
            raise
    assert code == 0, f"the node did not stop cleanly on SIGTERM\n{log_path.read_text()[-4000:]}"


def _image_library_refs(sr: pydicom.Dataset) -> set[str]:
    library = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Image Library")
    return {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for group in library.ContentSequence for i in group.ContentSequence if i.ValueType == "IMAGE"}


def test_late_instances_leave_the_corrected_finding_in_orthanc(
    tmp_path: Path, db_url: str, orthanc: tuple[OrthancREST, int], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A scanner sends 30 slices, the node's result reaches Orthanc; 10 late slices re-open the series and the
    corrected result reaches Orthanc too, as new instances (Orthanc keeps the first copy of an instance it
    holds, ``OverwriteInstances: false`` by default), its SR naming the first as its predecessor."""
    from pe_triage_node.export.identity import OutputUIDs

    rest, orthanc_dicom = orthanc
    study, series = "1.2.826.0.1.3680043.10.1453.86.1", "1.2.826.0.1.3680043.10.1453.86.2"
    files = sorted(node_support.tiny_series(tmp_path / "series", study, series, slices=40),
                   key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber))
    parts = {"first": files[:30], "late": files[30:]}
    for name, part in parts.items():
        (tmp_path / name).mkdir()
        for path in part:
            path.rename(tmp_path / name / path.name)

    node_port = peers.free_port()
    config = node_support.write_node_config(
        tmp_path, database_url=db_url, receiver_port=node_port,
        manifest=node_support.tiny_manifest(tmp_path_factory.mktemp("model")),
        destinations=[{"name": "orthanc", "ae_title": "PACS", "host": "127.0.0.1", "port": orthanc_dicom}],
    )
    log_path = tmp_path / "node.log"
    node = node_support.start_node_process(config, ["run", "--no-web"], log_path=log_path)
    engine = make_engine(db_url)
    try:
        peers.wait_for_port(node_port, proc=node, timeout=120)

        def delivered(results: int) -> bool:
            with Session(engine) as s:
                rows = s.scalars(select(TriageResult)).all()
                exports = s.scalars(select(Job).where(Job.kind == JobKind.export)).all()
            return len(rows) == results and sum(j.state == JobState.succeeded for j in exports) == 2 * results

        for n, name in enumerate(parts, start=1):
            sent = peers.storescu(node_port, [tmp_path / name])
            assert sent.returncode == 0, sent.stderr
            node_support.wait_until(lambda n=n: delivered(n), 240, f"result {n} delivered to Orthanc",
                                    procs=[node], log_path=log_path)
        with Session(engine) as s:
            first, second = s.scalars(select(TriageResult).order_by(TriageResult.id)).all()
    finally:
        engine.dispose()
        peers.stop_process(node, timeout=150)
    assert (first.generation, second.generation) == (0, 1)

    [found] = rest.call("POST", "/tools/lookup", study.encode())
    srs = {}
    for instance in rest.series_by_modality(found["ID"]).get("SR", []):
        ds = pydicom.dcmread(BytesIO(rest.call("GET", f"/instances/{instance}/file")))
        srs[ds.SOPInstanceUID] = ds
    old = OutputUIDs(series, first.model_version, generation=0)
    new = OutputUIDs(series, second.model_version, generation=1)
    assert set(srs) == {old.sr_instance, new.sr_instance}, "the PACS holds the corrected SR beside the first"
    corrected = srs[new.sr_instance]
    assert len(_image_library_refs(corrected)) == 40 and len(_image_library_refs(srs[old.sr_instance])) == 30
    assert f"AI triage priority: {second.priority}" in [line.strip() for line in sr_lines(corrected)]
    expected_pe = "Present" if json.loads(second.labels)["pe_present"] else "Absent"
    assert f"Pulmonary embolism: {expected_pe}" in [line.strip() for line in sr_lines(corrected)]
    predecessor = corrected.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == old.sr_instance
