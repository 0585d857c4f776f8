"""SeriesAssembler on SQLite and PostgreSQL: completion, late instances, selection, concurrency.

Rows are inserted directly (what the receiver writes); time is passed as ``now``.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from pe_triage_node.config import AssemblySection, NodeConfig, SelectionSection
from pe_triage_node.db.models import (
    Association,
    Instance,
    Job,
    JobKind,
    Rejection,
    Series,
    SeriesState,
    Study,
)
from pe_triage_node.dicom.assembly import SeriesAssembler

CT = "1.2.840.10008.5.1.4.1.1.2"
DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
QUIET = 30.0


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def new_uid() -> str:
    return "2.25." + str(uuid.uuid4().int)


class Feed:
    """Writes the rows the receiver would write."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def association(self, *, started: float = 0.0) -> str:
        aid = uuid.uuid4().hex
        with Session(self.engine) as s, s.begin():
            s.add(Association(id=aid, calling_ae="SCANNER", called_ae="PETRIAGE", peer_address="127.0.0.1",
                              receiver_pid=1, started_at=at(started)))
        return aid

    def release(self, aid: str, when: float, outcome: str = "released") -> None:
        with Session(self.engine) as s, s.begin():
            s.execute(update(Association).where(Association.id == aid)
                      .values(released_at=at(when), outcome=outcome))

    def study(self, description: str = "CT ANGIO CHEST PE") -> int:
        with Session(self.engine) as s, s.begin():
            st = Study(study_instance_uid=new_uid(), study_description=description,
                       first_received_at=T0, last_received_at=T0)
            s.add(st)
            s.flush()
            return st.id

    def series(
        self,
        study_id: int,
        *,
        number: int,
        kernel: str = "B30f",
        thickness: float = 1.0,
        image_type: str = "ORIGINAL\\PRIMARY\\AXIAL",
        sop_class: str = CT,
        modality: str = "CT",
        state: SeriesState = SeriesState.receiving,
    ) -> tuple[int, str]:
        uid = new_uid()
        with Session(self.engine) as s, s.begin():
            se = Series(study_id=study_id, series_instance_uid=uid, modality=modality, sop_class_uid=sop_class,
                        series_number=number, series_description=f"CTA {thickness:g} {kernel}",
                        image_type=image_type, convolution_kernel=kernel, slice_thickness=thickness,
                        state=state, first_received_at=T0, last_received_at=T0, generation=0)
            s.add(se)
            s.flush()
            return se.id, uid

    def instances(self, series_id: int, zs: Iterable[float], aid: str | None, *, when: float = 0.0,
                  sop_class: str = CT) -> None:
        with Session(self.engine) as s, s.begin():
            zs = list(zs)
            for z in zs:
                uid = new_uid()
                s.add(Instance(series_id=series_id, sop_instance_uid=uid, sop_class_uid=sop_class,
                               transfer_syntax_uid="1.2.840.10008.1.2.1", spool_path=f"x/{uid}.dcm",
                               size_bytes=1000, image_position_patient=f"-100\\-100\\{z:g}",
                               image_orientation_patient="1\\0\\0\\0\\1\\0", association_id=aid,
                               received_at=at(when)))
            se = s.get(Series, series_id)
            if se is not None:  # what the receiver does on every instance
                se.instance_count += len(zs)
                se.last_received_at = at(when)


def cfg() -> NodeConfig:
    # Thick (5 and 8 mm) reconstructions take part in these tests: allow them.
    return NodeConfig(
        assembly=AssemblySection(quiet_period_s=QUIET, contiguity_factor=1.5),
        selection=SelectionSection(max_slice_thickness_mm=8.0),
    )


def series_row(engine: Engine, series_id: int) -> Series:
    with Session(engine) as s:
        se = s.get(Series, series_id)
        if se is None:
            raise LookupError(series_id)
        s.expunge(se)
        return se


def infer_jobs(engine: Engine, series_uid: str) -> list[Job]:
    with Session(engine) as s:
        jobs = list(s.scalars(select(Job).where(Job.series_instance_uid == series_uid, Job.kind == JobKind.infer)
                              .order_by(Job.id)))
        for j in jobs:
            s.expunge(j)
        return jobs


def rejections(engine: Engine, series_uid: str) -> list[str]:
    with Session(engine) as s:
        return list(s.scalars(select(Rejection.reason).where(Rejection.series_instance_uid == series_uid,
                                                             Rejection.stage == "selection")
                              .order_by(Rejection.id)))


def zs(n: int, spacing: float = 1.0, start: float = 0.0) -> list[float]:
    return [start + i * spacing for i in range(n)]


# -- completion ---------------------------------------------------------------


def test_contiguous_series_completes_on_release(engine: Engine) -> None:
    feed, asm = Feed(engine), SeriesAssembler(engine, cfg())
    sid, uid = feed.series(feed.study(), number=2)
    a = feed.association()
    feed.instances(sid, zs(40)[::-1], a, when=1)

    asm.on_association_released(a, now=at(2))  # not released yet: the call is early
    asm.sweep(now=at(3))
    assert series_row(engine, sid).state == SeriesState.receiving

    feed.release(a, 4)
    asm.on_association_released(a, now=at(4))
    se = series_row(engine, sid)
    assert se.state == SeriesState.selected and se.generation == 0
    assert (se.completion_reason, se.completed_instances) == ("released and contiguous", 40)
    jobs = infer_jobs(engine, uid)
    assert [j.dedupe_key for j in jobs] == [f"infer:{uid}:0"]
    payload = json.loads(jobs[0].payload)
    assert payload["instance_count"] == 40 and payload["generation"] == 0
    assert payload["series_instance_uid"] == uid and payload["study_instance_uid"]

    asm.on_association_released(a, now=at(5))  # idempotent
    asm.sweep(now=at(500))
    assert len(infer_jobs(engine, uid)) == 1


def test_series_with_a_gap_waits_for_the_quiet_period(engine: Engine) -> None:
    feed, asm = Feed(engine), SeriesAssembler(engine, cfg())
    sid, uid = feed.series(feed.study(), number=2)
    a = feed.association()
    feed.instances(sid, zs(20) + zs(20, start=30), a, when=1)  # 11 mm gap, median 1 mm
    feed.release(a, 2)
    asm.on_association_released(a, now=at(2))
    assert series_row(engine, sid).state == SeriesState.receiving

    asm.sweep(now=at(1 + QUIET - 1))
    assert series_row(engine, sid).state == SeriesState.receiving
    assert infer_jobs(engine, uid) == []

    asm.sweep(now=at(1 + QUIET + 0.5))
    se = series_row(engine, sid)
    assert se.state == SeriesState.selected
    assert (se.completion_reason, se.completed_instances) == ("quiet period 30 s", 40)


def test_open_association_without_release_completes_after_quiet_period(engine: Engine) -> None:
    """A receiver that died leaves released_at empty: the quiet period still completes."""
    feed, asm = Feed(engine), SeriesAssembler(engine, cfg())
    sid, _ = feed.series(feed.study(), number=2)
    a = feed.association()
    feed.instances(sid, zs(40), a, when=1)
    asm.sweep(now=at(10))
    assert series_row(engine, sid).state == SeriesState.receiving
    asm.sweep(now=at(40))
    assert series_row(engine, sid).state == SeriesState.selected


def test_aborted_association_is_picked_up_by_sweep(engine: Engine) -> None:
    feed, asm = Feed(engine), SeriesAssembler(engine, cfg())
    sid, _ = feed.series(feed.study(), number=2)
    a = feed.association()
    feed.instances(sid, zs(40), a, when=1)
    feed.release(a, 2, outcome="aborted")  # the receiver does not call back on abort
    asm.sweep(now=at(3))
    se = series_row(engine, sid)
    assert se.state == SeriesState.selected and (se.completion_reason or "").startswith("released and contiguous")


def test_series_split_across_two_associations(engine: Engine) -> None:
    feed, asm = Feed(engine), SeriesAssembler(engine, cfg())
    sid, uid = feed.series(feed.study(), number=2)
    a, b = feed.association(), feed.association()
    feed.instances(sid, zs(30, spacing=2.0), a, when=1)  # even slices: contiguous on their own
    feed.instances(sid, zs(30, spacing=2.0, start=1.0), b, when=1)  # odd slices

    feed.release(a, 2)
    asm.on_association_released(a, now=at(2))
    assert series_row(engine, sid).state == SeriesState.receiving  # b still open

    feed.release(b, 3)
    asm.on_association_released(b, now=at(3))
    se = series_row(engine, sid)
    assert se.state == SeriesState.selected and se.completed_instances == 60
    assert len(infer_jobs(engine, uid)) == 1


# -- late instances -------------------------------------------------------------


def test_late_instances_reopen_and_enqueue_a_new_generation(engine: Engine) -> None:
    feed, asm = Feed(engine), SeriesAssembler(engine, cfg())
    sid, uid = feed.series(feed.study(), number=2)
    a = feed.association()
    feed.instances(sid, zs(40), a, when=1)
    feed.release(a, 2)
    asm.on_association_released(a, now=at(2))
    assert series_row(engine, sid).state == SeriesState.selected

    # The rest of the series comes in a second association (consecutive split).
    b = feed.association(started=5)
    feed.instances(sid, zs(20, start=40), b, when=6)
    asm.sweep(now=at(7))  # b still open: re-opened, not yet complete
    se = series_row(engine, sid)
    assert se.state == SeriesState.receiving and se.generation == 1
    assert se.state_reason is not None and "20 instance(s) arrived after completion" in se.state_reason

    feed.release(b, 8)
    asm.on_association_released(b, now=at(8))
    se = series_row(engine, sid)
    assert se.state == SeriesState.selected and se.generation == 1
    jobs = infer_jobs(engine, uid)
    assert [j.dedupe_key for j in jobs] == [f"infer:{uid}:0", f"infer:{uid}:1"]
    assert json.loads(jobs[1].payload)["instance_count"] == 60

    # One more slice in an aborted association (no callback): the sweep finds it.
    c = feed.association(started=20)
    feed.instances(sid, [60.0], c, when=21)
    feed.release(c, 22, outcome="aborted")
    asm.sweep(now=at(23))
    se = series_row(engine, sid)
    assert se.state == SeriesState.selected and se.generation == 2
    assert [j.dedupe_key for j in infer_jobs(engine, uid)][-1] == f"infer:{uid}:2"


def test_late_instances_can_turn_a_rejected_series_into_the_selected_one(engine: Engine) -> None:
    feed, asm = Feed(engine), SeriesAssembler(engine, cfg())
    sid, uid = feed.series(feed.study(), number=2)
    a = feed.association()
    feed.instances(sid, zs(20), a, when=1)
    feed.release(a, 2)
    asm.on_association_released(a, now=at(2))
    assert series_row(engine, sid).state == SeriesState.rejected
    assert rejections(engine, uid) == ["not a CTPA: only 20 slices, at least 30 required"]

    b = feed.association(started=3)
    feed.instances(sid, zs(20, start=20), b, when=4)
    feed.release(b, 5)
    asm.on_association_released(b, now=at(5))
    se = series_row(engine, sid)
    assert se.state == SeriesState.selected and se.generation == 1
    assert [j.dedupe_key for j in infer_jobs(engine, uid)] == [f"infer:{uid}:1"]


# -- selection ------------------------------------------------------------------


def test_one_series_per_study_and_rejections_recorded(engine: Engine) -> None:
    feed, asm = Feed(engine), SeriesAssembler(engine, cfg())
    study = feed.study()
    soft, soft_uid = feed.series(study, number=3, kernel="B30f", thickness=1.0)
    sharp, sharp_uid = feed.series(study, number=4, kernel="B70f", thickness=1.0)
    thick, thick_uid = feed.series(study, number=5, kernel="B30f", thickness=5.0)
    scout, scout_uid = feed.series(study, number=1, image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    dose, dose_uid = feed.series(study, number=99, sop_class=DOSE_SR, modality="SR", state=SeriesState.ignored)
    a = feed.association()
    feed.instances(soft, zs(100), a, when=1)
    feed.instances(sharp, zs(100), a, when=1)
    feed.instances(thick, zs(20, spacing=5.0), a, when=1)
    feed.instances(scout, [0.0, 1.0], a, when=1)
    feed.instances(dose, [], a, when=1)
    feed.release(a, 2)
    asm.on_association_released(a, now=at(2))

    assert series_row(engine, soft).state == SeriesState.selected
    assert [len(infer_jobs(engine, u)) for u in (soft_uid, sharp_uid, thick_uid, scout_uid, dose_uid)] == [
        1, 0, 0, 0, 0
    ]
    assert rejections(engine, sharp_uid) == [
        "kernel B70f is a sharp/lung kernel; series 3 (B30f, 1 mm, 100 slices) chosen instead"
    ]
    assert rejections(engine, thick_uid) == ["not a CTPA: only 20 slices, at least 30 required"]
    assert len(rejections(engine, scout_uid)) == 1 and "ImageType lacks AXIAL" in rejections(engine, scout_uid)[0]
    for sid in (sharp, thick, scout):
        se = series_row(engine, sid)
        assert se.state == SeriesState.rejected and se.state_reason
    assert series_row(engine, dose).state == SeriesState.ignored
    assert len(rejections(engine, dose_uid)) == 1

    asm.sweep(now=at(300))  # nothing new: no duplicate rows
    assert len(rejections(engine, sharp_uid)) == 1 and len(rejections(engine, dose_uid)) == 1


def test_study_waits_for_receiving_series_then_supersedes_on_a_better_late_series(engine: Engine) -> None:
    feed, asm = Feed(engine), SeriesAssembler(engine, cfg())
    study = feed.study()
    thick, thick_uid = feed.series(study, number=2, thickness=5.0)
    sharp, sharp_uid = feed.series(study, number=3, kernel="B70f", thickness=1.0)
    a, b = feed.association(), feed.association()
    feed.instances(thick, zs(40, spacing=5.0), a, when=1)
    feed.instances(sharp, zs(200), b, when=1)
    feed.release(a, 2)
    asm.on_association_released(a, now=at(2))
    assert series_row(engine, thick).state == SeriesState.complete  # waits: series 3 still receiving
    assert infer_jobs(engine, thick_uid) == []

    feed.release(b, 3)
    asm.on_association_released(b, now=at(3))
    assert series_row(engine, sharp).state == SeriesState.selected
    assert rejections(engine, thick_uid)[0].startswith("thicker reconstruction (5 mm); series 3 (B70f")

    # A soft-tissue thin reconstruction arrives later: it wins, series 3 is superseded.
    soft, soft_uid = feed.series(study, number=4, kernel="B30f", thickness=1.0)
    c = feed.association(started=60)
    feed.instances(soft, zs(200), c, when=61)
    feed.release(c, 62)
    asm.on_association_released(c, now=at(62))
    assert series_row(engine, soft).state == SeriesState.selected
    assert len(infer_jobs(engine, soft_uid)) == 1
    sharp_row = series_row(engine, sharp)
    assert sharp_row.state == SeriesState.rejected and "superseded" in (sharp_row.state_reason or "")
    assert rejections(engine, sharp_uid)[-1].startswith("kernel B70f is a sharp/lung kernel; series 4 (B30f")
    assert rejections(engine, thick_uid)[-1].startswith("thicker reconstruction (5 mm); series 4 (B30f")


# -- concurrency ------------------------------------------------------------------


def _race(engine: Engine, calls: Sequence[tuple[str, object]], now: dt.datetime) -> list[BaseException]:
    barrier = threading.Barrier(len(calls))
    errors: list[BaseException] = []

    def run(kind: str, arg: object) -> None:
        asm = SeriesAssembler(engine, cfg())
        try:
            barrier.wait(timeout=10)
            if kind == "sweep":
                asm.sweep(now=now)
            else:
                asm.on_association_released(str(arg), now=now)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=c) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return errors


def test_concurrent_sweeps_and_release_calls_enqueue_once(engine: Engine) -> None:
    feed = Feed(engine)
    study = feed.study()
    soft, soft_uid = feed.series(study, number=2)
    sharp, sharp_uid = feed.series(study, number=3, kernel="B70f")
    a = feed.association()
    feed.instances(soft, zs(60), a, when=1)
    feed.instances(sharp, zs(60), a, when=1)
    feed.release(a, 2)
    errors = _race(engine, [("sweep", None)] * 3 + [("release", a)] * 2, at(3))
    assert errors == []
    assert series_row(engine, soft).state == SeriesState.selected
    assert len(infer_jobs(engine, soft_uid)) == 1
    assert len(rejections(engine, sharp_uid)) == 1

    # Late slices, then concurrent callers again: exactly one generation-1 job.
    b = feed.association(started=10)
    feed.instances(soft, zs(5, start=60), b, when=11)
    feed.release(b, 12)
    errors = _race(engine, [("sweep", None)] * 3 + [("release", b)] * 2, at(13))
    assert errors == []
    se = series_row(engine, soft)
    assert se.state == SeriesState.selected and se.generation == 1
    assert [j.dedupe_key for j in infer_jobs(engine, soft_uid)] == [f"infer:{soft_uid}:0", f"infer:{soft_uid}:1"]
    # The reason names the new winner (65 slices): one new row, no duplicates.
    reasons = rejections(engine, sharp_uid)
    assert len(reasons) == 2 and "65 slices" in reasons[-1]


REALDATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "realdata" / "lung-pet-ct-dx"


def test_real_headers_through_the_assembler(engine: Engine) -> None:
    """The two real studies, indexed as the receiver would: one series selected per study."""
    if not REALDATA.is_dir():
        pytest.skip(f"real series not available: {REALDATA.resolve()} is absent (only in the shared workspace)")
    asm = SeriesAssembler(engine, cfg())
    a = Feed(engine).association()
    expected = {"Lung_Dx-A0001": ("B", "kernel L is a sharp/lung kernel"),
                "Lung_Dx-A0002": ("B40f", "kernel B70f is a sharp/lung kernel")}
    study_uids: dict[str, str] = {}
    with Session(engine) as s, s.begin():
        for study_dir in sorted(p for p in REALDATA.glob("*/*") if p.is_dir()):
            study: Study | None = None
            for series_dir in sorted(p for p in study_dir.iterdir() if p.is_dir()):
                headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(series_dir.glob("*.dcm"))]
                h = headers[0]
                if study is None:
                    study = Study(study_instance_uid=h.StudyInstanceUID, study_description=h.get("StudyDescription"))
                    s.add(study)
                    study_uids[study_dir.parent.name] = h.StudyInstanceUID
                se = Series(study=study, series_instance_uid=h.SeriesInstanceUID, modality=h.Modality,
                            sop_class_uid=h.SOPClassUID, series_number=int(h.SeriesNumber),
                            series_description=h.get("SeriesDescription"), protocol_name=h.get("ProtocolName"),
                            image_type="\\".join(h.ImageType), convolution_kernel=str(h.ConvolutionKernel),
                            slice_thickness=float(h.SliceThickness), state=SeriesState.receiving,
                            instance_count=len(headers), generation=0,
                            first_received_at=at(1), last_received_at=at(1))
                s.add(se)
                for d in headers:
                    s.add(Instance(series=se, sop_instance_uid=d.SOPInstanceUID, sop_class_uid=d.SOPClassUID,
                                   transfer_syntax_uid=str(d.file_meta.TransferSyntaxUID), spool_path="x",
                                   size_bytes=1, instance_number=int(d.InstanceNumber),
                                   image_position_patient="\\".join(str(v) for v in d.ImagePositionPatient),
                                   image_orientation_patient="\\".join(str(v) for v in d.ImageOrientationPatient),
                                   slice_thickness=float(d.SliceThickness), association_id=a,
                                   received_at=at(1)))
    Feed(engine).release(a, 2)
    asm.on_association_released(a, now=at(2))
    for name, (kernel, reason) in expected.items():
        with Session(engine) as s:  # closed before the helpers open theirs (SQLite: one writer)
            rows = s.execute(select(Series.convolution_kernel, Series.state, Series.series_instance_uid)
                             .join(Study).where(Study.study_instance_uid == study_uids[name])).all()
        chosen = [r for r in rows if r.state == SeriesState.selected]
        assert [r.convolution_kernel for r in chosen] == [kernel], name
        (other,) = [r for r in rows if r.state == SeriesState.rejected]
        assert rejections(engine, other.series_instance_uid)[0].startswith(reason)
        assert len(infer_jobs(engine, chosen[0].series_instance_uid)) == 1


def test_a_study_of_only_ignored_series_gets_its_rejection_on_release(engine: Engine) -> None:
    feed, asm = Feed(engine), SeriesAssembler(engine, cfg())
    sid, uid = feed.series(feed.study(), number=99, sop_class=DOSE_SR, modality="SR", state=SeriesState.ignored)
    a = feed.association()
    feed.instances(sid, [0.0], a, when=1, sop_class=DOSE_SR)
    feed.release(a, 2)
    asm.on_association_released(a, now=at(2))
    asm.on_association_released(a, now=at(3))
    (reason,) = rejections(engine, uid)
    assert "X-Ray Radiation Dose SR Storage" in reason and "ignored" in reason
    assert series_row(engine, sid).state == SeriesState.ignored
