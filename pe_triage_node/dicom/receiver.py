"""The node's Storage SCP (PS3.4 Annex B) on pynetdicom: C-ECHO and C-STORE.

Each handler returns a status and never raises. Receive path of one C-STORE
request, in the association's thread:

1. take the dataset bytes exactly as received (no decoding of the whole dataset);
2. read only the indexed attributes (:mod:`pe_triage_node.dicom.index`), validate
   the UIDs and match them to the request; failure → 0xC210/0xA900 and a
   ``rejections`` row, nothing spooled;
3. duplicate check: file present *and* row present → 0x0000, the first copy kept;
4. File Meta (pynetdicom's) + bytes to the spool (temp file, fsync, rename, fsync
   dir); below ``min_free_mb`` or ENOSPC → 0xA700, nothing left behind;
5. the row goes to the process's committer (:mod:`pe_triage_node.dicom.committer`,
   group commit); only once both are durable, 0x0000.

Statuses (PS3.4 B.2.3): 0x0000 success (also for a duplicate), 0xA700 out of
resources (spool floor/full), 0xA900 dataset does not match the SOP class of
the request, 0xC210 cannot understand (undecodable/truncated/invalid UIDs),
0x0110 processing failure (database or unexpected I/O error). Non-CT storage
SOP classes are stored and indexed like CT, their series created ``ignored``.
Connections reach these handlers through :mod:`pe_triage_node.dicom.upper_layer`.
"""

from __future__ import annotations

import logging
import os
import ssl
import struct
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, cast

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
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import Engine

from pe_triage_node.config import NodeConfig
from pe_triage_node.dicom.committer import Committer, IndexCommitter
from pe_triage_node.dicom.index import IndexedAttributes, read_indexed_attributes
from pe_triage_node.dicom.index_writer import (
    AssociationEnd,
    AssociationStart,
    InstanceRecord,
    InstanceRetract,
    RejectionRecord,
    utcnow,
)
from pe_triage_node.dicom.spool import Spool
from pe_triage_node.dicom.upper_layer import BoundedAssociationServer
from pe_triage_node.errors import InputRejected, SpoolFull

log = logging.getLogger(__name__)

# PS3.4 B.2.3 C-STORE statuses.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_PROCESSING_FAILURE = 0x0110

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
_IMPLEMENTATION_CLASS_UID = str(PYNETDICOM_IMPLEMENTATION_UID).encode("ascii")
_IMPLEMENTATION_VERSION_NAME = str(PYNETDICOM_IMPLEMENTATION_VERSION).encode("ascii")
_COMMIT_TIMEOUT_S = 60.0


class _Refused(Exception):
    """An instance the SCP will not store: the status to answer and the reason to record."""

    def __init__(self, status: int, reason: str, attrs: IndexedAttributes | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.attrs = attrs


def identify(stream: bytes, transfer_syntax: str, request: Any) -> IndexedAttributes:
    """The indexed attributes of a C-STORE request's dataset, checked against the request.

    Raises :class:`_Refused` with 0xC210 (cannot understand) or 0xA900 (SOP class mismatch).
    """
    try:
        attrs = read_indexed_attributes(stream, transfer_syntax)
    except InputRejected as exc:
        raise _Refused(STATUS_CANNOT_UNDERSTAND, f"undecodable instance: {exc}") from exc
    if attrs.sop_instance_uid != str(request.AffectedSOPInstanceUID):
        raise _Refused(STATUS_CANNOT_UNDERSTAND, "SOPInstanceUID differs from the C-STORE request's", attrs)
    if attrs.sop_class_uid != str(request.AffectedSOPClassUID):
        raise _Refused(STATUS_SOP_CLASS_MISMATCH, "SOPClassUID differs from the C-STORE request's", attrs)
    return attrs


def part10_header(event: evt.Event, source_ae: str) -> bytes:
    """Preamble, "DICM" and File Meta Information (PS3.10 7.1) for a C-STORE request's dataset.

    The elements pynetdicom's ``event.file_meta`` holds, plus the Source AE, encoded
    here (explicit VR little endian, as pydicom writes them) instead of through a Dataset.
    """
    request = cast(C_STORE, event.request)
    elements = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", str(request.AffectedSOPClassUID).encode("ascii")),
            _meta_element(0x0003, b"UI", str(request.AffectedSOPInstanceUID).encode("ascii")),
            _meta_element(0x0010, b"UI", str(event.context.transfer_syntax).encode("ascii")),
            _meta_element(0x0012, b"UI", _IMPLEMENTATION_CLASS_UID),
            _meta_element(0x0013, b"SH", _IMPLEMENTATION_VERSION_NAME),
            _meta_element(0x0016, b"AE", source_ae.encode("ascii", "replace")),
        )
    )
    return _PREAMBLE + _meta_element(0x0000, b"UL", struct.pack("<L", len(elements))) + elements


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, padded to even length (UI and OB with NUL, text with a space)."""
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB") else b" "
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


@dataclass
class _AssociationState:
    id: str
    calling_ae: str
    called_ae: str
    peer: str
    stored: int = 0
    finished: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


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
        committer: Committer | None = None,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.on_association_released = on_association_released
        self.reuse_port = reuse_port
        rc = cfg.receiver
        self.spool = Spool(cfg.spool_dir, min_free_mb=rc.min_free_mb, fsync=cfg.spool.fsync)
        self.committer: Committer = committer if committer is not None else IndexCommitter(engine)
        # SQLite (one machine, reconciled at start-up): commit the row while the file syncs.
        self.overlap_commit = engine.dialect.name == "sqlite"
        self._states: dict[int, _AssociationState] = {}
        self._states_lock = threading.Lock()
        self._server: BoundedAssociationServer | None = None
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
    def start(self) -> BoundedAssociationServer:
        """Bind and start accepting in a background thread; returns the server."""
        _config.LOG_HANDLER_LEVEL = "none"  # pynetdicom's per-message debug text: built even when not logged
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
        server_class = type(
            "_Server", (BoundedAssociationServer,), {"reuse_port": self.reuse_port, "max_pending": rc.max_pending_connections}
        )
        server = cast(
            BoundedAssociationServer,
            self.ae.make_server(
                (rc.host, rc.port),
                evt_handlers=handlers,
                ssl_context=build_ssl_context(self.cfg),
                server_class=server_class,
            ),
        )
        self.ae._servers.append(server)  # what ae.shutdown() and server.shutdown() expect
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
            server.shutdown()  # stops accepting and drops connections still waiting to associate
            self._server = None
        deadline = threading.Event()
        waited = 0.0
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
            self.committer.submit(AssociationStart(st.id, st.calling_ae, st.called_ae, st.peer, utcnow()), wait=False)
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
            _wait(self.committer.submit(AssociationEnd(st.id, outcome, st.stored, utcnow())))
            log.info("association %s %s, %d instances stored", st.id, outcome, st.stored)
            if self.on_association_released is not None:  # released or aborted: assembly checks its series
                self.on_association_released(st.id)
        except Exception:
            log.error("could not record the end of an association", exc_info=True)

    # -- DIMSE handlers (return a status, never raise) ---------------------------------------
    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        try:
            return self._store(event, self._state(event.assoc))
        except Exception:
            log.error("C-STORE failed unexpectedly", exc_info=True)
            return STATUS_PROCESSING_FAILURE

    def _store(self, event: evt.Event, st: _AssociationState) -> int:
        stream = event.encoded_dataset(include_meta=False)
        ts = str(event.context.transfer_syntax)
        try:
            attrs = identify(stream, ts, event.request)
        except _Refused as refused:
            return self._refuse(st, refused)
        rel = Spool.relative_path(attrs.study_instance_uid, attrs.series_instance_uid, attrs.sop_instance_uid)
        if self.spool.exists(rel) and self.committer.instance_known(attrs.sop_instance_uid):
            log.info("duplicate instance %s acknowledged, first copy kept", attrs.sop_instance_uid)
            return STATUS_SUCCESS
        header = part10_header(event, st.calling_ae)
        record = InstanceRecord(attrs, ts, rel, len(header) + len(stream), st.id, utcnow())
        try:
            self.spool.check_space(record.size_bytes)
        except SpoolFull as exc:
            log.warning("instance %s refused: %s", attrs.sop_instance_uid, exc)
            return STATUS_OUT_OF_RESOURCES
        return self._make_durable(st, record, (header, stream))

    def _make_durable(self, st: _AssociationState, record: InstanceRecord, chunks: tuple[bytes, bytes]) -> int:
        """Write the file and commit its row; 0x0000 only once both are durable.

        On SQLite the row is committed while the file is written and synced. A crash
        between the two leaves a row without its file for an instance never
        acknowledged, which :mod:`pe_triage_node.dicom.repair` removes at start-up.
        """
        sop = record.attrs.sop_instance_uid
        early = self.committer.submit(record) if self.overlap_commit else None
        try:
            self.spool.write(record.spool_path, chunks, space_checked=True)
        except (SpoolFull, OSError) as exc:
            log.warning("spool write failed for %s: %s", sop, exc)
            if early is not None:
                self._retract(st, early, sop)
            return STATUS_OUT_OF_RESOURCES
        try:
            inserted = _wait(early if early is not None else self.committer.submit(record))
        except Exception:
            log.error("index commit failed for %s", sop, exc_info=True)
            if not self._known_quietly(sop):
                self.spool.remove(record.spool_path)
            return STATUS_PROCESSING_FAILURE
        if inserted:
            st.stored += 1
        return STATUS_SUCCESS

    def _retract(self, st: _AssociationState, committed: Future[bool], sop: str) -> None:
        """Remove the row committed ahead of a file write that then failed."""
        try:
            if committed.result(timeout=_COMMIT_TIMEOUT_S):
                _wait(self.committer.submit(InstanceRetract(sop, st.id)))
        except Exception:
            log.error("could not remove the row of %s after its write failed", sop, exc_info=True)

    def _known_quietly(self, sop_instance_uid: str) -> bool:
        try:
            return self.committer.instance_known(sop_instance_uid)
        except Exception:
            return False

    def _refuse(self, st: _AssociationState, refused: _Refused) -> int:
        log.warning("instance refused (status 0x%04X) from %s: %s", refused.status, st.calling_ae, refused.reason)
        a = refused.attrs
        self.committer.submit(
            RejectionRecord(
                reason=refused.reason,
                status=refused.status,
                calling_ae=st.calling_ae,
                study_uid=a.study_instance_uid if a else None,
                series_uid=a.series_instance_uid if a else None,
                sop_uid=a.sop_instance_uid if a else None,
            ),
            wait=False,
        )
        return refused.status


def _wait(fut: Future[bool] | None) -> bool:
    return fut.result(timeout=_COMMIT_TIMEOUT_S) if fut is not None else False


def _ae_text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip()[:16]
