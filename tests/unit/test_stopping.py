"""SIGTERM and SIGINT set the process's stop event (and nothing else happens to the process)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest

from pe_triage_node.stopping import stop_on_signals


@pytest.fixture
def handlers_restored() -> Iterator[None]:
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_sets_the_event(handlers_restored: None, sig: signal.Signals) -> None:
    given = threading.Event()
    stop = stop_on_signals("test stops", given)
    assert stop is given and not stop.is_set()
    os.kill(os.getpid(), sig)
    assert stop.wait(5)


def test_outside_the_main_thread_no_handler_is_installed(handlers_restored: None) -> None:
    before = signal.getsignal(signal.SIGTERM)
    got: list[threading.Event] = []
    t = threading.Thread(target=lambda: got.append(stop_on_signals("from a thread")))
    t.start()
    t.join()
    assert not got[0].is_set() and signal.getsignal(signal.SIGTERM) is before
