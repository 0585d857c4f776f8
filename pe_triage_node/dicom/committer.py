"""The durable writer: one thread per process commits the receiver's rows in groups.

Every association thread that stored an instance waits for its row to be
committed before it answers 0x0000. :class:`IndexCommitter` takes all records
waiting at that moment and commits them in one transaction (group commit: one
fsync of the database for many instances). With several receiving processes
the supervisor runs the only committer; each receiving process talks to it
through a pipe (:class:`CommitterClient` there, :func:`serve_committer_connection`
here), so SQLite sees one writer.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from sqlalchemy import Connection, Engine

from pe_triage_node.dicom.index_writer import AssociationEnd, IndexWriter, Record, instance_known

log = logging.getLogger(__name__)

_BATCH_LIMIT = 256


class Committer(Protocol):
    """What the Storage SCP needs from a committer, in-process or across processes."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def submit(self, record: Record, wait: bool = True) -> Future[bool] | None: ...

    def instance_known(self, sop_instance_uid: str) -> bool: ...


class _DuplicateCheck:
    """Reads whether an instance row exists (the duplicate check, on this process's engine)."""

    engine: Engine

    def instance_known(self, sop_instance_uid: str) -> bool:
        with self.engine.connect() as conn:
            return instance_known(conn, sop_instance_uid)


class IndexCommitter(_DuplicateCheck, threading.Thread):
    """One writer thread per process: commits queued records in batches (group commit).

    Each :meth:`submit` returns a future resolved once the record's transaction has
    committed (``True`` for an instance newly inserted, ``False`` for a duplicate).
    """

    def __init__(self, engine: Engine) -> None:
        threading.Thread.__init__(self, name="index-committer", daemon=True)
        self.engine = engine
        self._queue: queue.SimpleQueue[tuple[Record, Future[bool] | None] | None] = queue.SimpleQueue()
        self._writer = IndexWriter(engine.dialect.name)
        self._conn: Connection | None = None

    def submit(self, record: Record, wait: bool = True) -> Future[bool] | None:
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
            while len(batch) < _BATCH_LIMIT:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            self._commit(batch)

    def _commit(self, batch: list[tuple[Record, Future[bool] | None]]) -> None:
        records = [rec for rec, _fut in batch]
        for attempt in (1, 2):
            try:
                conn = self._connection()
                with conn.begin():
                    results = self._writer.write(conn, records)
                break
            except Exception as exc:  # the waiting handlers turn it into a status
                self._writer.forget()
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

    def _connection(self) -> Connection:
        if self._conn is None:
            self._conn = self.engine.connect()
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()
                conn.close()
            except Exception:
                log.debug("closing a failed database connection", exc_info=True)


class CommitterClient(_DuplicateCheck):
    """A receiving process's side of the committer that runs in the supervising process.

    Same ``submit`` as :class:`IndexCommitter`; reads (duplicate checks) use the local engine.
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

    def submit(self, record: Record, wait: bool = True) -> Future[bool] | None:
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
        if isinstance(record, AssociationEnd):
            fut.add_done_callback(functools.partial(released, record.id))
