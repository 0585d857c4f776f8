"""Series assembly: decide when a received series is complete, then select per study.

The receiver only writes ``studies``/``series``/``instances``/``associations``
rows; this module owns every later series state change
(``receiving -> complete -> selected | rejected``, and back to ``receiving``).

Completion (a series in ``receiving``)
    A series is complete when **every association that carried one of its
    instances has been released or aborted** (``associations.released_at``
    set) **and** its slice positions are contiguous: Image Position (Patient)
    projected on the normal of Image Orientation (Patient) (PS3.3 C.7.6.2.1.1),
    sorted, with no gap larger than ``assembly.contiguity_factor`` x the median
    spacing. A single instance (e.g. one Enhanced CT object) is contiguous.
    Otherwise -- a gap, missing/mixed orientation, duplicate positions, or an
    association that never reports its release (a receiver that crashed) --
    the series completes ``assembly.quiet_period_s`` after its last instance
    arrived. Contiguity cannot see slices missing at either end; the
    late-instance rule below covers those.

Series split across several associations
    Parallel or consecutive associations may each carry part of a series. The
    series waits until all associations that carried it so far are released
    and the union of their slices is contiguous, else the quiet period. An
    association that starts after the others were released and carries more
    slices is a late arrival (next paragraph).

Instances that arrive after completion
    Nothing is ever dropped. When a series that is ``complete``, ``selected``
    or ``rejected`` has more instances than it had when it completed (the
    count is recorded in ``completed_instances``), it is re-opened: its
    ``generation`` is bumped and it goes back to ``receiving``. It then
    completes again by the same rule, the study is selected again, and if the
    series is chosen a new ``infer`` job is enqueued with dedupe key
    ``infer:<series uid>:<generation>``, so the new result replaces the old
    one. The job payload carries the generation; a worker that claims a job
    whose generation is not the series' current one, or whose series is no
    longer ``selected``, should skip it (the jobs table belongs to the queue;
    the assembler never edits jobs).

Several series per study (selection timing)
    A study is selected only when none of its series is still ``receiving``
    (so the thin reconstruction that is two seconds behind the thick one is
    not missed); the quiet period bounds that wait. Selection considers every
    completed series of the study (``complete``, ``selected``, and those
    ``rejected`` by selection) and chooses one with
    :func:`~pe_triage_node.dicom.selection.select_ctpa_series`. A series that
    completes later (a new reconstruction sent afterwards, or a re-opened one)
    triggers a new selection: if another series now wins, it is selected and
    gets its job, and the previous choice is rejected with the reason
    ("... chosen instead"; its already queued job is not cancelled, see
    above). A series rejected by a later stage (e.g. inference) is not a
    candidate again unless late instances re-open it. Series the receiver
    marked ``ignored`` are never candidates; each gets one selection
    rejection row unless it already has one.

Concurrency
    ``on_association_released`` and ``sweep`` may run in several processes at
    once. Every state change is a conditional ``UPDATE ... WHERE state=:s AND
    generation=:g`` checked by rowcount (completion also checks the instance
    count it decided on), each study's changes happen under a transaction-
    scoped advisory lock on PostgreSQL (SQLite's ``BEGIN IMMEDIATE`` serialises
    writers), and the job's dedupe key makes a second enqueue a no-op. On
    PostgreSQL row-lock waits inside these transactions are capped at 500 ms,
    so a lock-order conflict with a receiver batch aborts the assembler's
    transaction (retried on the next sweep), never the receiver's.
    Entry points never raise: errors are logged and the next sweep retries.
"""

from __future__ import annotations

import datetime as dt
import logging
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Update, case, func, select, text, update
from sqlalchemy.orm import Session

from pe_triage_node.config import NodeConfig
from pe_triage_node.db.models import (
    Association,
    Instance,
    JobKind,
    Rejection,
    Series,
    SeriesState,
    Study,
)
from pe_triage_node.db.session import is_postgres, read_only
from pe_triage_node.dicom.selection import (
    SeriesCandidate,
    SliceGeometry,
    check_series,
    select_ctpa_series,
    slice_geometry,
    split_values,
)
from pe_triage_node.queue import enqueue  # the only code that writes jobs

log = logging.getLogger(__name__)

# Namespace of the per-study advisory lock (pg_advisory_xact_lock(int, int)): "PE".
_STUDY_LOCK_NS = 0x5045
# Row-lock wait cap inside assembler transactions (PostgreSQL's deadlock_timeout defaults to 1 s).
_ROW_LOCK_TIMEOUT_MS = 500
# Associations looked at by sweep for late instances: open ones this young, released ones this recent.
_OPEN_ASSOCIATION_MAX_AGE = dt.timedelta(days=1)
_LATE_WINDOW_MIN = dt.timedelta(minutes=10)
_DONE_STATES = (SeriesState.complete, SeriesState.selected, SeriesState.rejected)


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite returns naive datetimes; the node stores UTC."""
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)


def _now(now: dt.datetime | None) -> dt.datetime:
    return _utc(now) or dt.datetime.now(dt.timezone.utc)


def _changed(s: Session, stmt: Update) -> int:
    """Rows a conditional UPDATE changed (0: another process got there first)."""
    result = cast(CursorResult[Any], s.execute(stmt.execution_options(synchronize_session=False)))
    return result.rowcount


@dataclass(frozen=True)
class _Slices:
    count: int
    geometry: SliceGeometry
    last_received_at: dt.datetime | None
    association_ids: frozenset[str]
    median_instance_thickness: float | None


class SeriesAssembler:
    """Completes received series and selects the CTPA series of each study.

    One instance per process; methods open their own short transactions on
    ``engine``. See the module docstring for the policy.
    """

    def __init__(self, engine: Engine, cfg: NodeConfig) -> None:
        self.engine = engine
        self.cfg = cfg

    # -- entry points ---------------------------------------------------

    def on_association_released(self, association_id: str, now: dt.datetime | None = None) -> None:
        """Check the series carried by an association that was just released or aborted.

        The receiver calls this after committing ``associations.released_at``.
        Never raises: a database error is logged and the next sweep retries.
        """
        when = _now(now)
        try:
            with Session(read_only(self.engine)) as s:
                series_ids = list(
                    s.scalars(
                        select(Instance.series_id)
                        .where(Instance.association_id == association_id)
                        .distinct()
                    )
                )
            studies = self._check_series(series_ids, when)
            self._select_studies(studies, when)
        except Exception:  # never into the receiver's release handler; the sweep retries
            log.warning("assembly after release failed association=%s; sweep retries",
                        association_id, exc_info=True)

    def sweep(self, now: dt.datetime | None = None) -> None:
        """One pass of the interval job: quiet periods, late instances, pending selections.

        One read-only transaction finds the work (no SQLite write lock); only
        series that may change get a write transaction.
        """
        when = _now(now)
        quiet = dt.timedelta(seconds=self.cfg.assembly.quiet_period_s)
        with Session(read_only(self.engine)) as s:
            open_assoc = case((Association.released_at.is_(None), Association.id))
            receiving = s.execute(
                select(
                    Series.id,
                    Series.last_received_at,
                    func.max(Instance.received_at),
                    func.count(func.distinct(open_assoc)),
                )
                .select_from(Series)
                .outerjoin(Instance, Instance.series_id == Series.id)
                .outerjoin(Association, Association.id == Instance.association_id)
                .where(Series.state == SeriesState.receiving)
                .group_by(Series.id, Series.last_received_at)
            ).all()
            due: list[int] = []
            for series_id, last_series, last_instance, open_count in receiving:
                stamps = [t for t in (_utc(last_series), _utc(last_instance)) if t is not None]
                if open_count == 0 or not stamps or when - max(stamps) >= quiet:
                    due.append(series_id)
            recent = self._recent_association_ids(s, when)
            if recent:
                carried = select(Instance.series_id).where(Instance.association_id.in_(recent)).distinct()
                rows = s.execute(
                    select(Series.id, Series.completed_instances, func.count(Instance.id))
                    .join(Instance, Instance.series_id == Series.id)
                    .where(Series.id.in_(carried), Series.state.in_(_DONE_STATES))
                    .group_by(Series.id, Series.completed_instances)
                ).all()
                due += [sid for sid, before, n in rows if before is not None and n > before]
            still_receiving = select(Series.study_id).where(Series.state == SeriesState.receiving)
            pending = set(
                s.scalars(
                    select(Series.study_id)
                    .where(Series.state == SeriesState.complete, Series.study_id.not_in(still_receiving))
                    .distinct()
                )
            )
        studies = self._check_series(due, when)
        self._select_studies(studies | pending, when)

    # -- completion -----------------------------------------------------

    def _check_series(self, series_ids: Iterable[int], now: dt.datetime) -> set[int]:
        """Re-open late series and complete finished ones; return the studies to select."""
        studies: set[int] = set()
        for series_id in dict.fromkeys(series_ids):
            try:
                study_id = self._check_one(series_id, now)
            except Exception:  # one bad series must not stop the others; the next sweep retries
                log.warning("assembly check failed series_id=%d", series_id, exc_info=True)
                continue
            if study_id is not None:
                studies.add(study_id)
        return studies

    def _check_one(self, series_id: int, now: dt.datetime) -> int | None:
        """One transaction for one series. Returns its study id when selection may be due."""
        with Session(self.engine) as s, s.begin():
            row = s.execute(
                select(Series.study_id).where(Series.id == series_id)
            ).one_or_none()
            if row is None:
                return None
            self._lock_study(s, row.study_id)
            series = s.get(Series, series_id, populate_existing=True)
            if series is None:
                return None
            if series.state == SeriesState.ignored:
                return series.study_id  # the study pass records its rejection once
            state, generation = series.state, series.generation
            uid = series.series_instance_uid

            if state in _DONE_STATES:
                before = series.completed_instances
                count = s.scalar(select(func.count(Instance.id)).where(Instance.series_id == series_id)) or 0
                if before is None or count <= before:
                    return series.study_id if state == SeriesState.complete else None
                reopened = _changed(
                    s,
                    update(Series)
                    .where(Series.id == series_id, Series.state == state, Series.generation == generation)
                    .values(
                        state=SeriesState.receiving,
                        generation=generation + 1,
                        completed_at=None,
                        completion_reason=None,
                        completed_instances=None,
                        state_reason=(
                            f"re-opened: {count - before} instance(s) arrived after completion "
                            f"(was {state.value}, generation {generation})"
                        ),
                    ),
                )
                if reopened != 1:
                    return None
                log.info("series re-opened series=%s generation=%d late_instances=%d was=%s",
                         uid, generation + 1, count - before, state.value)
                state, generation = SeriesState.receiving, generation + 1

            if state != SeriesState.receiving:
                return None
            slices = self._slices(s, series_id)
            decision = self._completion(s, slices, now)
            if decision is None:
                return None
            why, detail = decision
            done = _changed(
                s,
                update(Series)
                .where(
                    Series.id == series_id,
                    Series.state == SeriesState.receiving,
                    Series.generation == generation,
                    select(func.count(Instance.id))
                    .where(Instance.series_id == series_id)
                    .scalar_subquery()
                    == slices.count,
                )
                .values(
                    state=SeriesState.complete,
                    completed_at=now,
                    completion_reason=why,
                    completed_instances=slices.count,
                    state_reason=detail,
                ),
            )
            if done != 1:
                return None
            log.info("series complete series=%s generation=%d instances=%d reason=%s",
                     uid, generation, slices.count, why)
            return series.study_id

    def _completion(self, s: Session, slices: _Slices, now: dt.datetime) -> tuple[str, str] | None:
        """(reason, detail) when the series is complete now, else None."""
        factor = self.cfg.assembly.contiguity_factor
        open_count = 0
        if slices.association_ids:
            open_count = s.scalar(
                select(func.count(Association.id)).where(
                    Association.id.in_(slices.association_ids), Association.released_at.is_(None)
                )
            ) or 0
        contiguous = slices.geometry.is_contiguous(factor)
        if slices.count > 0 and open_count == 0 and contiguous:
            return "released and contiguous", "complete: every association released, slices contiguous"
        quiet = dt.timedelta(seconds=self.cfg.assembly.quiet_period_s)
        last = slices.last_received_at
        if last is not None and now - last < quiet:
            return None
        if open_count:
            why = f"{open_count} association(s) not released"
        elif slices.count == 0:
            why = "no instances"
        else:
            why = slices.geometry.describe_gap(factor) or "not judged contiguous"
        q = self.cfg.assembly.quiet_period_s
        return f"quiet period {q:g} s", f"complete after {q:g} s without new instances ({why})"

    def _slices(self, s: Session, series_id: int) -> _Slices:
        rows = s.execute(
            select(
                Instance.image_position_patient,
                Instance.image_orientation_patient,
                Instance.received_at,
                Instance.association_id,
                Instance.slice_thickness,
            ).where(Instance.series_id == series_id)
        ).all()
        last_series = s.scalar(select(Series.last_received_at).where(Series.id == series_id))
        times = [t for t in (_utc(r.received_at) for r in rows) if t is not None]
        if last_series is not None:
            times.append(_utc(last_series))  # type: ignore[arg-type]
        thick = [r.slice_thickness for r in rows if r.slice_thickness]
        return _Slices(
            count=len(rows),
            geometry=slice_geometry(
                [r.image_position_patient for r in rows], [r.image_orientation_patient for r in rows]
            ),
            last_received_at=max(times) if times else None,
            association_ids=frozenset(r.association_id for r in rows if r.association_id),
            median_instance_thickness=statistics.median(thick) if thick else None,
        )

    # -- selection --------------------------------------------------------

    def _select_studies(self, study_ids: Iterable[int], now: dt.datetime) -> None:
        for study_id in sorted(set(study_ids)):
            try:
                self._select_study(study_id, now)
            except Exception:
                log.warning("selection failed study_id=%d; sweep retries", study_id, exc_info=True)

    def _select_study(self, study_id: int, now: dt.datetime) -> None:
        """Choose the study's CTPA series once none of its series is still receiving."""
        with Session(self.engine) as s, s.begin():
            self._lock_study(s, study_id)
            study = s.get(Study, study_id, populate_existing=True)
            if study is None:
                return
            series = list(s.scalars(select(Series).where(Series.study_id == study_id).order_by(Series.id)))
            states = {se.state for se in series}
            if SeriesState.receiving in states:
                return  # selection waits until every series of the study is complete
            last_stage = self._last_rejection_stage(s, [se.series_instance_uid for se in series])
            for se in series:
                if se.state == SeriesState.ignored and se.series_instance_uid not in last_stage:
                    cand = self._candidate(s, se, study, ignored=True)
                    reason = check_series(cand, self.cfg.selection) or "recorded as ignored on receipt"
                    self._reject(s, se, cand, reason, now, record_only=True)
            if SeriesState.complete not in states:
                return  # nothing new since the last selection
            candidates: dict[str, tuple[Series, SeriesCandidate]] = {}
            for se in series:
                uid = se.series_instance_uid
                if se.state == SeriesState.ignored:
                    continue
                if se.state == SeriesState.rejected and last_stage.get(uid) != "selection":
                    continue  # rejected by a later stage (e.g. inference): not a candidate again
                candidates[uid] = (se, self._candidate(s, se, study, ignored=False))
            outcome = select_ctpa_series([c for _, c in candidates.values()], self.cfg.selection)
            for uid, reason in outcome.rejected.items():
                se, cand = candidates[uid]
                if se.state == SeriesState.rejected and se.state_reason == reason:
                    continue
                self._reject(s, se, cand, reason, now)
            if outcome.chosen is None:
                log.info("study has no CTPA series study=%s series=%d", study.study_instance_uid,
                         len(candidates))
                return
            se, cand = candidates[outcome.chosen.series_instance_uid]
            if se.state == SeriesState.selected:
                return
            chosen = _changed(
                s,
                update(Series)
                .where(Series.id == se.id, Series.state == se.state, Series.generation == se.generation)
                .values(
                    state=SeriesState.selected,
                    state_reason=f"selected as the study's CTPA series among {len(candidates)} series",
                ),
            )
            if chosen != 1:
                log.info("selection lost a race series=%s", se.series_instance_uid)
                return
            job = enqueue(
                s,
                JobKind.infer,
                study_instance_uid=study.study_instance_uid,
                series_instance_uid=se.series_instance_uid,
                payload={
                    "series_instance_uid": se.series_instance_uid,
                    "study_instance_uid": study.study_instance_uid,
                    "generation": se.generation,
                    "instance_count": cand.slice_count,
                },
                dedupe_key=f"infer:{se.series_instance_uid}:{se.generation}",
                max_attempts=self.cfg.queue.max_attempts,
            )
            log.info("series selected series=%s generation=%d job=%s", se.series_instance_uid,
                     se.generation, getattr(job, "id", None))

    def _reject(
        self,
        s: Session,
        se: Series,
        cand: SeriesCandidate,
        reason: str,
        now: dt.datetime,
        *,
        record_only: bool = False,
    ) -> None:
        """Record a selection rejection; unless ``record_only``, set the series ``rejected``."""
        if not record_only:
            if se.state == SeriesState.selected:
                reason = f"{reason} (this series was selected before and is superseded)"
            changed = _changed(
                s,
                update(Series)
                .where(Series.id == se.id, Series.state == se.state, Series.generation == se.generation)
                .values(state=SeriesState.rejected, state_reason=reason),
            )
            if changed != 1:
                return
        s.add(
            Rejection(
                stage="selection",
                study_instance_uid=cand.study_instance_uid or None,
                series_instance_uid=se.series_instance_uid,
                reason=reason,
                created_at=now,
            )
        )
        log.info("series not selected series=%s generation=%d", se.series_instance_uid, se.generation)

    def _candidate(self, s: Session, se: Series, study: Study, *, ignored: bool) -> SeriesCandidate:
        slices = self._slices(s, se.id)
        return SeriesCandidate(
            series_instance_uid=se.series_instance_uid,
            study_instance_uid=study.study_instance_uid,
            series_number=se.series_number,
            modality=se.modality,
            sop_class_uid=se.sop_class_uid,
            image_type=split_values(se.image_type),
            convolution_kernel=se.convolution_kernel,
            slice_thickness=se.slice_thickness or slices.median_instance_thickness,
            slice_spacing=slices.geometry.median_spacing,
            slice_count=slices.count,
            series_description=se.series_description,
            study_description=study.study_description,
            protocol_name=se.protocol_name,
            ignored=ignored,
        )

    # -- helpers ----------------------------------------------------------

    @staticmethod
    def _lock_study(s: Session, study_id: int) -> None:
        """Serialise assembler transactions of one study (PostgreSQL; SQLite already is).

        After the advisory lock, row-lock waits are capped below PostgreSQL's
        deadlock_timeout: should a receiver batch and this transaction ever lock
        series rows in opposite orders, the assembler is the one that gives up
        (and retries on the next sweep), never the receiver's insert.
        """
        if is_postgres(s.get_bind()):  # type: ignore[arg-type]
            s.execute(text("SELECT pg_advisory_xact_lock(:ns, :id)"), {"ns": _STUDY_LOCK_NS, "id": study_id})
            s.execute(text(f"SET LOCAL lock_timeout = '{_ROW_LOCK_TIMEOUT_MS}ms'"))

    @staticmethod
    def _last_rejection_stage(s: Session, uids: list[str]) -> dict[str, str]:
        if not uids:
            return {}
        rows = s.execute(
            select(Rejection.series_instance_uid, Rejection.stage)
            .where(Rejection.series_instance_uid.in_(uids))
            .order_by(Rejection.id)
        ).all()
        return {r.series_instance_uid: r.stage for r in rows}

    def _recent_association_ids(self, s: Session, now: dt.datetime) -> list[str]:
        window = max(_LATE_WINDOW_MIN, dt.timedelta(seconds=10 * self.cfg.assembly.quiet_period_s))
        return list(
            s.scalars(
                select(Association.id).where(
                    (Association.released_at >= now - window)
                    | (
                        Association.released_at.is_(None)
                        & (Association.started_at >= now - _OPEN_ASSOCIATION_MAX_AGE)
                    )
                )
            )
        )
