"""Waking a job's consumers when it is queued, so that they need not wait for their next poll.

:func:`announce` is called inside the transaction that queues a job; the
consumers of that kind of job wait in :meth:`Wakeup.wait` instead of sleeping
for their poll interval, and try to claim as soon as a job was announced:

* PostgreSQL: ``NOTIFY`` on the channel ``pe_triage_<kind>`` (PostgreSQL
  delivers it when the transaction commits, never when it rolls back); each
  consumer holds one connection of its own that ``LISTEN``\\ s.
* SQLite: a named pipe beside the database file (``<database>-wake-<kind>``),
  which every consumer of that kind on the machine opens; one byte is written
  after the transaction commits.

Polling stays the fallback: a wake-up that cannot be sent or received (the pipe
missing or full, the listening connection lost) costs at most one poll interval,
and a spurious one costs one claim that finds nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
import time
from pathlib import Path
from typing import Any, Self

from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session

from pe_triage_node.db.models import JobKind

log = logging.getLogger(__name__)

_PENDING = "pe_triage_wake_pipes"  # Session.info key: pipes to write to once the transaction commits


def channel(kind: JobKind) -> str:
    """The PostgreSQL notification channel of ``kind``."""
    return f"pe_triage_{JobKind(kind).value}"


def pipe_path(engine: Engine, kind: JobKind) -> Path | None:
    """The named pipe of ``kind`` beside a SQLite database file; ``None`` for other databases and ``:memory:``."""
    url = engine.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database).absolute().with_name(f"{Path(url.database).name}-wake-{JobKind(kind).value}")


def announce(session: Session, kind: JobKind) -> None:
    """Wake the consumers of ``kind`` when the caller's transaction commits."""
    bind = session.get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    if engine.dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": channel(kind)})
        return
    path = pipe_path(engine, kind)
    if path is None:
        return
    pending: set[Path] | None = session.info.get(_PENDING)
    if pending is None:
        pending = session.info[_PENDING] = set()
        event.listen(session, "after_commit", _after_commit)
    pending.add(path)


def _after_commit(session: Session) -> None:
    pending: set[Path] = session.info.get(_PENDING, set())
    while pending:
        poke(pending.pop())


def poke(path: Path) -> bool:
    """Write one byte to the pipe ``path`` without blocking; ``False`` when nobody listens (no pipe, no reader)
    or the pipe is full (its readers have a wake-up waiting already)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENOENT: no consumer made it yet; ENXIO: none has it open
        return False
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            log.warning("%s is not a named pipe: job wake-ups are off, consumers poll", path.name)
            return False
        os.write(fd, b"\0")
        return True
    except OSError as exc:
        if exc.errno != errno.EAGAIN:
            log.debug("wake-up pipe %s: %s", path.name, exc)
        return False
    finally:
        os.close(fd)


class Wakeup:
    """What a consumer of ``kind`` waits on between polls (:func:`~.lease.run_until_stopped`).

    ``wait(timeout_s)`` returns ``True`` as soon as a job of ``kind`` was
    announced (or one was announced since the last wait), ``False`` after
    ``timeout_s`` without one. Never raises: when the channel fails it
    sleeps out the timeout (polling) and tries to listen again on the next wait.
    """

    def __init__(self, engine: Engine, kind: JobKind) -> None:
        self.kind = JobKind(kind)
        self._engine = engine
        self._pg: Any = None  # the psycopg connection that LISTENs
        self._fds: tuple[int, int] | None = None  # the pipe: (read end, a write end that keeps it open)
        self._failed_at: float | None = None

    # -- the channel -----------------------------------------------------------
    def _open(self) -> bool:
        if self._pg is not None or self._fds is not None:
            return True
        if self._failed_at is not None and time.monotonic() - self._failed_at < 5.0:
            return False  # do not retry a broken channel on every poll
        try:
            if self._engine.dialect.name == "postgresql":
                raw = self._engine.raw_connection()
                conn: Any = raw.driver_connection
                if conn is None:
                    raise RuntimeError("no driver connection")
                raw.detach()  # our own connection: the pool replaces it, closing it closes it
                conn.autocommit = True
                conn.execute(f'LISTEN "{channel(self.kind)}"')
                self._pg = conn
                return True
            path = pipe_path(self._engine, self.kind)
            if path is None:
                return False
            try:
                os.mkfifo(path, 0o660)
            except FileExistsError:
                pass
            if not stat.S_ISFIFO(os.stat(path).st_mode):
                raise OSError(f"{path.name} is not a named pipe")
            read_end = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            self._fds = (read_end, os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            return True
        except Exception as exc:  # noqa: BLE001 - no wake-ups: the consumer polls
            log.warning("job wake-ups for %s jobs unavailable, polling instead: %s", self.kind.value, exc)
            self._failed_at = time.monotonic()
            self.close()
            return False

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a job of this kind to be announced; ``True`` when one was."""
        if not self._open():
            time.sleep(timeout_s)
            return False
        try:
            if self._pg is not None:
                woken = any(True for _ in self._pg.notifies(timeout=timeout_s, stop_after=1))
                if woken:  # drain what else arrived: one claim serves them all
                    for _ in self._pg.notifies(timeout=0):
                        pass
                return woken
            assert self._fds is not None
            ready, _, _ = select.select([self._fds[0]], [], [], timeout_s)
            if not ready:
                return False
            while True:
                try:
                    if not os.read(self._fds[0], 4096):
                        break
                except BlockingIOError:
                    break
            return True
        except Exception as exc:  # noqa: BLE001 - the connection broke: poll, listen again later
            log.warning("job wake-ups for %s jobs lost, polling until they are back: %s", self.kind.value, exc)
            self._failed_at = time.monotonic()
            self.close()
            return False

    def close(self) -> None:
        if self._pg is not None:
            try:
                self._pg.close()
            except Exception as exc:  # noqa: BLE001 - closing a broken connection
                log.debug("closing the LISTEN connection: %s", exc)
            self._pg = None
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None

    def __enter__(self) -> Self:
        # listen before the consumer's first claim: a job committed between that claim and a
        # later LISTEN would otherwise wait for the next poll
        self._open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
