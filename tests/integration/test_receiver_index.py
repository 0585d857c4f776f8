"""The receiver's rows on SQLite and PostgreSQL: the index writer, the group committer, crash repair."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from pe_triage_node.dicom.committer import IndexCommitter
from pe_triage_node.dicom.index import IndexedAttributes
from pe_triage_node.dicom.index_writer import (
    AssociationEnd,
    AssociationStart,
    IndexWriter,
    InstanceRecord,
    InstanceRetract,
    RejectionRecord,
    instance_known,
    utcnow,
)
from pe_triage_node.dicom.repair import reconcile_interrupted, repair_after_crash
from pe_triage_node.dicom.spool import Spool

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.33"
STUDY = "1.2.826.0.1.3680043.10.1.1"
SERIES = STUDY + ".2"


def _attrs(n: int, *, series: str = SERIES, sop_class: str = CT) -> IndexedAttributes:
    return IndexedAttributes(
        sop_class_uid=sop_class,
        sop_instance_uid=f"{series}.{n}",
        study_instance_uid=STUDY,
        series_instance_uid=series,
        modality="CT",
        patient_id="PID-7",
        patient_name="Doe^Jane",
        accession_number="ACC9",
        series_number=2,
        series_description="CTPA 1mm",
        slice_thickness=1.0,
        instance_number=n,
        image_position_patient=f"0\\0\\{n}",
        image_orientation_patient="1\\0\\0\\0\\1\\0",
    )


def _record(n: int, association: str = "a1", **kw: Any) -> InstanceRecord:
    a = _attrs(n, **kw)
    rel = Spool.relative_path(a.study_instance_uid, a.series_instance_uid, a.sop_instance_uid)
    return InstanceRecord(a, "1.2.840.10008.1.2.1", rel, 1000 + n, association, utcnow())


def _rows(engine: Engine, sql: str) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(sql)))


def test_index_writer_records_a_batch_and_keeps_the_first_copy(engine: Engine) -> None:
    writer = IndexWriter(engine.dialect.name)
    start = AssociationStart("a1", "SCANNER", "PETRIAGE", "127.0.0.1:4000", utcnow())
    with engine.begin() as conn:
        results = writer.write(conn, [start, _record(1), _record(2), _record(1), _record(1, series=SERIES + ".9", sop_class=SR)])
    assert results == [True, True, True, False, True]
    with engine.begin() as conn:  # a later batch: the series id is remembered, the duplicate still refused
        assert writer.write(conn, [_record(2), _record(3)]) == [False, True]
    study = _rows(engine, "SELECT study_instance_uid, patient_id, patient_name, accession_number FROM studies")
    assert [tuple(r) for r in study] == [(STUDY, "PID-7", "Doe^Jane", "ACC9")]
    series = {
        r.series_instance_uid: r
        for r in _rows(engine, "SELECT series_instance_uid, instance_count, state, state_reason, series_description, "
                               "slice_thickness, last_association_id, generation FROM series")
    }
    ct = series[SERIES]
    assert (ct.instance_count, ct.state, ct.state_reason, ct.series_description) == (3, "receiving", None, "CTPA 1mm")
    assert (ct.slice_thickness, ct.last_association_id, ct.generation) == (1.0, "a1", 0)
    sr = series[SERIES + ".9"]
    assert (sr.instance_count, sr.state) == (1, "ignored") and SR in sr.state_reason
    instances = _rows(engine, f"SELECT instance_number, image_position_patient, size_bytes, spool_path FROM instances "
                              f"WHERE sop_instance_uid = '{SERIES}.2'")
    assert [tuple(r) for r in instances] == [(2, "0\\0\\2", 1002, f"{STUDY}/{SERIES}/{SERIES}.2.dcm")]


def test_index_writer_ends_associations_retracts_and_rejects(engine: Engine) -> None:
    writer = IndexWriter(engine.dialect.name)
    now = utcnow()
    with engine.begin() as conn:
        writer.write(conn, [AssociationStart("a1", "SCANNER", "PETRIAGE", "127.0.0.1:4000", now), _record(1), _record(2)])
    rejection = RejectionRecord("undecodable instance: truncated", 0xC210, "SCANNER", STUDY, SERIES, SERIES + ".5")
    with engine.begin() as conn:
        results = writer.write(
            conn,
            [
                InstanceRetract(SERIES + ".1", "a1"),
                InstanceRetract(SERIES + ".1", "a1"),  # already gone
                InstanceRetract(SERIES + ".2", "another association"),  # not its row
                AssociationEnd("a1", "released", 1, now + dt.timedelta(seconds=5)),
                rejection,
            ],
        )
        assert instance_known(conn, SERIES + ".2") and not instance_known(conn, SERIES + ".1")
    assert results == [True, False, False, True, True]
    assert _rows(engine, "SELECT instance_count FROM series")[0][0] == 1
    assoc = _rows(engine, "SELECT outcome, instances_stored, released_at, receiver_pid FROM associations")[0]
    assert (assoc.outcome, assoc.instances_stored) == ("released", 1) and assoc.released_at is not None
    reasons = _rows(engine, "SELECT stage, status, calling_ae, sop_instance_uid, reason FROM rejections")
    assert [tuple(r) for r in reasons] == [("receive", 0xC210, "SCANNER", SERIES + ".5", rejection.reason)]


def test_committer_groups_concurrent_records_and_survives_a_failed_batch(engine: Engine) -> None:
    committer = IndexCommitter(engine)
    committer.start()
    try:
        start = AssociationStart("a1", "SCANNER", "PETRIAGE", "127.0.0.1:4000", utcnow())
        assert committer.submit(start).result(timeout=30) is True  # type: ignore[union-attr]
        futures: list[Future[bool]] = []
        lock = threading.Lock()

        def send(n: int) -> None:
            fut = committer.submit(_record(n))
            assert fut is not None
            with lock:
                futures.append(fut)

        threads = [threading.Thread(target=send, args=(n,)) for n in range(1, 21)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(f.result(timeout=30) for f in futures)
        duplicate = committer.submit(dataclasses.replace(start, calling_ae="OTHER"))  # same primary key
        assert duplicate is not None
        with pytest.raises(Exception):
            duplicate.result(timeout=30)
        assert committer.submit(_record(21)).result(timeout=30) is True  # type: ignore[union-attr]
        assert committer.instance_known(SERIES + ".21") and not committer.instance_known(SERIES + ".22")
    finally:
        committer.stop()
    assert _rows(engine, "SELECT instance_count FROM series")[0][0] == 21


def test_crash_repair_drops_rows_without_files_of_unfinished_associations(engine: Engine, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    writer = IndexWriter(engine.dialect.name)
    now = utcnow()
    kept, lost, done = _record(1, "cut"), _record(2, "cut"), _record(3, "finished")
    with engine.begin() as conn:
        writer.write(
            conn,
            [
                AssociationStart("cut", "SCANNER", "PETRIAGE", "127.0.0.1:1", now),
                AssociationStart("finished", "SCANNER", "PETRIAGE", "127.0.0.1:2", now),
                kept,
                lost,
                done,
                AssociationEnd("finished", "released", 1, now),
            ],
        )
    spool.write(kept.spool_path, (b"kept",))
    spool.write(done.spool_path, (b"done",))
    (spool.root / STUDY / SERIES / ".tmp-9-9-9").write_bytes(b"half")
    assert reconcile_interrupted(engine, spool) == 1
    assert {r[0] for r in _rows(engine, "SELECT sop_instance_uid FROM instances")} == {SERIES + ".1", SERIES + ".3"}
    assert _rows(engine, "SELECT instance_count FROM series")[0][0] == 2
    outcomes = {r.id: (r.outcome, r.instances_stored) for r in _rows(engine, "SELECT id, outcome, instances_stored FROM associations")}
    assert outcomes == {"cut": ("interrupted", 1), "finished": ("released", 1)}
    repair_after_crash(engine, spool)  # sweeps the temporary; nothing more to reconcile
    assert not list(spool.root.rglob(".tmp-*"))
    assert reconcile_interrupted(engine, spool) == 0
