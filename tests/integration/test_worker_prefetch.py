"""Slices decoded ahead by an idle worker (pe_triage_node.worker.prefetch), on SQLite and PostgreSQL:
the volume they give is the one the files give, the memory budget holds, a file changed after
decoding is read again, and a worker killed while decoding leaves the series to be analysed once."""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from pe_triage_node.db.models import Instance, Job, JobState, TriageResult
from pe_triage_node.inference.volume import SliceHeader, load_ct_volume
from pe_triage_node.worker.prefetch import SlicePrefetch, run_idle
from tests import node_support, peers

STUDY = "1.2.826.0.1.3680043.10.1453.93.1"
SERIES = "1.2.826.0.1.3680043.10.1453.93.2"
SLICE_BYTES = 64 * 64 * 4  # one tiny slice in HU (float32)


@pytest.fixture(scope="module")
def series_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return node_support.tiny_series(tmp_path_factory.mktemp("series"), STUDY, SERIES, slices=30)


def _spool_files(engine: Engine, spool: Path) -> list[Path]:
    with Session(engine) as s:
        return [spool / p for p in s.scalars(select(Instance.spool_path).order_by(Instance.id))]


def _filled(engine: Engine, spool: Path, files: list[Path], budget_bytes: int) -> SlicePrefetch:
    """The series seeded as still arriving, and a prefetch that has decoded all it would."""
    node_support.seed_selected_series(engine, spool, files, receiving=True)
    prefetch = SlicePrefetch(engine, spool, budget_bytes=budget_bytes)
    while run_idle(prefetch):
        pass
    return prefetch


def test_slices_decoded_while_the_series_arrives_load_as_its_files_do(
    engine: Engine, tmp_path: Path, series_files: list[Path]
) -> None:
    spool = tmp_path / "spool"
    prefetch = _filled(engine, spool, series_files, 10 * 1024 * 1024)
    files = _spool_files(engine, spool)
    assert len(prefetch) == len(files) == 30 and prefetch.bytes == 30 * SLICE_BYTES

    taken: list[SliceHeader] = []

    def take(path: Path) -> SliceHeader | None:
        decoded = prefetch.take(path)
        if decoded is not None:
            taken.append(decoded)
        return decoded

    ahead = load_ct_volume(files, keep_datasets=True, prefetched=take)
    read = load_ct_volume(files, keep_datasets=True)
    assert prefetch.used == 30 and len(prefetch) == 0 and prefetch.bytes == 0, "taken slices leave the memory"
    assert len(taken) == 30 and all(h.hu is None for h in taken), "each slice's HU is released once copied in"
    assert np.array_equal(ahead.hu, read.hu)
    assert ahead.sop_instance_uids == read.sop_instance_uids and ahead.spacing == read.spacing
    assert [ds.SOPInstanceUID for ds in ahead.datasets] == [ds.SOPInstanceUID for ds in read.datasets]
    assert all("PixelData" not in ds for ds in ahead.datasets)
    assert run_idle(prefetch) is False, "nothing new stored: nothing to decode"


def test_the_memory_budget_keeps_the_newest_slices(engine: Engine, tmp_path: Path, series_files: list[Path]) -> None:
    spool = tmp_path / "spool"
    prefetch = _filled(engine, spool, series_files, 3 * SLICE_BYTES + SLICE_BYTES // 2)
    files = _spool_files(engine, spool)
    assert prefetch.decoded == 30 and len(prefetch) == 3 and prefetch.bytes <= prefetch.budget_bytes
    assert all(f in prefetch for f in files[-3:])
    # the slices dropped are read from the files: the same volume
    assert np.array_equal(load_ct_volume(files, prefetched=prefetch.take).hu, load_ct_volume(files).hu)
    assert prefetch.used == 3

    off = SlicePrefetch(engine, spool, budget_bytes=0)
    assert run_idle(off) is False and len(off) == 0


def test_a_file_changed_after_it_was_decoded_is_read_again(
    engine: Engine, tmp_path: Path, series_files: list[Path]
) -> None:
    import pydicom

    spool = tmp_path / "spool"
    prefetch = _filled(engine, spool, series_files, 10 * 1024 * 1024)
    files = _spool_files(engine, spool)
    ds = pydicom.dcmread(files[0])
    ds.RescaleIntercept = float(ds.RescaleIntercept) + 7  # the same instance stored again, other values
    tmp = files[0].with_suffix(".new")
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(files[0])
    assert prefetch.take(files[0]) is None and files[0] not in prefetch
    assert np.array_equal(load_ct_volume(files, prefetched=prefetch.take).hu, load_ct_volume(files).hu)
    assert prefetch.used == 29


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_worker_killed_while_decoding_ahead_leaves_the_series_to_be_analysed_once(
    tmp_path: Path, db_url: str, engine: Engine, procs: list[subprocess.Popen[bytes]]
) -> None:
    manifest = node_support.tiny_manifest(tmp_path / "model")
    config = node_support.write_node_config(
        tmp_path, database_url=db_url, receiver_port=peers.free_port(), manifest=manifest,
        sections={"queue": {"lease_s": 3.0, "heartbeat_s": 0.5, "poll_interval_s": 0.05}},
    )
    files = node_support.tiny_series(tmp_path / "series", STUDY, SERIES, slices=120)
    spool = tmp_path / "var" / "spool"
    log_a, log_b = tmp_path / "worker-a.log", tmp_path / "worker-b.log"
    first = node_support.start_node_process(config, ["worker"], log_path=log_a)
    procs.append(first)
    node_support.wait_until(lambda: " started (device" in log_a.read_text(errors="replace"), 120, "worker A ready",
                            procs=[first], log_path=log_a)
    node_support.seed_selected_series(engine, spool, files, receiving=True)  # the series arrives
    node_support.wait_until(lambda: "slice(s) ahead" in log_a.read_text(errors="replace"), 60,
                            "worker A decoding ahead", every=0.01, procs=[first], log_path=log_a)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)

    job_id = node_support.seed_selected_series(engine, spool, files)  # complete and selected: its job is queued
    second = node_support.start_node_process(config, ["worker"], log_path=log_b)
    procs.append(second)

    def succeeded() -> bool:
        with Session(engine) as s:
            job = s.get(Job, job_id)
            return job is not None and job.state == JobState.succeeded

    node_support.wait_until(succeeded, 120, "worker B analyses the series", procs=[second], log_path=log_b)
    with Session(engine) as s:
        assert Counter(s.scalars(select(TriageResult.job_id))) == Counter({job_id: 1})


def test_numpy_huge_page_switch_is_found() -> None:
    """The worker's volume reuses the freed slices' pages only when numpy's switch exists (numpy renamed it once)."""
    from pe_triage_node.worker.prefetch import volume_pages_reuse_freed_slices

    assert volume_pages_reuse_freed_slices() is True


_HEAP_PROBE = """
import ctypes
import numpy as np
from pe_triage_node.worker.prefetch import heap_keeps_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
block = 64 << 20
a = np.ones(block, np.uint8)
assert libc.mallinfo2().hblkhd >= block, "glibc's default: a large block is mapped on its own"
del a
assert heap_keeps_freed_memory()
b = np.ones(block, np.uint8)
assert libc.mallinfo2().hblkhd < block, "now from the heap"
arena = libc.mallinfo2().arena
del b
c = np.ones(block, np.uint8)
assert libc.mallinfo2().arena == arena, "the freed block served again: the heap neither shrank nor grew"
import threading
sums = []
t = threading.Thread(target=lambda: sums.append(int(np.ones(2 * block, np.uint8).sum())))  # beyond a thread arena's heap
t.start(); t.join()
assert sums == [2 * block], "a thread's large block is still served"
print("ok")
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's heap tunables")
def test_heap_keeps_freed_memory_for_the_next_job() -> None:
    """After the worker's switch, a large block comes from the heap and, freed, serves the next allocation
    (pages already mapped) instead of being handed back; in a process of its own (the switch is process-wide)."""
    import sys

    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_heap_reserve_is_touched_a_chunk_per_idle_turn_and_released_by_a_job() -> None:
    from pe_triage_node.worker.prefetch import HeapReserve

    r = HeapReserve(5 << 20, chunk_bytes=2 << 20)
    assert [r.step() for _ in range(4)] == [True, True, True, False]
    assert r.done and r.touched == 5 << 20
    half = HeapReserve(5 << 20, chunk_bytes=2 << 20)
    assert half.step() and half.touched == 2 << 20
    half.release()  # a job came: freed as far as it got, never touched again
    assert half.done and not half.step()
    assert not HeapReserve(0).step()
