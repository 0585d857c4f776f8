"""The node's Storage SCP (PS3.4 Annex B) on pynetdicom: C-ECHO and C-STORE.

Receive path of one C-STORE request, in the association's thread:

1. take the dataset bytes exactly as received (no decoding of the whole dataset);
2. read only the indexed attributes (:mod:`pe_triage_node.dicom.index`), validate
   the UIDs; failure → 0xC210 and a ``rejections`` row, nothing spooled;
3. duplicate check: file present *and* row present → 0x0000, the first copy kept;
4. write File Meta + bytes to the spool (temp file, fsync, rename, fsync dir);
   below ``min_free_mb`` or ENOSPC → 0xA700, nothing left behind;
5. hand the row to the process's committer thread, which commits the rows of
   all associations waiting at that moment in one transaction (group commit),
   and wait for it; only then answer 0x0000.

Statuses (PS3.4 B.2.3): 0x0000 success (also for a duplicate), 0xA700 out of
resources (spool floor/full), 0xA900 dataset does not match the SOP class of
the request, 0xC210 cannot understand (undecodable/truncated/invalid UIDs),
0x0110 processing failure (database or unexpected I/O error). Non-CT storage
SOP classes are stored and indexed like CT, their series created ``ignored``.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import queue
import re
import socket
import struct
import ssl
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, cast

from pydicom import config as pydicom_config
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import Engine, Table, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from pe_triage_node.config import NodeConfig
from pe_triage_node.db.models import Association, Instance, Rejection, Series, SeriesState, Study
from pe_triage_node.dicom import fastpath
from pe_triage_node.dicom.index import IndexedAttributes, read_indexed_attributes
from pe_triage_node.dicom.spool import Spool
from pe_triage_node.errors import InputRejected, SpoolFull

log = logging.getLogger(__name__)

# PS3.4 B.2.3 C-STORE statuses.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_PROCESSING_FAILURE = 0x0110

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
CT_SOP_CLASSES = frozenset({CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE})

# Accepted as sent and stored as received (decoded later, outside the receiver).
TRANSFER_SYNTAXES: list[str] = [
    # pynetdicom accepts, per context, the first of these the sender proposed: keep
    # what the scanner holds losslessly compressed, else plain little endian.
    JPEGLSLossless,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEG2000Lossless,
    RLELossless,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    # Lossy ones only when proposed alone (scouts, secondary captures never fail a send).
    JPEGLSNearLossless,
    JPEG2000,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    DeflatedExplicitVRLittleEndian,
]

_PREAMBLE = b"\x00" * 128 + b"DICM"
_STUDIES = cast(Table, Study.__table__)
_SERIES = cast(Table, Series.__table__)
_INSTANCES = cast(Table, Instance.__table__)
_ASSOCIATIONS = cast(Table, Association.__table__)
_REJECTIONS = cast(Table, Rejection.__table__)
_COMMIT_TIMEOUT_S = 60.0


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _even(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str) -> bytes:
    """Preamble, "DICM" and the File Meta Information (PS3.10 7.1), encoded directly (UIDs already validated)."""
    body = b"".join(
        (
            _element(2, 0x0001, b"OB", b"\x00\x01"),
            _element(2, 0x0002, b"UI", _even(sop_class_uid, b"\x00")),
            _element(2, 0x0003, b"UI", _even(sop_instance_uid, b"\x00")),
            _element(2, 0x0010, b"UI", _even(transfer_syntax_uid, b"\x00")),
            _element(2, 0x0012, b"UI", _even(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
            _element(2, 0x0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
            _element(2, 0x0016, b"AE", _even(source_ae, b" ")),
        )
    )
    return _PREAMBLE + _element(2, 0x0000, b"UL", struct.pack("<I", len(body))) + body


# -- records handed to the committer ---------------------------------------------
@dataclass(slots=True)
class _InstanceRecord:
    attrs: IndexedAttributes
    transfer_syntax_uid: str
    spool_path: str
    size_bytes: int
    association_id: str
    received_at: dt.datetime


@dataclass(slots=True)
class _AssociationStart:
    id: str
    calling_ae: str
    called_ae: str
    peer_address: str
    started_at: dt.datetime
    receiver_pid: int = field(default_factory=os.getpid)  # the receiving process, not the committer's


@dataclass(slots=True)
class _AssociationEnd:
    id: str
    outcome: str
    instances_stored: int
    ended_at: dt.datetime


@dataclass(slots=True)
class _RejectionRecord:
    reason: str
    status: int
    calling_ae: str | None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None


@dataclass(slots=True)
class _InstanceRetract:
    """Undo an instance row committed while its file write failed (overlapped commit only)."""

    sop_instance_uid: str
    association_id: str


_Record = _InstanceRecord | _AssociationStart | _AssociationEnd | _RejectionRecord | _InstanceRetract


class IndexCommitter(threading.Thread):
    """One writer thread per process: commits queued rows in batches (group commit).

    Each :meth:`submit` returns a future resolved once the row's transaction has
    committed (``True`` for an instance newly inserted, ``False`` for a duplicate).
    """

    def __init__(self, engine: Engine) -> None:
        super().__init__(name="index-committer", daemon=True)
        self.engine = engine
        self._queue: queue.SimpleQueue[tuple[_Record, Future[bool] | None] | None] = queue.SimpleQueue()
        self._postgres = engine.dialect.name == "postgresql"
        self._insert = pg_insert if self._postgres else sqlite_insert
        self._series_ids: dict[str, int] = {}
        self._raw: Any = None
        self._sql_insert_instance = self._sql(
            "INSERT INTO instances (series_id, sop_instance_uid, sop_class_uid, transfer_syntax_uid, spool_path, "
            "size_bytes, instance_number, image_position_patient, image_orientation_patient, slice_thickness, "
            "association_id, received_at) VALUES (:series_id, :sop_instance_uid, :sop_class_uid, "
            ":transfer_syntax_uid, :spool_path, :size_bytes, :instance_number, :image_position_patient, "
            ":image_orientation_patient, :slice_thickness, :association_id, :received_at) "
            "ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING id"
        )

    def submit(self, record: _Record, wait: bool = True) -> Future[bool] | None:
        fut: Future[bool] | None = Future() if wait else None
        self._queue.put((record, fut))
        return fut

    def stop(self) -> None:
        self._queue.put(None)
        self.join(timeout=30)
        self._drop_connection()

    def run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < 256:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            self._commit(batch)

    def _commit(self, batch: list[tuple[_Record, Future[bool] | None]]) -> None:
        for attempt in (1, 2):
            try:
                results = self._write(batch)
                break
            except Exception as exc:  # the handler turns it into a status
                self._series_ids.clear()
                self._drop_connection()
                if attempt == 2:
                    log.error("index commit failed for %d records", len(batch), exc_info=True)
                    for _rec, fut in batch:
                        if fut is not None:
                            fut.set_exception(exc)
                    return
        for (_rec, fut), result in zip(batch, results, strict=True):
            if fut is not None:
                fut.set_result(result)

    # The hot path runs plain SQL on the DB-API connection: SQLAlchemy's per-statement
    # construction and compilation cost more CPU than the database itself.
    def _connection(self) -> Any:
        if self._raw is None:
            self._raw = self.engine.raw_connection()
        return self._raw.driver_connection

    def _drop_connection(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None:
            try:
                raw.invalidate()
            except Exception:
                log.debug("closing a failed database connection", exc_info=True)

    def _sql(self, text_: str) -> str:
        """``:name`` parameters for sqlite3, ``%(name)s`` for psycopg."""
        if not self._postgres:
            return text_
        return re.sub(r":([a-z_]+)", r"%(\1)s", text_)

    def _at(self, value: dt.datetime) -> Any:
        # SQLAlchemy stores SQLite datetimes as naive ISO text (UTC here); PostgreSQL takes timestamptz.
        return value if self._postgres else value.strftime("%Y-%m-%d %H:%M:%S.%f")

    def _write(self, batch: list[tuple[_Record, Future[bool] | None]]) -> list[bool]:
        conn = self._connection()
        cur = conn.cursor()
        results: list[bool] = []
        counts: dict[int, int] = {}
        last_assoc: dict[int, tuple[str, dt.datetime]] = {}
        studies_seen: dict[str, int] = {}
        new_series: list[str] = []
        if not self._postgres:
            cur.execute("BEGIN IMMEDIATE")
        try:
            for rec, _fut in batch:
                if isinstance(rec, _InstanceRecord):
                    a = rec.attrs
                    series_id = self._series_ids.get(a.series_instance_uid)
                    if series_id is None:
                        study_id = studies_seen.get(a.study_instance_uid)
                        if study_id is None:
                            study_id = self._upsert_study(cur, a, rec.received_at)
                            studies_seen[a.study_instance_uid] = study_id
                        series_id = self._upsert_series(cur, a, study_id, rec)
                        new_series.append(a.series_instance_uid)
                        self._series_ids[a.series_instance_uid] = series_id
                    cur.execute(self._sql_insert_instance, {
                        "series_id": series_id,
                        "sop_instance_uid": a.sop_instance_uid,
                        "sop_class_uid": a.sop_class_uid,
                        "transfer_syntax_uid": rec.transfer_syntax_uid,
                        "spool_path": rec.spool_path,
                        "size_bytes": rec.size_bytes,
                        "instance_number": a.instance_number,
                        "image_position_patient": a.image_position_patient,
                        "image_orientation_patient": a.image_orientation_patient,
                        "slice_thickness": a.slice_thickness,
                        "association_id": rec.association_id,
                        "received_at": self._at(rec.received_at),
                    })
                    inserted = cur.fetchone() is not None
                    if inserted:
                        counts[series_id] = counts.get(series_id, 0) + 1
                    last_assoc[series_id] = (rec.association_id, rec.received_at)
                    results.append(inserted)
                elif isinstance(rec, _AssociationStart):
                    cur.execute(
                        self._sql(
                            "INSERT INTO associations (id, calling_ae, called_ae, peer_address, receiver_pid, "
                            "started_at, instances_stored) VALUES (:id, :calling_ae, :called_ae, :peer_address, "
                            ":receiver_pid, :started_at, 0)"
                        ),
                        {
                            "id": rec.id,
                            "calling_ae": rec.calling_ae,
                            "called_ae": rec.called_ae,
                            "peer_address": rec.peer_address,
                            "receiver_pid": rec.receiver_pid,
                            "started_at": self._at(rec.started_at),
                        },
                    )
                    results.append(True)
                elif isinstance(rec, _AssociationEnd):
                    cur.execute(
                        self._sql(
                            "UPDATE associations SET released_at = :at, outcome = :outcome, "
                            "instances_stored = :n WHERE id = :id"
                        ),
                        {"at": self._at(rec.ended_at), "outcome": rec.outcome, "n": rec.instances_stored, "id": rec.id},
                    )
                    results.append(True)
                elif isinstance(rec, _InstanceRetract):
                    cur.execute(
                        self._sql(
                            "DELETE FROM instances WHERE sop_instance_uid = :sop AND association_id = :assoc "
                            "RETURNING series_id"
                        ),
                        {"sop": rec.sop_instance_uid, "assoc": rec.association_id},
                    )
                    gone = cur.fetchone()
                    if gone is not None:
                        cur.execute(
                            self._sql("UPDATE series SET instance_count = instance_count - 1 WHERE id = :id"),
                            {"id": gone[0]},
                        )
                    results.append(gone is not None)
                else:
                    cur.execute(
                        self._sql(
                            "INSERT INTO rejections (stage, study_instance_uid, series_instance_uid, "
                            "sop_instance_uid, calling_ae, status, reason, created_at) VALUES ('receive', :study, "
                            ":series, :sop, :calling_ae, :status, :reason, :created_at)"
                        ),
                        {
                            "study": rec.study_uid,
                            "series": rec.series_uid,
                            "sop": rec.sop_uid,
                            "calling_ae": rec.calling_ae,
                            "status": rec.status,
                            "reason": rec.reason[:2000],
                            "created_at": self._at(utcnow()),
                        },
                    )
                    results.append(True)
            for series_id, (assoc_id, at) in last_assoc.items():
                cur.execute(
                    self._sql(
                        "UPDATE series SET instance_count = instance_count + :n, last_received_at = :at, "
                        "last_association_id = :assoc WHERE id = :id"
                    ),
                    {"n": counts.get(series_id, 0), "at": self._at(at), "assoc": assoc_id, "id": series_id},
                )
            if self._postgres:
                conn.commit()
            else:
                cur.execute("COMMIT")
        except BaseException:
            for uid in new_series:
                self._series_ids.pop(uid, None)
            try:
                if self._postgres:
                    conn.rollback()
                else:
                    cur.execute("ROLLBACK")
            except Exception:
                log.debug("rollback failed", exc_info=True)
            raise
        finally:
            cur.close()
        if len(self._series_ids) > 4096:
            self._series_ids.clear()
        return results

    def _upsert_study(self, cur: Any, a: IndexedAttributes, at: dt.datetime) -> int:
        cur.execute(
            self._sql(
                "INSERT INTO studies (study_instance_uid, patient_id, patient_name, patient_birth_date, "
                "patient_sex, patient_age, accession_number, study_description, study_date, study_time, "
                "referring_physician, first_received_at, last_received_at) VALUES (:uid, :patient_id, "
                ":patient_name, :patient_birth_date, :patient_sex, :patient_age, :accession_number, "
                ":study_description, :study_date, :study_time, :referring_physician, :at, :at) "
                "ON CONFLICT (study_instance_uid) DO UPDATE SET last_received_at = excluded.last_received_at "
                "RETURNING id"
            ),
            {
                "uid": a.study_instance_uid,
                "patient_id": a.patient_id,
                "patient_name": a.patient_name,
                "patient_birth_date": a.patient_birth_date,
                "patient_sex": a.patient_sex,
                "patient_age": a.patient_age,
                "accession_number": a.accession_number,
                "study_description": a.study_description,
                "study_date": a.study_date,
                "study_time": a.study_time,
                "referring_physician": a.referring_physician,
                "at": self._at(at),
            },
        )
        return int(cur.fetchone()[0])

    def _upsert_series(self, cur: Any, a: IndexedAttributes, study_id: int, rec: _InstanceRecord) -> int:
        state = SeriesState.receiving if a.sop_class_uid in CT_SOP_CLASSES else SeriesState.ignored
        cur.execute(
            self._sql(
                "INSERT INTO series (study_id, series_instance_uid, modality, sop_class_uid, series_number, "
                "series_description, protocol_name, image_type, convolution_kernel, slice_thickness, "
                "contrast_bolus_agent, state, state_reason, instance_count, first_received_at, last_received_at, "
                "last_association_id, generation) VALUES (:study_id, :uid, :modality, :sop_class_uid, "
                ":series_number, :series_description, :protocol_name, :image_type, :convolution_kernel, "
                ":slice_thickness, :contrast_bolus_agent, :state, :state_reason, 0, :at, :at, :assoc, 0) "
                "ON CONFLICT (series_instance_uid) DO UPDATE SET last_received_at = excluded.last_received_at "
                "RETURNING id"
            ),
            {
                "study_id": study_id,
                "uid": a.series_instance_uid,
                "modality": a.modality,
                "sop_class_uid": a.sop_class_uid,
                "series_number": a.series_number,
                "series_description": a.series_description,
                "protocol_name": a.protocol_name,
                "image_type": a.image_type,
                "convolution_kernel": a.convolution_kernel,
                "slice_thickness": a.slice_thickness,
                "contrast_bolus_agent": a.contrast_bolus_agent,
                "state": state.value,
                "state_reason": None if state is SeriesState.receiving else f"SOP class {a.sop_class_uid} is not a CT image",
                "at": self._at(rec.received_at),
                "assoc": rec.association_id,
            },
        )
        return int(cur.fetchone()[0])

    def instance_known(self, sop_instance_uid: str) -> bool:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(_INSTANCES.c.id).where(_INSTANCES.c.sop_instance_uid == sop_instance_uid)
            ).first()
        return row is not None

    def instance_known_quietly(self, sop_instance_uid: str) -> bool:
        try:
            return self.instance_known(sop_instance_uid)
        except Exception:
            return False


class CommitterClient:
    """A receiving process's side of a committer that runs in the supervising process.

    With several receiving processes one writer commits for all of them (group
    commit across processes, no SQLite lock contention). Same ``submit`` API as
    :class:`IndexCommitter`; reads (duplicate checks) use the local engine.
    """

    def __init__(self, conn: Any, engine: Engine) -> None:
        self.conn = conn
        self.engine = engine
        self._lock = threading.Lock()
        self._futures: dict[int, Future[bool]] = {}
        self._next = 0
        self._reader = threading.Thread(target=self._read, name="committer-client", daemon=True)

    def start(self) -> None:
        self._reader.start()

    def stop(self) -> None:
        try:
            with self._lock:
                self.conn.send(None)
        except (OSError, ValueError):
            pass

    def submit(self, record: _Record, wait: bool = True) -> Future[bool] | None:
        fut: Future[bool] | None = Future() if wait else None
        with self._lock:
            req_id = 0
            if fut is not None:
                self._next += 1
                req_id = self._next
                self._futures[req_id] = fut
            try:
                self.conn.send((req_id, record))
            except (OSError, ValueError) as exc:
                self._futures.pop(req_id, None)
                if fut is not None:
                    fut.set_exception(exc)
        return fut

    def _read(self) -> None:
        while True:
            try:
                req_id, ok, value = self.conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                fut = self._futures.pop(req_id, None)
            if fut is None:
                continue
            if ok:
                fut.set_result(bool(value))
            else:
                fut.set_exception(RuntimeError(str(value)))
        with self._lock:
            pending, self._futures = self._futures, {}
        for fut in pending.values():
            fut.set_exception(RuntimeError("committer connection closed"))

    def instance_known(self, sop_instance_uid: str) -> bool:
        return IndexCommitter.instance_known(self, sop_instance_uid)  # type: ignore[arg-type]

    def instance_known_quietly(self, sop_instance_uid: str) -> bool:
        try:
            return self.instance_known(sop_instance_uid)
        except Exception:
            return False


def serve_committer_connection(
    conn: Any, committer: IndexCommitter, on_released: Callable[[str], None] | None
) -> None:
    """Supervisor side: commit what one receiving process sends until it closes (runs in a thread)."""
    send_lock = threading.Lock()

    def reply(req_id: int, fut: Future[bool]) -> None:
        exc = fut.exception()
        try:
            with send_lock:
                conn.send((req_id, exc is None, fut.result() if exc is None else repr(exc)))
        except (OSError, ValueError):
            pass

    def released(association_id: str, fut: Future[bool]) -> None:
        if fut.exception() is None and on_released is not None:
            on_released(association_id)

    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):
            break
        if item is None:
            break
        req_id, record = item
        fut = committer.submit(record)
        if fut is None:
            continue
        if req_id:
            fut.add_done_callback(functools.partial(reply, req_id))
        if isinstance(record, _AssociationEnd):
            fut.add_done_callback(functools.partial(released, record.id))


def reconcile_interrupted(engine: Engine, spool: Spool) -> int:
    """Start-up repair after a crash: drop instance rows of unfinished associations whose file is missing.

    Such a row was committed while its file was still being written (overlapped
    commit) and was never acknowledged. Unfinished associations are then closed
    with outcome ``interrupted``. Call before any receiving process starts, on the
    node that owns the spool (SQLite deployments). Returns the rows removed.
    """
    removed = 0
    with engine.begin() as conn:
        open_ids = [r[0] for r in conn.execute(select(_ASSOCIATIONS.c.id).where(_ASSOCIATIONS.c.released_at.is_(None)))]
        for assoc_id in open_ids:
            rows = conn.execute(
                select(_INSTANCES.c.id, _INSTANCES.c.series_id, _INSTANCES.c.spool_path).where(
                    _INSTANCES.c.association_id == assoc_id
                )
            ).all()
            stored = 0
            for inst_id, series_id, spool_path in rows:
                if spool.exists(spool_path):
                    stored += 1
                    continue
                conn.execute(_INSTANCES.delete().where(_INSTANCES.c.id == inst_id))
                conn.execute(
                    update(_SERIES).where(_SERIES.c.id == series_id).values(instance_count=_SERIES.c.instance_count - 1)
                )
                removed += 1
            conn.execute(
                update(_ASSOCIATIONS)
                .where(_ASSOCIATIONS.c.id == assoc_id)
                .values(released_at=utcnow(), outcome="interrupted", instances_stored=stored)
            )
    if removed:
        log.warning("removed %d unacknowledged instance rows whose file was never completed", removed)
    return removed


# -- the SCP ---------------------------------------------------------------------
@dataclass
class _AssociationState:
    id: str
    calling_ae: str
    called_ae: str
    peer: str
    stored: int = 0
    outcome: str | None = None
    finished: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class _ReusePortServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with SO_REUSEPORT (several receiving processes) and big buffers."""

    reuse_port = False
    daemon_threads = True

    def server_bind(self) -> None:
        sock = cast(socket.socket, self.socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        if self.ae.network_timeout is not None:
            sock.settimeout(self.ae.network_timeout)
        sock.bind(self.server_address)
        self.server_address = sock.getsockname()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = cast(socket.socket, self.socket).accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True)
        return client, address


def build_ssl_context(cfg: NodeConfig) -> ssl.SSLContext | None:
    """The server TLS context (PS3.15 B.1), or ``None`` when TLS is off."""
    tls = cfg.receiver.tls
    if not tls.enabled or tls.certificate is None or tls.private_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.private_key))
    if tls.ca_certificates is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_certificates))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.verify_client else ssl.CERT_NONE
    return ctx


class StorageSCP:
    """One receiving process's Storage SCP: pynetdicom AE + spool + index committer."""

    def __init__(
        self,
        cfg: NodeConfig,
        engine: Engine,
        *,
        on_association_released: Callable[[str], None] | None = None,
        reuse_port: bool = False,
        committer: IndexCommitter | CommitterClient | None = None,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.on_association_released = on_association_released
        self.reuse_port = reuse_port
        rc = cfg.receiver
        self.spool = Spool(cfg.spool_dir, min_free_mb=rc.min_free_mb, fsync=cfg.spool.fsync)
        self.committer = committer if committer is not None else IndexCommitter(engine)
        # SQLite (one machine, reconciled at start-up): commit the row while the file syncs.
        self.overlap_commit = engine.dialect.name == "sqlite"
        self._states: dict[int, _AssociationState] = {}
        self._states_lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        rc = self.cfg.receiver
        ae = AE(ae_title=rc.ae_title)
        ae.maximum_associations = rc.max_associations
        ae.maximum_pdu_size = rc.maximum_pdu_size
        ae.network_timeout = rc.network_timeout_s
        ae.acse_timeout = rc.acse_timeout_s
        ae.dimse_timeout = rc.dimse_timeout_s
        ae.require_called_aet = rc.check_called_aet
        ae.require_calling_aet = list(rc.allowed_calling_aets)
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cast(str, cx.abstract_syntax), TRANSFER_SYNTAXES)
        return ae

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> ThreadedAssociationServer:
        """Bind and start accepting in a background thread; returns the server."""
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        fastpath.apply()
        self.committer.start()
        rc = self.cfg.receiver
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        server_class = type("_Server", (_ReusePortServer,), {"reuse_port": self.reuse_port})
        server = self.ae.make_server(
            (rc.host, rc.port),
            evt_handlers=handlers,
            ssl_context=build_ssl_context(self.cfg),
            server_class=server_class,
        )
        self.ae._servers.append(server)
        thread = threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True)
        thread.start()
        self._server = server
        log.info(
            "Storage SCP %s listening on %s:%d (pid %d, TLS %s)",
            rc.ae_title,
            rc.host,
            server.server_address[1],
            os.getpid(),
            "on" if rc.tls.enabled else "off",
        )
        return server

    @property
    def port(self) -> int:
        if self._server is None:
            return self.cfg.receiver.port
        return int(self._server.server_address[1])

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop accepting, let open associations finish (up to ``grace_s``), then abort the rest."""
        server = self._server
        if server is not None:
            server.shutdown()  # stops accepting; in-flight associations keep running
            self._server = None
        deadline = threading.Event()
        waited = 0.0
        # Established associations may finish; a bare TCP connection (a port probe) is not waited for.
        while any(a.is_established for a in self.ae.active_associations) and waited < grace_s:
            deadline.wait(0.1)
            waited += 0.1
        for assoc in self.ae.active_associations:
            assoc.abort()
        self.committer.stop()
        log.info("Storage SCP stopped (pid %d)", os.getpid())

    # -- association events ----------------------------------------------------------
    def _state(self, assoc: Any) -> _AssociationState:
        key = id(assoc)
        with self._states_lock:
            st = self._states.get(key)
            if st is None:
                st = _AssociationState(
                    id=uuid.uuid4().hex,
                    calling_ae=_ae_text(assoc.requestor.ae_title),
                    called_ae=_ae_text(assoc.acceptor.ae_title),
                    peer=f"{assoc.requestor.address}:{assoc.requestor.port}",
                )
                self._states[key] = st
            return st

    def _on_accepted(self, event: evt.Event) -> None:
        try:
            st = self._state(event.assoc)
            self.committer.submit(
                _AssociationStart(st.id, st.calling_ae, st.called_ae, st.peer, utcnow()), wait=False
            )
            log.info("association %s accepted from %s calling=%s", st.id, st.peer, st.calling_ae)
        except Exception:
            log.error("could not record an accepted association", exc_info=True)

    def _on_rejected(self, event: evt.Event) -> None:
        try:
            rq = event.assoc.requestor
            log.warning(
                "association rejected: peer=%s:%s calling=%s called=%s",
                rq.address,
                rq.port,
                _ae_text(rq.ae_title),
                _ae_text(getattr(rq.primitive, "called_ae_title", "?")),
            )
        except Exception:
            log.warning("association rejected (peer unknown)", exc_info=True)

    def _on_released(self, event: evt.Event) -> None:
        self._finish(event.assoc, "released")

    def _on_aborted(self, event: evt.Event) -> None:
        self._finish(event.assoc, "aborted")

    def _on_conn_close(self, event: evt.Event) -> None:
        # Normally EVT_RELEASED/EVT_ABORTED came (or come) first; this is the safety net.
        timer = threading.Timer(5.0, self._finish, (event.assoc, "aborted"))
        timer.daemon = True
        timer.start()

    def _finish(self, assoc: Any, outcome: str) -> None:
        try:
            with self._states_lock:
                st = self._states.get(id(assoc))
            if st is None:
                return
            with st.lock:
                if st.finished:
                    return
                st.finished = True
            with self._states_lock:
                self._states.pop(id(assoc), None)
            fut = self.committer.submit(_AssociationEnd(st.id, outcome, st.stored, utcnow()))
            if fut is not None:
                fut.result(timeout=_COMMIT_TIMEOUT_S)
            log.info("association %s %s, %d instances stored", st.id, outcome, st.stored)
            if self.on_association_released is not None:  # released or aborted: assembly checks its series
                self.on_association_released(st.id)
        except Exception:
            log.error("could not record the end of an association", exc_info=True)

    # -- DIMSE handlers (return a status, never raise) ---------------------------------------
    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        st: _AssociationState | None = None
        try:
            st = self._state(event.assoc)
            return self._store(event, st)
        except Exception:
            log.error("C-STORE failed unexpectedly", exc_info=True)
            return STATUS_PROCESSING_FAILURE

    def _store(self, event: evt.Event, st: _AssociationState) -> int:
        request = cast(Any, event.request)
        stream: bytes = request.DataSet.getvalue()
        ts = str(event.context.transfer_syntax)
        try:
            attrs = read_indexed_attributes(stream, ts)
        except InputRejected as exc:
            return self._reject(st, STATUS_CANNOT_UNDERSTAND, f"undecodable instance: {exc}", None)
        if attrs.sop_instance_uid != str(request.AffectedSOPInstanceUID):
            return self._reject(
                st, STATUS_CANNOT_UNDERSTAND, "SOPInstanceUID differs from the C-STORE request's", attrs
            )
        if attrs.sop_class_uid != str(request.AffectedSOPClassUID):
            return self._reject(
                st, STATUS_SOP_CLASS_MISMATCH, "SOPClassUID differs from the C-STORE request's", attrs
            )
        rel = Spool.relative_path(attrs.study_instance_uid, attrs.series_instance_uid, attrs.sop_instance_uid)
        if self.spool.exists(rel) and self.committer.instance_known(attrs.sop_instance_uid):
            log.info("duplicate instance %s acknowledged, first copy kept", attrs.sop_instance_uid)
            return STATUS_SUCCESS
        header = file_meta_bytes(attrs.sop_class_uid, attrs.sop_instance_uid, ts, st.calling_ae)
        size = len(header) + len(stream)
        try:
            self.spool.check_space(size)
        except SpoolFull as exc:
            log.warning("instance %s refused: %s", attrs.sop_instance_uid, exc)
            return STATUS_OUT_OF_RESOURCES
        record = _InstanceRecord(attrs, ts, rel, size, st.id, utcnow())
        if self.overlap_commit:
            return self._store_overlapped(st, attrs, rel, header, stream, record)
        try:
            self.spool.write(rel, (header, stream), space_checked=True)
        except (SpoolFull, OSError):
            log.warning("spool write failed for %s", attrs.sop_instance_uid, exc_info=True)
            return STATUS_OUT_OF_RESOURCES
        fut = self.committer.submit(record)
        try:
            inserted = fut.result(timeout=_COMMIT_TIMEOUT_S) if fut is not None else False
        except Exception:
            log.error("index commit failed for %s", attrs.sop_instance_uid, exc_info=True)
            if not self.committer.instance_known_quietly(attrs.sop_instance_uid):
                self.spool.remove(rel)
            return STATUS_PROCESSING_FAILURE
        if inserted:
            st.stored += 1
        return STATUS_SUCCESS

    def _store_overlapped(
        self,
        st: _AssociationState,
        attrs: IndexedAttributes,
        rel: str,
        header: bytes,
        stream: bytes,
        record: _InstanceRecord,
    ) -> int:
        """Commit the row while the file is written and synced; answer once both are durable.

        A crash between the two leaves a row without its file for an instance that was
        never acknowledged; :func:`reconcile_interrupted` removes such rows at start-up.
        """
        fut = self.committer.submit(record)
        write_error: BaseException | None = None
        try:
            self.spool.write(rel, (header, stream), space_checked=True)
        except (SpoolFull, OSError) as exc:
            write_error = exc
        try:
            inserted = fut.result(timeout=_COMMIT_TIMEOUT_S) if fut is not None else False
        except Exception:
            log.error("index commit failed for %s", attrs.sop_instance_uid, exc_info=True)
            if write_error is None and not self.committer.instance_known_quietly(attrs.sop_instance_uid):
                self.spool.remove(rel)
            return STATUS_PROCESSING_FAILURE
        if write_error is not None:
            log.warning("spool write failed for %s: %s", attrs.sop_instance_uid, write_error)
            if inserted:
                retract = self.committer.submit(_InstanceRetract(attrs.sop_instance_uid, st.id))
                if retract is not None:
                    retract.result(timeout=_COMMIT_TIMEOUT_S)
            return STATUS_OUT_OF_RESOURCES
        if inserted:
            st.stored += 1
        return STATUS_SUCCESS

    def _reject(self, st: _AssociationState, status: int, reason: str, attrs: IndexedAttributes | None) -> int:
        log.warning("instance refused (status 0x%04X) from %s: %s", status, st.calling_ae, reason)
        self.committer.submit(
            _RejectionRecord(
                reason=reason,
                status=status,
                calling_ae=st.calling_ae,
                study_uid=attrs.study_instance_uid if attrs else None,
                series_uid=attrs.series_instance_uid if attrs else None,
                sop_uid=attrs.sop_instance_uid if attrs else None,
            ),
            wait=False,
        )
        return status


def _ae_text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip()[:16]
