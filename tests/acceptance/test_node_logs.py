"""Acceptance: no log line of any of the node's processes carries patient data.

A series with a known patient name, ID, birth date and accession number goes
through the whole node (``pe-triage run``: receiver, assembler, worker,
exporter) to a dcmtk ``storescp`` destination; the node's processes log at
DEBUG into one file, which must hold none of those values. The patient name
has no ``^`` (a real public data set's style): highdicom warns about it,
quoting it, while the outputs are built; the node logs that warning without
its text.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from pe_triage_node.db.models import Job, JobKind, JobState, TriageResult
from pe_triage_node.db.session import make_engine
from pe_triage_node.synth.ct_series import StudyIdentity, write_ct_series
from tests import export_support, node_support, peers

pytestmark = pytest.mark.slow

PATIENT = StudyIdentity(
    study_instance_uid="1.2.826.0.1.3680043.10.1453.85.1",
    patient_name="Qwerty_Dx-Z9917",
    patient_id="PID-55443322",
    patient_birth_date="19380517",
    accession_number="ACC-99887766",
)
PHI = (PATIENT.patient_name, "Qwerty", "Z9917", PATIENT.patient_id, PATIENT.patient_birth_date, "1938-05-17",
       PATIENT.accession_number)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_no_log_line_of_any_process_carries_patient_data(
    tmp_path: Path, db_url: str, procs: list[subprocess.Popen[bytes]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    series = tmp_path / "series"
    write_ct_series(export_support.chest_volume(), series, pixel_spacing=(1.5, 1.5), slice_spacing=2.0,
                    study=PATIENT, series_instance_uid="1.2.826.0.1.3680043.10.1453.85.2", extra=export_support.CONTRAST)
    pacs_port, node_port = peers.free_port(), peers.free_port()
    procs.append(peers.start_storescp(pacs_port, tmp_path / "pacs"))
    config = node_support.write_node_config(
        tmp_path, database_url=db_url, receiver_port=node_port,
        manifest=node_support.tiny_manifest(tmp_path_factory.mktemp("model")),
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        sections={"node": {"log_level": "DEBUG"}},
    )
    log_path = tmp_path / "node.log"
    node = node_support.start_node_process(config, ["run", "--no-web"], log_path=log_path)
    procs.append(node)
    peers.wait_for_port(node_port, proc=node, timeout=120)
    sent = peers.storescu(node_port, [series])
    assert sent.returncode == 0, sent.stderr

    engine = make_engine(db_url)
    try:
        def delivered() -> bool:
            with Session(engine) as s:
                exports = s.scalars(select(Job).where(Job.kind == JobKind.export)).all()
                return s.scalar(select(TriageResult.id)) is not None and any(j.state == JobState.succeeded for j in exports)

        node_support.wait_until(delivered, 240, "the result delivered", procs=[node], log_path=log_path)
    finally:
        engine.dispose()
    peers.stop_process(node, timeout=150)  # every process flushes its last lines
    assert node.returncode == 0

    text = log_path.read_text(errors="replace")
    assert "job" in text and "delivered" in text, "the log is the node's"
    assert "library UserWarning" in text, "highdicom's person-name warning was raised and logged without its text"
    leaks = [(phi, line) for line in text.splitlines() for phi in PHI if phi.lower() in line.lower()]
    assert leaks == [], leaks[:5]
    assert any((tmp_path / "pacs").iterdir()), "the outputs reached the destination"
