"""The receiver's DICOM upper layer (PS3.8) on pynetdicom's threaded server.

pynetdicom starts an association thread for every TCP connection, counts it
against ``maximum_associations`` before any byte arrived, and reads a PDU of any
declared length. Here:

* **Admission** (:mod:`pe_triage_node.dicom.association_gate`): pynetdicom only
  creates an association once the connection's whole A-ASSOCIATE-RQ has arrived,
  so connections that never associate take no association slot and no thread.
* **A bounded PDU reader** for each association (:class:`BoundedDUL`): a PDU
  that declares more than the maximum length this node advertised is answered
  with an A-ABORT (the state machine's Evt19, "invalid PDU") and never
  allocated; a PDU's body must arrive within the network timeout.
  Each accepted PDU takes pynetdicom's own decoding path, so every event fires.
* **Plain C-STORE responses encoded directly** (:mod:`pe_triage_node.dicom.store_response`).
* **Waiting instead of polling** (:func:`wait_for_work`): the association's two
  threads wait for data, for something to send or for a complete DIMSE message,
  where pynetdicom sleeps 1 ms and looks again (+9 % ingest on one association
  with two receiving processes, median of 8 interleaved runs).

pynetdicom internals this relies on are pinned in :data:`PINNED_PYNETDICOM`:
the server refuses to start when an installed release changed them, and a unit
test fails, so an upgrade is checked against this module before it runs.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import io
import logging
import os
import queue
import select
import socket
import ssl
import textwrap
import threading
import time
import tokenize
import weakref
from collections.abc import Callable
from typing import Any, cast

import pynetdicom
from pynetdicom import association as _association
from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import negotiate_as_acceptor
from pynetdicom.transport import AssociationServer, AssociationSocket, RequestHandler, ThreadedAssociationServer

from pe_triage_node.dicom.association_gate import DEFAULT_MAX_PENDING, PDU_HEADER, PDU_TYPES, AssociationGate
from pe_triage_node.dicom.store_response import StoreResponseDIMSE

log = logging.getLogger(__name__)

# What the acceptor advertises and accepts when the configuration says 0 ("unlimited"):
# dcmtk's largest PDU, what its storescu sends to an acceptor without a limit.
DEFAULT_MAXIMUM_PDU_SIZE = 131072

# -- one association's bounded reads ------------------------------------------------------
def _recv_exactly(sock: socket.socket, view: memoryview, deadline: float) -> bool:
    """Fill ``view`` from ``sock``; ``False`` on a closed connection, a timed-out read or past ``deadline``.

    Each read waits at most the socket's timeout (the network timeout), so a PDU
    arrives within ``deadline`` plus one network timeout, or not at all.
    """
    got, size = 0, len(view)
    while got < size:
        if time.monotonic() > deadline:
            return False
        try:
            n = sock.recv_into(view[got:], size - got)
        except OSError:  # socket.timeout is an OSError
            return False
        if n == 0:
            return False
        got += n
    return True


class BoundedDUL(DULServiceProvider):
    """pynetdicom's DUL service provider with a bounded ``_read_pdu_data`` (see the module docstring).

    Installed on each association the gate starts (``assoc.dul.__class__``): no
    state of its own but ``maximum_length`` and ``read_timeout``.
    """

    maximum_length: int = DEFAULT_MAXIMUM_PDU_SIZE
    read_timeout: float = 60.0

    def _read_pdu_data(self) -> None:
        """Read one PDU: refuse an over-long one (Evt19), close on a stall (Evt17), else decode it."""
        assoc_socket = self.socket
        sock = assoc_socket.socket if assoc_socket is not None else None
        if sock is None:
            self.event_queue.put("Evt17")
            return
        deadline = time.monotonic() + self.read_timeout
        header = bytearray(PDU_HEADER.size)
        if not _recv_exactly(sock, memoryview(header), deadline):
            cast(Any, assoc_socket).close()  # queues Evt17
            return
        pdu_type, _reserved, length = PDU_HEADER.unpack(header)
        if pdu_type not in PDU_TYPES:
            log.warning("unrecognised PDU type 0x%02X received: A-ABORT", pdu_type)
            self.event_queue.put("Evt19")
            return
        if length > self.maximum_length:
            log.warning("PDU of %d bytes declared, at most %d accepted: A-ABORT", length, self.maximum_length)
            self.event_queue.put("Evt19")
            return
        pdu = bytearray(PDU_HEADER.size + length)
        pdu[: PDU_HEADER.size] = header
        if not _recv_exactly(sock, memoryview(pdu)[PDU_HEADER.size :], deadline):
            log.warning("PDU of %d bytes not received within %.0f s: connection closed", length, self.read_timeout)
            cast(Any, assoc_socket).close()
            return
        self.queue_pdu(pdu)

    def queue_pdu(self, pdu: bytearray) -> None:
        """Decode a received PDU and queue its state machine event, as pynetdicom does after reading."""
        try:
            decoded, event = self._decode_pdu(pdu)
        except Exception:
            log.error("unable to decode the received PDU", exc_info=True)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(decoded)


class GatedRequestHandler(RequestHandler):
    """pynetdicom's request handler for a connection whose A-ASSOCIATE-RQ the gate already read."""

    server: BoundedAssociationServer

    def handle(self) -> None:
        assoc = self._create_association()
        dul = assoc.dul
        dul.__class__ = BoundedDUL
        assoc.dimse.__class__ = StoreResponseDIMSE
        bounded = cast(BoundedDUL, dul)
        bounded.maximum_length = assoc.acceptor.maximum_length or DEFAULT_MAXIMUM_PDU_SIZE
        bounded.read_timeout = self.ae.network_timeout or 60.0
        self.request.settimeout(bounded.read_timeout)  # no read or send waits longer
        wait_for_work(bounded, assoc)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        bounded.queue_pdu(bytearray(self.server.take_request_pdu(self.request)))
        assoc.start()


class SharedContexts(list):  # type: ignore[type-arg]
    """The server's presentation contexts, shared by its associations: pynetdicom deep-copies them for
    every association (10 ms of CPU for the node's 171 contexts of 12 transfer syntaxes), though the
    acceptor's negotiation only reads them and builds its results anew. A copy of the list suffices."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return list(self)


class BoundedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server behind an :class:`AssociationGate`; optionally SO_REUSEPORT."""

    reuse_port = False
    daemon_threads = True
    max_pending = DEFAULT_MAX_PENDING

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", GatedRequestHandler)
        self._request_pdus: dict[socket.socket, bytes] = {}
        self._pdus_lock = threading.Lock()
        super().__init__(*args, **kwargs)
        self.contexts = SharedContexts(self.contexts)
        problems = pynetdicom_changes()
        if problems:
            self.server_close()
            raise RuntimeError(
                f"pynetdicom {pynetdicom.__version__} changed what the receiver's upper layer relies on "
                f"({', '.join(problems)}): check pe_triage_node/dicom/upper_layer.py against it"
            )
        self.gate = AssociationGate(
            self._start_association,
            timeout_s=self.ae.acse_timeout or 30.0,
            max_pending=self.max_pending,
            ssl_context=self.ssl_context,
        )
        self.gate.start()

    def server_bind(self) -> None:
        sock = cast(socket.socket, self.socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.setblocking(False)  # accept() never waits: a connection reset before it is just skipped
        sock.bind(self.server_address)
        self.server_address = sock.getsockname()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = cast(socket.socket, self.socket).accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address  # TLS handshake: in the gate, never in the accept loop

    def process_request(self, request: Any, client_address: Any) -> None:
        self.gate.admit(request, client_address)

    def _start_association(self, sock: socket.socket, address: tuple[str, int], pdu: bytes) -> None:
        with self._pdus_lock:
            self._request_pdus[sock] = pdu
        super().process_request(sock, address)  # ThreadingMixIn: a thread runs the request handler

    def take_request_pdu(self, sock: socket.socket) -> bytes:
        with self._pdus_lock:
            return self._request_pdus.pop(sock)

    def shutdown(self) -> None:
        super().shutdown()
        self.gate.stop()


# -- waiting instead of polling ---------------------------------------------------------------
# pynetdicom's DUL thread sleeps 1 ms whenever nothing is queued and its association
# thread sleeps 1 ms between looks at the DIMSE queue: several sleeps on every C-STORE
# round trip and on every gap between the PDUs of a request. Here the DUL thread waits
# in select() on its socket and an eventfd that send_pdu()/kill_dul() signal, and the
# association thread waits on an event set when a DIMSE message is complete.
_IDLE_WAIT_S = 0.02


class _WaitingSocket(AssociationSocket):
    """``ready`` waits (at most 20 ms) for data or a wake-up while the DUL has nothing else to do."""

    wake_fd: int

    @property
    def ready(self) -> bool:
        sock = self.socket
        dul = self.assoc.dul
        if (
            sock is not None
            and dul.event_queue.empty()
            and dul.to_provider_queue.empty()
            and not (isinstance(sock, ssl.SSLSocket) and sock.pending())
        ):
            try:
                select.select([sock.fileno(), self.wake_fd], [], [], _IDLE_WAIT_S)
                os.eventfd_read(self.wake_fd)
            except (BlockingIOError, OSError, ValueError):
                pass  # not signalled, or the socket closed under us
        return cast(bool, AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]


class WakingDUL(BoundedDUL):
    """:class:`BoundedDUL` whose idle wait (:class:`_WaitingSocket`) ends when there is something to send."""

    wake_fd: int = -1

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        # pynetdicom waits for the thread in a loop of sleep(_run_loop_delay), 0 here: end its wait first.
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._wake()
        return super().stop_dul()

    def _wake(self) -> None:
        try:
            os.eventfd_write(self.wake_fd, 1)
        except OSError:
            pass


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """The DIMSE message queue: a put wakes the association thread."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self.wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.wake.set()


class _AssociationClock:
    """``time`` as pynetdicom.association sees it: a reactor tick ends early on a new DIMSE message.

    Only threads that carry a ``_pe_wake`` event (associations started by this
    module) wait differently; every other thread and every longer sleep is plain ``time``.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        wake: threading.Event | None = getattr(threading.current_thread(), "_pe_wake", None)
        if wake is None or seconds > 0.01:
            time.sleep(seconds)
        elif wake.wait(seconds):
            wake.clear()


def wait_for_work(dul: BoundedDUL, assoc: Any) -> None:
    """Make one association's two threads wait for work instead of polling every millisecond."""
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    weakref.finalize(dul, os.close, fd)
    dul.__class__ = WakingDUL
    cast(WakingDUL, dul).wake_fd = fd
    dul._run_loop_delay = 0  # the wait is in _WaitingSocket.ready
    sock = cast(AssociationSocket, dul.socket)
    sock.__class__ = _WaitingSocket
    cast(_WaitingSocket, sock).wake_fd = fd
    assoc._pe_wake = threading.Event()
    assoc.dimse.msg_queue = _WakingQueue(assoc._pe_wake)
    if not isinstance(_association.time, _AssociationClock):
        _association.time = _AssociationClock()  # type: ignore[assignment]


# -- pinned pynetdicom internals ---------------------------------------------------------------
def code_digest(func: Callable[..., Any]) -> str:
    """:func:`source_digest` of a function's source."""
    return source_digest(inspect.getsource(func))


def source_digest(source: str) -> str:
    """SHA-256 of code without its docstrings, comments and whitespace (stable across Python versions)."""
    text = textwrap.dedent(source)
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    cut: list[tuple[int, int]] = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                end_line, end_col = cast(int, first.end_lineno), cast(int, first.end_col_offset)
                cut.append((starts[first.lineno - 1] + first.col_offset, starts[end_line - 1] + end_col))
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            cut.append((starts[tok.start[0] - 1] + tok.start[1], starts[tok.end[0] - 1] + tok.end[1]))
    kept, pos = [], 0
    for begin, end in sorted(cut):
        kept.append(text[pos:begin])
        pos = max(pos, end)
    kept.append(text[pos:])
    code = "".join("".join(kept).split())
    return hashlib.sha256(code.encode()).hexdigest()


# What this module re-implements, overrides or calls in pynetdicom, with the digest of the
# 3.0.4 code it was written against. When one changes, read the new code, adapt this
# module, and record the new digest.
PINNED_PYNETDICOM: dict[str, tuple[Callable[..., Any], str]] = {
    "DULServiceProvider._read_pdu_data": (
        DULServiceProvider._read_pdu_data,
        "316236b800f519397f617b5795b89ac1547175ebd4e69dd90fd9a43447dd6747",
    ),
    "DULServiceProvider._decode_pdu": (
        DULServiceProvider._decode_pdu,
        "506be765bd56c529c741ff4b01e54d04420d9dd3c469fc97f62c22da31840f1c",
    ),
    "DULServiceProvider._is_transport_event": (
        DULServiceProvider._is_transport_event,
        "5bd726f56007f11700fadaf50f60c2822bf9189466618e97282882196e6e32a4",
    ),
    "DULServiceProvider.run_reactor": (
        DULServiceProvider.run_reactor,
        "6fbb4541bd07b79d8bf8d45b3ea1d2a0f479852c39209dc68c56ef820b47b0e5",
    ),
    "AssociationSocket.__init__": (
        AssociationSocket.__init__,
        "ad5029828db9252a9f7a6f647ca435a839c73b956502b6d46924175980485efc",
    ),
    "RequestHandler.handle": (
        RequestHandler.handle,
        "d1f08973257f175fcdbb055ea045951a802dfccbd7655a238cb40b59f88337c2",
    ),
    "RequestHandler._create_association": (
        RequestHandler._create_association,
        "0ef657aae5c49ac72031015628f94e42a91d9e3d2d1c806eea42135dc8027881",
    ),
    "negotiate_as_acceptor": (  # reads the acceptor's contexts only (SharedContexts)
        negotiate_as_acceptor,
        "cfd1917b68bb875243370e185f72cf1454ceba3956f292b00866a9704db36057",
    ),
    "AssociationServer.__init__": (
        AssociationServer.__init__,
        "9cb592ac3768051f0bd663f0d841c9f2bca494e8c1b9feccea6ab1811a36875f",
    ),
    "AssociationServer.get_request": (
        AssociationServer.get_request,
        "1303eb4ba7b56616d40cd29befdb08aca1a85246a98e79431fe34f56dded2dcc",
    ),
    "AssociationServer.server_bind": (
        AssociationServer.server_bind,
        "229170ad5682ab6583074b2be916e1eafbc3629aae4ab7fc877c6b7f6200eefa",
    ),
    "DULServiceProvider.send_pdu": (
        DULServiceProvider.send_pdu,
        "5b61a10deab8acb4a103b1141c56b9f1460933466ec97c3c461e3c151d137143",
    ),
    "DULServiceProvider.kill_dul": (
        DULServiceProvider.kill_dul,
        "9d2b86b38d23c9e8f8338884759434f417901deb523ac8b87e8f3c12947b6c96",
    ),
    "DULServiceProvider.stop_dul": (
        DULServiceProvider.stop_dul,
        "86c34bb55d99164df37139d4f9b6f331edb8794b027a7d83310e0338af4287d1",
    ),
    "AssociationSocket.ready": (
        cast(Any, AssociationSocket.ready).fget,
        "7c40db41ef0396dae003bd357c53b6064862284dc7db25346c214bcf87696a83",
    ),
    "Association._run_reactor": (
        _association.Association._run_reactor,
        "a3f4a8a6aefb2d8d09d1a54704a8cf4bb498f7bbb4e1190d7a0bb1d1a1669762",
    ),
    "DIMSEServiceProvider.receive_primitive": (
        DIMSEServiceProvider.receive_primitive,
        "ae370a5418e14046e0e2cd061456e42c28c20ad866eab5656d2be1367a186d0d",
    ),
    "DIMSEServiceProvider.get_msg": (
        DIMSEServiceProvider.get_msg,
        "16d9561f1ddd84a115a77490bab4bb940d689d40ea0e8cd7e996b7d6493ca3d5",
    ),
    "DIMSEServiceProvider.send_msg": (
        DIMSEServiceProvider.send_msg,
        "2f1434c6883af6fc83d61a7f0eafa575ec578ff3c80b86120738c9a070f6f3ce",
    ),
    "DIMSEMessage.primitive_to_message": (
        DIMSEMessage.primitive_to_message,
        "8b2da84d6f7630329a20ff1ef6ae55c2ed2c37fa57d13cfcb9b95500c925b8f8",
    ),
    "DIMSEMessage.encode_msg": (
        DIMSEMessage.encode_msg,
        "3ee166c9b6e3fa482bf1f68b03ee4a6a8b31b8526cdd6c4a2c7ba03a9f5ebe42",
    ),
    "ThreadedAssociationServer.process_request_thread": (
        ThreadedAssociationServer.process_request_thread,
        "4c8b29598462e38bc9387ff66f2c7c7d761c63e57d939815a93d0321122a5431",
    ),
}


def pynetdicom_changes() -> list[str]:
    """Names of pinned pynetdicom functions whose code differs from the code this module was written for."""
    return [name for name, (func, digest) in PINNED_PYNETDICOM.items() if code_digest(func) != digest]
