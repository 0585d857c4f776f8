"""Slices decoded while their series still arrives, so that its job starts from pixels that are ready.

An idle worker (no job due) decodes, a few at a time, the newest stored
instances of series that are still arriving, complete or selected (their job
may not have run yet) into memory: each slice's dataset without its pixel data, its
header as the volume checks it and its HU image
(:func:`~pe_triage_node.inference.volume.decode_slice`). When the series' job
runs, :func:`~pe_triage_node.inference.volume.load_ct_volume` takes those
slices instead of reading, checking and decoding the files again (:meth:`SlicePrefetch.take`).

* Never on the receiver's path: the receiver stores and acknowledges as
  before; the worker reads the spool files only after their rows are committed.
* Bounded: at most ``worker.prefetch_mb`` of HU images in memory (least
  recently decoded dropped first); nothing on disk. 0 turns it off.
* Only a shortcut: a slice is used only while its file is unchanged (size,
  modification time, inode); anything not decoded ahead, dropped, or unreadable
  is read from the spool as without prefetching, and every check of the loaded
  series runs on prefetched slices too. A worker killed while decoding loses
  its memory and nothing else: the series' job runs as it would have.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from pe_triage_node.db.models import Instance, Series, SeriesState
from pe_triage_node.db.session import read_only
from pe_triage_node.inference.volume import CT_SOP_CLASSES, SliceHeader, decode_slice

log = logging.getLogger(__name__)

#: Series whose newest instances are decoded ahead.
_STATES = (SeriesState.receiving, SeriesState.complete, SeriesState.selected)
#: At start-up, instances received this long ago or more are not decoded ahead.
_START_LOOKBACK = dt.timedelta(minutes=10)


@dataclass(frozen=True)
class _Entry:
    key: tuple[int, int, int]  # the file's size, modification time (ns), inode when decoded
    decoded: SliceHeader
    nbytes: int  # of its HU image


def _file_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


class SlicePrefetch:
    """The worker's slices decoded ahead, at most ``budget_bytes`` of HU images."""

    def __init__(self, engine: Engine, spool_dir: Path, budget_bytes: int) -> None:
        self.engine = engine
        self.spool_dir = spool_dir
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self._entries: OrderedDict[Path, _Entry] = OrderedDict()
        self._pending: deque[Path] = deque()
        self._last_id: int | None = None  # the newest instance row seen
        self._quiet = True  # the last look found nothing new
        self.decoded = self.used = 0  # counters for the logs and tests

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, path: object) -> bool:
        return path in self._entries

    # -- filling ---------------------------------------------------------------
    def _discover(self) -> None:
        """Queue the instance files stored since the last look (CT image storage only)."""
        with Session(read_only(self.engine)) as s:
            if self._last_id is None:
                since = dt.datetime.now(dt.UTC) - _START_LOOKBACK
                older = s.scalar(select(Instance.id).where(Instance.received_at < since)
                                 .order_by(Instance.id.desc()).limit(1))
                self._last_id = int(older or 0)
            rows = s.execute(
                select(Instance.id, Instance.spool_path, Instance.sop_class_uid)
                .join(Series, Series.id == Instance.series_id)
                .where(Instance.id > self._last_id, Series.state.in_(_STATES))
                .order_by(Instance.id).limit(512)
            ).all()
        if rows and self._quiet:  # once per burst of arrivals, not per look
            log.info("decoding newly stored slice(s) ahead (%d so far)", self.decoded)
        self._quiet = not rows
        for row_id, spool_path, sop_class in rows:
            self._last_id = max(self._last_id, int(row_id))
            if sop_class in CT_SOP_CLASSES:
                path = Path(spool_path)
                self._pending.append(path if path.is_absolute() else self.spool_dir / path)

    def fill(self, max_slices: int = 8) -> int:
        """Decode up to ``max_slices`` newly stored slices; returns how many were decoded (0: nothing to do)."""
        if self.budget_bytes <= 0:
            return 0
        if not self._pending:
            self._discover()
        done = 0
        while self._pending and done < max_slices:
            path = self._pending.popleft()
            if path in self._entries:
                continue
            key = _file_key(path)
            try:
                decoded = decode_slice(path)
            except Exception:  # noqa: BLE001 - the job reads it again and says what is wrong
                log.debug("prefetch skipped %s", path.name)
                continue
            if key is None or key != _file_key(path):
                continue  # changed while read
            self._store(path, _Entry(key, decoded, decoded.hu.nbytes if decoded.hu is not None else 0))
            done += 1
        self.decoded += done
        return done

    def _store(self, path: Path, entry: _Entry) -> None:
        if entry.nbytes > self.budget_bytes:
            return
        self._entries[path] = entry
        self.bytes += entry.nbytes
        while self.bytes > self.budget_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= dropped.nbytes

    # -- using -----------------------------------------------------------------
    def take(self, path: Path) -> SliceHeader | None:
        """The slice of ``path`` decoded ahead (removed from memory), or ``None`` when the file must be read."""
        entry = self._entries.pop(path, None)
        if entry is None:
            return None
        self.bytes -= entry.nbytes
        if _file_key(path) != entry.key:
            return None
        self.used += 1
        return entry.decoded


def volume_pages_reuse_freed_slices() -> bool:
    """Large numpy arrays (a series' volume) in ordinary pages, not transparent huge pages; called once by
    the worker process. ``True`` when the setting took effect.

    numpy asks the kernel for huge pages for every array of 4 MiB or more. A huge page needs 2 MiB
    of contiguous free memory, which the slices freed while
    :func:`~pe_triage_node.inference.volume.load_ct_volume` copies them in never are: the volume
    then faults in 300 MiB the process never touched, which on this project's VMs costs 0.6-1.3 s
    (0.2 s in ordinary pages, which reuse the freed slices' pages).
    """
    # numpy's switch (NUMPY_MADVISE_HUGEPAGE): numpy._core from 2.0, numpy.core before
    setter = getattr(getattr(np, "_core", None) or getattr(np, "core", None), "multiarray", None)
    setter = getattr(setter, "_set_madvise_hugepage", None)
    if setter is None:
        return False
    setter(False)
    return True


#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4


def heap_keeps_freed_memory(reserve_bytes: int = 0) -> bool:
    """Large blocks from glibc's heap, not mapped one by one, and the heap trimmed never below
    ``reserve_bytes``; called once by the worker process (``worker.heap_reserve_mb``). ``True`` when it
    took effect (glibc only).

    By default glibc maps every block of 128 KiB or more on its own and hands it back when freed, so
    each job's volume, resampled copies and activations land on pages the process never touched. On
    this project's VMs such a page costs up to 10 us to fault in (2.5 ms a MiB): 0.6 s for a
    300-slice volume, 0.2 s for its resampling. Kept in the heap, what one job (or the slices decoded
    ahead) frees serves the next allocation with pages that are mapped already.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; musl has no tunables and its stub returns 0
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, min(reserve_bytes, 2**31 - 1))))


class HeapReserve:
    """Memory the idle worker touches, a chunk per idle turn, and frees into its heap
    (:func:`heap_keeps_freed_memory`), so that even its first job's volume lands on mapped pages.

    :meth:`release` before a job (a reserve still being touched is freed as far as it got)."""

    def __init__(self, nbytes: int, chunk_bytes: int = 8 << 20) -> None:
        self.nbytes = nbytes
        self.chunk_bytes = chunk_bytes
        self.touched = 0
        self.done = nbytes <= 0
        self._block: np.ndarray | None = None
        self._t0 = 0.0

    def step(self) -> bool:
        """Touch the next chunk; ``False`` when there was nothing left to do."""
        if self.done:
            return False
        if self._block is None:
            self._block = np.empty(self.nbytes, dtype=np.uint8)
            self._t0 = time.monotonic()
        end = min(self.touched + self.chunk_bytes, self.nbytes)
        self._block[self.touched:end] = 0
        self.touched = end
        if end >= self.nbytes:
            self.release()
            log.info("heap reserve of %d MiB mapped in %.2f s", self.nbytes >> 20, time.monotonic() - self._t0)
        return True

    def release(self) -> None:
        """Free the block into the heap; the reserve is not touched again."""
        self._block = None
        self.done = True


def run_idle(prefetch: SlicePrefetch | None, budget_s: float = 0.05,
             interrupted: Callable[[], bool] | None = None) -> bool:
    """Decode ahead, one slice at a time, for at most about ``budget_s`` or until ``interrupted()``
    (a job was announced: it is claimed before the next slice); ``True`` when there was work."""
    if prefetch is None:
        return False
    t = time.monotonic()
    worked = False
    while time.monotonic() - t < budget_s:
        if not prefetch.fill(max_slices=1):
            break
        worked = True
        if interrupted is not None and interrupted():
            break
    return worked
