"""Admission of new connections to the receiver, before pynetdicom sees them (PS3.8 9.3.2, 9.1.5).

One selector thread holds each new TCP connection (and runs the TLS handshake,
when TLS is on) until its whole A-ASSOCIATE-RQ PDU has arrived, then hands the
connection and the PDU on. A first PDU that is not an A-ASSOCIATE-RQ, or that
declares more than :data:`MAXIMUM_ASSOCIATE_RQ_LENGTH` bytes, is answered with an
A-ABORT and never read; a connection without a complete request within the
timeout (the ARTIM timer's job) is closed; when more connections wait than
``max_pending``, the longest-waiting one is closed. Waiting connections cost a
socket and at most one request's bytes each, no thread.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from pynetdicom.pdu import A_ABORT_RQ

log = logging.getLogger(__name__)

# PS3.8 9.3.1: PDU type (1 byte), reserved (1), PDU-length (4, big endian).
PDU_HEADER = struct.Struct(">BBL")
A_ASSOCIATE_RQ = 0x01
A_ABORT = 0x07
PDU_TYPES = range(0x01, 0x08)

# An A-ASSOCIATE-RQ with 128 presentation contexts of 20 transfer syntaxes each and
# a 64 KiB user identity stays under 256 KiB; nothing longer is read.
MAXIMUM_ASSOCIATE_RQ_LENGTH = 256 * 1024
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


@dataclass(eq=False)
class _Pending:
    sock: socket.socket
    address: tuple[str, int]
    deadline: float
    handshaking: bool = False
    wants_write: bool = False
    received: bytearray = field(default_factory=bytearray)
    needed: int = PDU_HEADER.size


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
            close_connection(sock)
        for p in list(self._pending.values()):
            close_connection(p.sock)
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
                close_connection(raw)
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
            if len(p.received) == PDU_HEADER.size and not self._check_header(p):
                return
        self._pending.pop(p.sock, None)
        self._selector.unregister(p.sock)
        p.sock.setblocking(True)
        try:
            self.on_request(p.sock, p.address, bytes(p.received))
        except Exception:
            log.error("could not start an association for %s:%s", *p.address[:2], exc_info=True)
            close_connection(p.sock)

    def _check_header(self, p: _Pending) -> bool:
        pdu_type, _reserved, length = PDU_HEADER.unpack(p.received)
        reason: int | None = None
        if pdu_type == A_ABORT:
            self._drop(p, "closed")
            return False
        if pdu_type not in PDU_TYPES:
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
        p.needed = PDU_HEADER.size + length
        return True

    def _drop(self, p: _Pending, why: str) -> None:
        self._pending.pop(p.sock, None)
        try:
            self._selector.unregister(p.sock)
        except (KeyError, ValueError):
            pass
        close_connection(p.sock)
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


def close_connection(sock: socket.socket) -> None:
    """Shut a connection down both ways and close it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
