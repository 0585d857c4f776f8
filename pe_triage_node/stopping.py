"""A process's stop: one event that SIGTERM (systemd, the supervisor) and SIGINT (Ctrl-C) set."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)


def stop_on_signals(what: str, stop: threading.Event | None = None) -> threading.Event:
    """``stop`` (a new event by default), set by SIGTERM or SIGINT and logged as ``signal N: <what>``.

    Handlers can only be installed from the main thread; elsewhere the event is returned as it is.
    """
    stop = stop if stop is not None else threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return stop

    def _handler(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: %s", signum, what)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _handler)
    return stop
