"""A leaner receive path for pynetdicom 3.0 (the receiving process only).

pynetdicom's two reactor threads poll: the DUL thread sleeps 1 ms whenever no
PDU or outgoing primitive is waiting, and the association thread sleeps 1 ms
between checks of its DIMSE queue. On a C-STORE stream that puts up to three
sleeps on every request/response round trip, and the socket is read 4 KiB at a
time. Measured here that is most of the gap to dcmtk's storescp. This module,
applied once per receiving process before any association starts:

* makes the DUL thread wait in ``select()`` on its socket and an eventfd that
  :meth:`DULServiceProvider.send_pdu` signals, instead of sleeping;
* lets the association thread wait on an event that the DIMSE provider sets
  when a complete message was decoded, instead of sleeping;
* reads each PDU with ``recv_into`` straight into one buffer, and hands the
  presentation data values of a P-DATA-TF PDU in Sta6 straight to the DIMSE
  provider (what the state machine's DT-2 action does, minus the PDU objects).

Behaviour (states, timeouts, statuses) is unchanged; only the waiting is.
Tested against pynetdicom 3.0.x; with another version the patches are not applied.
"""

from __future__ import annotations

import logging
import os
import select
import struct
import threading
import time as _time
from typing import Any

import pynetdicom
from pynetdicom import association as _association
from pynetdicom import dimse as _dimse
from pynetdicom import dul as _dul
from pynetdicom import transport as _transport
from pynetdicom.pdu_primitives import P_DATA as _P_DATA

log = logging.getLogger(__name__)

_PDU_HEADER = struct.Struct(">BBL")
_UINT4 = struct.Struct(">L")
_applied = False
_lock = threading.Lock()


class _AssociationClock:
    """``time`` for pynetdicom.association: its 1 ms reactor sleep wakes early on a new DIMSE message."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        thread = threading.current_thread()
        wake: threading.Event | None = getattr(thread, "_pe_wake", None)
        if wake is None or seconds > 0.01:
            _time.sleep(seconds)
            return
        if wake.wait(seconds):
            wake.clear()


class _DULClock:
    """``time`` for pynetdicom.dul: the reactor's idle sleep becomes a select() on socket + eventfd."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        thread = threading.current_thread()
        efd: int | None = getattr(thread, "_pe_eventfd", None)
        sock = getattr(getattr(thread, "socket", None), "socket", None)
        if efd is None or sock is None:
            _time.sleep(seconds)
            return
        try:
            ready, _w, _x = select.select([sock, efd], [], [], 0.02)
        except (OSError, ValueError):  # socket closed under us
            _time.sleep(seconds)
            return
        if efd in ready:
            try:
                os.eventfd_read(efd)
            except BlockingIOError:
                pass


def _recv(self: _transport.AssociationSocket, nr_bytes: int) -> bytearray:
    """Read exactly ``nr_bytes`` (fewer only when the peer closed), in as few syscalls as the kernel allows."""
    sock = self.socket
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    got = 0
    while got < nr_bytes:
        n = sock.recv_into(view[got:], nr_bytes - got)  # type: ignore[union-attr]
        if not n:
            del view
            return buf[:got]
        got += n
    del view
    return buf


def _read_pdu_data(self: Any) -> None:
    """pynetdicom's ``_read_pdu_data`` with a short cut for P-DATA-TF in Sta6.

    A P-DATA-TF PDU received while the association is established (and no other
    event is pending) goes straight to the DIMSE provider, exactly what the state
    machine's DT-2 action does, without building PDU/item objects or queueing
    Evt10. Everything else takes pynetdicom's own path.
    """
    sock = self.socket
    try:
        header = sock.recv(6)
    except (OSError, TimeoutError):
        log.debug("connection closed before the entire PDU was received", exc_info=True)
        self.event_queue.put("Evt17")
        return
    if len(header) != 6:
        self.event_queue.put("Evt17")
        return
    pdu_type, _reserved, pdu_length = _PDU_HEADER.unpack(header)
    if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
        log.error("unknown PDU type 0x%02X received", pdu_type)
        self.event_queue.put("Evt19")
        return
    try:
        body = sock.recv(pdu_length)
    except (OSError, TimeoutError):
        log.debug("connection closed before the entire PDU was received", exc_info=True)
        self.event_queue.put("Evt17")
        return
    if len(body) != pdu_length:
        self.event_queue.put("Evt17")
        return
    if pdu_type == 0x04 and self.state_machine.current_state == "Sta6" and self.event_queue.empty():
        pdvs = _split_pdvs(body)
        if pdvs is None:
            self.event_queue.put("Evt19")
            return
        primitive = _P_DATA()
        primitive.presentation_data_value_list = pdvs  # type: ignore[assignment]  # the setter wants [id, bytes] lists
        self.assoc.dimse.receive_primitive(primitive)
        return
    try:
        pdu, event = self._decode_pdu(header + body)
        self.event_queue.put(event)
    except Exception:
        log.error("unable to decode the received PDU", exc_info=True)
        self.event_queue.put("Evt19")
        return
    self._recv_pdu.put(pdu)


def _split_pdvs(body: bytearray) -> list[list[Any]] | None:
    """The presentation data values of a P-DATA-TF PDU (PS3.8 9.3.5.1); ``None`` if malformed."""
    view = memoryview(body)
    total = len(body)
    pdvs: list[list[Any]] = []
    offset = 0
    while offset < total:
        if offset + 6 > total:
            return None
        (item_length,) = _UINT4.unpack_from(body, offset)
        end = offset + 4 + item_length
        if item_length < 2 or end > total:
            return None
        pdvs.append([body[offset + 4], bytes(view[offset + 5 : end])])
        offset = end
    return pdvs or None


def apply() -> bool:
    """Install the patches (idempotent). Returns whether they are active."""
    global _applied
    with _lock:
        if _applied:
            return True
        if not pynetdicom.__version__.startswith("3.0") or not hasattr(os, "eventfd"):
            log.warning("pynetdicom %s: lean receive path not applied", pynetdicom.__version__)
            return False

        original_run_reactor = _dul.DULServiceProvider.run_reactor
        original_send_pdu = _dul.DULServiceProvider.send_pdu
        original_receive_primitive = _dimse.DIMSEServiceProvider.receive_primitive
        original_assoc_run = _association.Association.run_reactor

        def run_reactor(self: Any) -> None:
            self._pe_eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                original_run_reactor(self)
            finally:
                efd, self._pe_eventfd = self._pe_eventfd, None
                os.close(efd)

        def send_pdu(self: Any, primitive: Any) -> None:
            original_send_pdu(self, primitive)
            efd = getattr(self, "_pe_eventfd", None)
            if efd is not None:
                try:
                    os.eventfd_write(efd, 1)
                except OSError:
                    pass

        def receive_primitive(self: Any, primitive: Any) -> None:
            original_receive_primitive(self, primitive)
            wake = getattr(self.assoc, "_pe_wake", None)
            if wake is not None and self.msg_queue.qsize():
                wake.set()

        def assoc_run_reactor(self: Any) -> None:
            self._pe_wake = threading.Event()
            original_assoc_run(self)

        _dul.DULServiceProvider.run_reactor = run_reactor  # type: ignore[method-assign]
        _dul.DULServiceProvider.send_pdu = send_pdu  # type: ignore[method-assign]
        _dimse.DIMSEServiceProvider.receive_primitive = receive_primitive  # type: ignore[method-assign]
        _association.Association.run_reactor = assoc_run_reactor  # type: ignore[method-assign]
        _transport.AssociationSocket.recv = _recv  # type: ignore[method-assign]
        _dul.DULServiceProvider._read_pdu_data = _read_pdu_data  # type: ignore[method-assign]
        _dul.time = _DULClock()  # type: ignore[assignment]
        _association.time = _AssociationClock()  # type: ignore[assignment]
        _applied = True
        return True
