"""The receiver's rows: what it records, and the SQL that records it (no networking, no threads).

Records are small picklable values (they cross from a receiving process to the
supervisor's committer). :class:`IndexWriter` writes a batch of them in one
transaction with SQLAlchemy Core statements built once from the tables in
:mod:`pe_triage_node.db.models`; columns that carry an indexed attribute take it
from :class:`~pe_triage_node.dicom.index.IndexedAttributes` by name.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam, delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from pe_triage_node.db.models import Association, Instance, Rejection, Series, SeriesState, Study
from pe_triage_node.dicom.index import IndexedAttributes

STUDIES = cast(Table, Study.__table__)
SERIES = cast(Table, Series.__table__)
INSTANCES = cast(Table, Instance.__table__)
ASSOCIATIONS = cast(Table, Association.__table__)
REJECTIONS = cast(Table, Rejection.__table__)

CT_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"})  # CT, Enhanced CT
_ATTRIBUTE_NAMES = frozenset(f.name for f in dataclasses.fields(IndexedAttributes))
_REASON_LIMIT = 2000
_SERIES_CACHE_LIMIT = 4096


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# -- records -----------------------------------------------------------------------
@dataclasses.dataclass(slots=True, frozen=True)
class InstanceRecord:
    """One received instance, its file already (or being) written to the spool."""

    attrs: IndexedAttributes
    transfer_syntax_uid: str
    spool_path: str
    size_bytes: int
    association_id: str
    received_at: dt.datetime


@dataclasses.dataclass(slots=True, frozen=True)
class AssociationStart:
    id: str
    calling_ae: str
    called_ae: str
    peer_address: str
    started_at: dt.datetime
    receiver_pid: int = dataclasses.field(default_factory=os.getpid)  # the receiving process


@dataclasses.dataclass(slots=True, frozen=True)
class AssociationEnd:
    id: str
    outcome: str
    instances_stored: int
    ended_at: dt.datetime


@dataclasses.dataclass(slots=True, frozen=True)
class RejectionRecord:
    """An instance refused with a status; the reason is what a person reads."""

    reason: str
    status: int
    calling_ae: str | None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None


@dataclasses.dataclass(slots=True, frozen=True)
class InstanceRetract:
    """Undo an instance row committed while its file write failed (overlapped commit only)."""

    sop_instance_uid: str
    association_id: str


Record = InstanceRecord | AssociationStart | AssociationEnd | RejectionRecord | InstanceRetract


def _attribute_columns(table: Table) -> list[str]:
    """The table's columns that hold an indexed attribute of the same name."""
    return [c.name for c in table.columns if c.name in _ATTRIBUTE_NAMES]


class IndexWriter:
    """Writes batches of records, one transaction each; remembers series ids between batches."""

    def __init__(self, dialect_name: str) -> None:
        insert = pg_insert if dialect_name == "postgresql" else sqlite_insert
        study = insert(STUDIES)
        self._upsert_study = study.on_conflict_do_update(
            index_elements=[STUDIES.c.study_instance_uid],
            set_={"last_received_at": study.excluded.last_received_at},
        ).returning(STUDIES.c.id)
        series = insert(SERIES)
        self._upsert_series = series.on_conflict_do_update(
            index_elements=[SERIES.c.series_instance_uid],
            set_={"last_received_at": series.excluded.last_received_at},
        ).returning(SERIES.c.id)
        self._insert_instance = (
            insert(INSTANCES)
            .on_conflict_do_nothing(index_elements=[INSTANCES.c.sop_instance_uid])
            .returning(INSTANCES.c.id)
        )
        self._count_received = (
            update(SERIES)
            .where(SERIES.c.id == bindparam("series"))
            .values(
                instance_count=SERIES.c.instance_count + bindparam("added"),
                last_received_at=bindparam("at"),
                last_association_id=bindparam("association"),
            )
        )
        self._count_retracted = (
            update(SERIES).where(SERIES.c.id == bindparam("series")).values(instance_count=SERIES.c.instance_count - 1)
        )
        self._retract_instance = (
            delete(INSTANCES)
            .where(
                INSTANCES.c.sop_instance_uid == bindparam("sop"),
                INSTANCES.c.association_id == bindparam("association"),
            )
            .returning(INSTANCES.c.series_id)
        )
        self._end_association = (
            update(ASSOCIATIONS)
            .where(ASSOCIATIONS.c.id == bindparam("association"))
            .values(
                released_at=bindparam("at"),
                outcome=bindparam("result"),
                instances_stored=bindparam("stored"),
            )
        )
        self._study_columns = _attribute_columns(STUDIES)
        self._series_columns = _attribute_columns(SERIES)
        self._instance_columns = _attribute_columns(INSTANCES)
        self._series_ids: dict[str, int] = {}

    def forget(self) -> None:
        """Drop remembered series ids (after a failed transaction)."""
        self._series_ids.clear()

    def write(self, conn: Connection, records: Sequence[Record]) -> list[bool]:
        """Write ``records`` in the connection's open transaction; one result per record.

        The result is ``True`` for an instance newly inserted (``False``: a duplicate,
        the first copy kept) and for a retract that removed its row; ``True`` otherwise.
        """
        results: list[bool] = []
        received: dict[int, tuple[int, str, dt.datetime]] = {}  # series id -> (added, association, at)
        new_series: list[str] = []
        try:
            for rec in records:
                if isinstance(rec, InstanceRecord):
                    series_id = self._series_id(conn, rec, new_series)
                    inserted = self._insert(conn, rec, series_id)
                    added = received.get(series_id, (0, "", rec.received_at))[0] + int(inserted)
                    received[series_id] = (added, rec.association_id, rec.received_at)
                    results.append(inserted)
                elif isinstance(rec, AssociationStart):
                    conn.execute(ASSOCIATIONS.insert(), dataclasses.asdict(rec) | {"instances_stored": 0})
                    results.append(True)
                elif isinstance(rec, AssociationEnd):
                    conn.execute(
                        self._end_association,
                        {"association": rec.id, "at": rec.ended_at, "result": rec.outcome, "stored": rec.instances_stored},
                    )
                    results.append(True)
                elif isinstance(rec, InstanceRetract):
                    results.append(self._retract(conn, rec))
                else:
                    conn.execute(REJECTIONS.insert(), _rejection_row(rec))
                    results.append(True)
            if received:
                conn.execute(
                    self._count_received,
                    [
                        {"series": sid, "added": added, "association": assoc, "at": at}
                        for sid, (added, assoc, at) in received.items()
                    ],
                )
        except BaseException:
            for uid in new_series:
                self._series_ids.pop(uid, None)
            raise
        if len(self._series_ids) > _SERIES_CACHE_LIMIT:
            self._series_ids.clear()
        return results

    def _series_id(self, conn: Connection, rec: InstanceRecord, new_series: list[str]) -> int:
        a = rec.attrs
        series_id = self._series_ids.get(a.series_instance_uid)
        if series_id is not None:
            return series_id
        study_row = {name: getattr(a, name) for name in self._study_columns}
        study_row |= {"first_received_at": rec.received_at, "last_received_at": rec.received_at}
        study_id = conn.execute(self._upsert_study, study_row).scalar_one()
        state = SeriesState.receiving if a.sop_class_uid in CT_SOP_CLASSES else SeriesState.ignored
        series_row = {name: getattr(a, name) for name in self._series_columns}
        series_row |= {
            "study_id": study_id,
            "state": state,
            "state_reason": None if state is SeriesState.receiving else f"SOP class {a.sop_class_uid} is not a CT image",
            "instance_count": 0,
            "generation": 0,
            "first_received_at": rec.received_at,
            "last_received_at": rec.received_at,
            "last_association_id": rec.association_id,
        }
        series_id = int(conn.execute(self._upsert_series, series_row).scalar_one())
        self._series_ids[a.series_instance_uid] = series_id
        new_series.append(a.series_instance_uid)
        return series_id

    def _insert(self, conn: Connection, rec: InstanceRecord, series_id: int) -> bool:
        row: dict[str, Any] = {name: getattr(rec.attrs, name) for name in self._instance_columns}
        row |= {
            "series_id": series_id,
            "transfer_syntax_uid": rec.transfer_syntax_uid,
            "spool_path": rec.spool_path,
            "size_bytes": rec.size_bytes,
            "association_id": rec.association_id,
            "received_at": rec.received_at,
        }
        return conn.execute(self._insert_instance, row).first() is not None

    def _retract(self, conn: Connection, rec: InstanceRetract) -> bool:
        gone = conn.execute(self._retract_instance, {"sop": rec.sop_instance_uid, "association": rec.association_id}).first()
        if gone is None:
            return False
        conn.execute(self._count_retracted, {"series": gone.series_id})
        return True


def _rejection_row(rec: RejectionRecord) -> dict[str, Any]:
    return {
        "stage": "receive",
        "study_instance_uid": rec.study_uid,
        "series_instance_uid": rec.series_uid,
        "sop_instance_uid": rec.sop_uid,
        "calling_ae": rec.calling_ae,
        "status": rec.status,
        "reason": rec.reason[:_REASON_LIMIT],
        "created_at": utcnow(),
    }


def instance_known(conn: Connection, sop_instance_uid: str) -> bool:
    """Whether an ``instances`` row exists for this SOP Instance UID."""
    query = select(INSTANCES.c.id).where(INSTANCES.c.sop_instance_uid == sop_instance_uid)
    return conn.execute(query).first() is not None
