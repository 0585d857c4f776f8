"""The receiver's DICOM upper layer (PS3.8): what a peer can cost before and after it associates.

pynetdicom starts an association thread for every TCP connection, counts it
against ``maximum_associations`` before any byte arrived, and reads a PDU of any
declared length. Here, on top of its threaded server:

* **An admission gate.** A new connection is held, off pynetdicom, in one
  selector thread until its whole A-ASSOCIATE-RQ PDU arrived (after the TLS
  handshake, when TLS is on). Only then does pynetdicom create the association,
  so connections that never associate take no association slot and no thread.
  A first PDU that is not an A-ASSOCIATE-RQ, or declares more than
  :data:`MAXIMUM_ASSOCIATE_RQ_LENGTH` bytes, is answered with an A-ABORT and
  never read; a connection without a complete request within the ACSE timeout
  is closed (the ARTIM timer's job, PS3.8 9.1.5); when more connections wait
  than ``max_pending``, the longest-waiting one is closed, so a flood of idle
  connections never keeps a real sender out.
* **A bounded PDU reader** for each association (:class:`BoundedDUL`): a PDU
  that declares more than the maximum length this node advertised is answered
  with an A-ABORT (the state machine's Evt19, "invalid PDU") and never
  allocated; a PDU's body must arrive within the network timeout.
  Each accepted PDU takes pynetdicom's own decoding path, so every event fires.

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
import selectors
import socket
import ssl
import struct
import textwrap
import threading
import time
import tokenize
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pynetdicom
from pynetdicom import evt
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationServer, AssociationSocket, RequestHandler, ThreadedAssociationServer

log = logging.getLogger(__name__)

# PS3.8 9.3.1: PDU type (1 byte), reserved (1), PDU-length (4, big endian).
_PDU_HEADER = struct.Struct(">BBL")
A_ASSOCIATE_RQ = 0x01
A_ABORT = 0x07
_PDU_TYPES = range(0x01, 0x08)

# An A-ASSOCIATE-RQ with 128 presentation contexts of 20 transfer syntaxes each and
# a 64 KiB user identity stays under 256 KiB; nothing longer is read.
MAXIMUM_ASSOCIATE_RQ_LENGTH = 256 * 1024
# What the acceptor advertises and accepts when the configuration says 0 ("unlimited"):
# dcmtk's largest PDU, what its storescu sends to an acceptor without a limit.
DEFAULT_MAXIMUM_PDU_SIZE = 131072
DEFAULT_MAX_PENDING = 64
_DROP_REASONS = {
    "aborted": "sent an invalid first PDU (A-ABORT)",
    "timeout": "without an A-ASSOCIATE-RQ within the ACSE timeout",
    "evicted": "closed to make room for newer ones",
    "closed": "closed by the peer",
}

# PS3.8 Table 9-26, A-ABORT from the service provider (source 2): reason/diagnostic.
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER_VALUE = 0x06


def abort_pdu(reason: int) -> bytes:
    """An encoded A-ABORT PDU from the service provider (PS3.8 9.3.8)."""
    pdu = A_ABORT_RQ()
    pdu.source = 0x02
    pdu.reason_diagnostic = reason
    return cast(bytes, pdu.encode())


# -- the admission gate ------------------------------------------------------------------
@dataclass(eq=False)
class _Pending:
    sock: socket.socket
    address: tuple[str, int]
    deadline: float
    handshaking: bool = False
    wants_write: bool = False
    received: bytearray = field(default_factory=bytearray)
    needed: int = _PDU_HEADER.size


class AssociationGate:
    """Holds new connections until their A-ASSOCIATE-RQ PDU arrived complete (PS3.8 9.3.2).

    ``on_request(sock, address, pdu)`` is called, in the gate's thread, with the
    blocking socket and the PDU read from it; the gate forgets the connection then.
    """

    def __init__(
        self,
        on_request: Callable[[socket.socket, tuple[str, int], bytes], None],
        *,
        timeout_s: float,
        max_pending: int = DEFAULT_MAX_PENDING,
        ssl_context: ssl.SSLContext | None = None,
        max_request_length: int = MAXIMUM_ASSOCIATE_RQ_LENGTH,
    ) -> None:
        self.on_request = on_request
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self.ssl_context = ssl_context
        self.max_request_length = max_request_length
        self._pending: OrderedDict[socket.socket, _Pending] = OrderedDict()
        self._admitted: list[tuple[socket.socket, tuple[str, int]]] = []
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="association-gate", daemon=True)
        self.dropped: dict[str, int] = dict.fromkeys(_DROP_REASONS, 0)
        self._reported: dict[str, int] = dict.fromkeys(_DROP_REASONS, 0)
        self._next_report = 0.0

    # -- called from other threads --------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def admit(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """Take a newly accepted connection (called by the server's accept loop)."""
        with self._lock:
            self._admitted.append((sock, address))
        self._wake()

    def stop(self) -> None:
        self._stopping = True
        self._wake()
        self._thread.join(timeout=5)
        with self._lock:
            admitted, self._admitted = self._admitted, []
        for sock, _address in admitted:
            _close(sock)
        for p in list(self._pending.values()):
            _close(p.sock)
        self._pending.clear()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already woken, or stopped

    # -- the gate's thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            timeout = None
            if self._pending:
                first = min(p.deadline for p in self._pending.values())
                timeout = max(0.0, first - time.monotonic())
            for key, _mask in self._selector.select(timeout):
                if key.fileobj is self._wake_r:
                    self._drain_wake()
                else:
                    self._step(cast(_Pending, key.data))
            self._take_admitted()
            self._expire()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _take_admitted(self) -> None:
        with self._lock:
            admitted, self._admitted = self._admitted, []
        for raw, address in admitted:
            while len(self._pending) >= self.max_pending:
                _sock, oldest = self._pending.popitem(last=False)
                self._drop(oldest, "evicted")
            try:
                raw.setblocking(False)
                sock = raw
                if self.ssl_context is not None:
                    sock = self.ssl_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            except (OSError, ValueError):
                _close(raw)
                continue
            p = _Pending(sock, address, time.monotonic() + self.timeout_s, handshaking=self.ssl_context is not None)
            self._pending[sock] = p
            self._selector.register(sock, selectors.EVENT_READ, p)
            if p.handshaking:
                self._step(p)  # the ClientHello may already be there

    def _expire(self) -> None:
        now = time.monotonic()
        for p in [p for p in self._pending.values() if p.deadline <= now]:
            self._drop(p, "timeout")

    def _step(self, p: _Pending) -> None:
        try:
            if p.handshaking and not self._handshake(p):
                return
            self._receive(p)
        except (OSError, ValueError):  # ssl.SSLError is an OSError
            self._drop(p, "closed")

    def _handshake(self, p: _Pending) -> bool:
        sock = cast(ssl.SSLSocket, p.sock)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want(p, write=False)
            return False
        except ssl.SSLWantWriteError:
            self._want(p, write=True)
            return False
        p.handshaking = False
        self._want(p, write=False)
        return True

    def _want(self, p: _Pending, *, write: bool) -> None:
        if p.wants_write != write:
            p.wants_write = write
            self._selector.modify(p.sock, selectors.EVENT_WRITE if write else selectors.EVENT_READ, p)

    def _receive(self, p: _Pending) -> None:
        while len(p.received) < p.needed:
            try:
                chunk = p.sock.recv(p.needed - len(p.received))
            except (BlockingIOError, ssl.SSLWantReadError):
                return
            if not chunk:
                self._drop(p, "closed")
                return
            p.received += chunk
            if len(p.received) == _PDU_HEADER.size and not self._check_header(p):
                return
        self._pending.pop(p.sock, None)
        self._selector.unregister(p.sock)
        p.sock.setblocking(True)
        try:
            self.on_request(p.sock, p.address, bytes(p.received))
        except Exception:
            log.error("could not start an association for %s:%s", *p.address[:2], exc_info=True)
            _close(p.sock)

    def _check_header(self, p: _Pending) -> bool:
        pdu_type, _reserved, length = _PDU_HEADER.unpack(p.received)
        reason: int | None = None
        if pdu_type == A_ABORT:
            self._drop(p, "closed")
            return False
        if pdu_type not in _PDU_TYPES:
            reason, what = ABORT_UNRECOGNIZED_PDU, f"unrecognised PDU type 0x{pdu_type:02X}"
        elif pdu_type != A_ASSOCIATE_RQ:
            reason, what = ABORT_UNEXPECTED_PDU, f"PDU type 0x{pdu_type:02X} before an A-ASSOCIATE-RQ"
        elif length > self.max_request_length:
            reason, what = ABORT_INVALID_PARAMETER_VALUE, f"A-ASSOCIATE-RQ of {length} bytes declared"
        if reason is not None:
            log.debug("connection from %s:%s aborted: %s", p.address[0], p.address[1], what)
            try:
                p.sock.send(abort_pdu(reason))
            except (OSError, ValueError):
                pass
            self._drop(p, "aborted")
            return False
        p.needed = _PDU_HEADER.size + length
        return True

    def _drop(self, p: _Pending, why: str) -> None:
        self._pending.pop(p.sock, None)
        try:
            self._selector.unregister(p.sock)
        except (KeyError, ValueError):
            pass
        _close(p.sock)
        self.dropped[why] += 1
        if why != "closed":
            self._report(p.address)

    def _report(self, address: tuple[str, int]) -> None:
        """One warning per 10 s at most: a flood of connections must not flood the log."""
        now = time.monotonic()
        if now < self._next_report:
            return
        self._next_report = now + 10.0
        new = {why: n - self._reported[why] for why, n in self.dropped.items() if n > self._reported[why]}
        self._reported = dict(self.dropped)
        log.warning(
            "connections closed before association (latest from %s): %s",
            address[0],
            ", ".join(f"{n} {_DROP_REASONS[why]}" for why, n in new.items() if why != "closed"),
        )


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


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
        header = bytearray(_PDU_HEADER.size)
        if not _recv_exactly(sock, memoryview(header), deadline):
            cast(Any, assoc_socket).close()  # queues Evt17
            return
        pdu_type, _reserved, length = _PDU_HEADER.unpack(header)
        if pdu_type not in _PDU_TYPES:
            log.warning("unrecognised PDU type 0x%02X received: A-ABORT", pdu_type)
            self.event_queue.put("Evt19")
            return
        if length > self.maximum_length:
            log.warning("PDU of %d bytes declared, at most %d accepted: A-ABORT", length, self.maximum_length)
            self.event_queue.put("Evt19")
            return
        pdu = bytearray(_PDU_HEADER.size + length)
        pdu[: _PDU_HEADER.size] = header
        if not _recv_exactly(sock, memoryview(pdu)[_PDU_HEADER.size :], deadline):
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
        bounded = cast(BoundedDUL, dul)
        bounded.maximum_length = assoc.acceptor.maximum_length or DEFAULT_MAXIMUM_PDU_SIZE
        bounded.read_timeout = self.ae.network_timeout or 60.0
        self.request.settimeout(bounded.read_timeout)  # no read or send waits longer
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        bounded.queue_pdu(bytearray(self.server.take_request_pdu(self.request)))
        assoc.start()


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
    "ThreadedAssociationServer.process_request_thread": (
        ThreadedAssociationServer.process_request_thread,
        "4c8b29598462e38bc9387ff66f2c7c7d761c63e57d939815a93d0321122a5431",
    ),
}


def pynetdicom_changes() -> list[str]:
    """Names of pinned pynetdicom functions whose code differs from the code this module was written for."""
    return [name for name, (func, digest) in PINNED_PYNETDICOM.items() if code_digest(func) != digest]
