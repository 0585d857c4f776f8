"""Holding a claimed job: the lease keeper and the consumer loop shared by the worker and the exporter.

A consumer claims a job (:func:`~pe_triage_node.queue.jobs.claim`), runs it
inside a :class:`LeaseKeeper` (a thread that renews the lease with
:func:`~pe_triage_node.queue.jobs.heartbeat`), and completes or fails it.
:func:`run_until_stopped` is the polling loop around that: run jobs back to
back while there are any, wait ``poll_interval_s`` when there are none (or
until a new job is announced, :mod:`.wakeup`), one job at a time (a loop,
never overlapping runs).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import Engine

from pe_triage_node.queue.jobs import heartbeat
from pe_triage_node.queue.wakeup import Wakeup

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """The job's lease was lost while it ran (a renewal was refused: the job was taken back or finished)."""


class LeaseKeeper:
    """Renews a job's lease every ``every_s`` from a background thread while the ``with`` block runs.

    ``lost`` is set when a renewal is refused (another worker may hold the job
    now); :meth:`check` raises :class:`LeaseLost` then. A database error does
    not stop the keeper: it is logged and the renewal retried next period (the
    lease is several periods long).
    """

    def __init__(self, engine: Engine, job_id: int, worker_id: str, every_s: float) -> None:
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._engine = engine
        self._job_id = job_id
        self._worker_id = worker_id
        self._every = every_s
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                if not heartbeat(self._engine, self._job_id, self._worker_id):
                    self.lost.set()
                    return
            except Exception:  # noqa: BLE001 - a database hiccup: retry next period
                log.warning("job %d heartbeat failed, retrying", self._job_id, exc_info=True)

    def check(self) -> None:
        """Raise :class:`LeaseLost` when the lease was lost."""
        if self.lost.is_set():
            raise LeaseLost

    def renew(self) -> None:
        """Renew now (before a step that must not run without the lease); :class:`LeaseLost` when refused."""
        self.check()
        if not heartbeat(self._engine, self._job_id, self._worker_id):
            self.lost.set()
            raise LeaseLost

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def renewal_period(heartbeat_s: float, lease_s: float, floor_s: float = 0.2) -> float:
    """How often to renew: ``heartbeat_s``, but at least three renewals per lease."""
    return max(floor_s, min(heartbeat_s, lease_s / 3))


def run_until_stopped(process_one: Callable[[], object], stop: threading.Event, poll_interval_s: float, who: str,
                      *, wakeup: Wakeup | None = None, idle: Callable[[], bool] | None = None) -> None:
    """Call ``process_one`` until ``stop`` is set; wait ``poll_interval_s`` after a call that found no job,
    or less when ``wakeup`` announces a new job (:mod:`.wakeup`). ``idle``: a short piece of work done
    instead of waiting while there is some (it returns ``True``), e.g. decoding slices ahead.

    ``process_one`` returns something falsy (``None``/``False``) when no job was
    due. An exception (the database is down) is logged and treated as "no job".
    A job in progress is finished before returning.
    """
    while not stop.is_set():
        try:
            ran = process_one()
        except Exception:  # noqa: BLE001 - the database is down: wait and poll again
            log.error("%s: claiming or running a job failed", who, exc_info=True)
            ran = None
        if not ran:
            if idle is not None and idle():
                continue
            if wakeup is None:
                stop.wait(poll_interval_s)
            else:
                wakeup.wait(poll_interval_s)
