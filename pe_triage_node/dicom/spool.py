"""The spool: received instances, laid out by validated UIDs, written atomically and durably.

Layout: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
Each write goes to a temporary file in the destination directory, is fsync'ed,
renamed into place and the directory is fsync'ed (so the name survives a power
cut too). A crash leaves at most a ``.tmp-*`` file, which :meth:`Spool.sweep_temporaries`
removes at start-up; a reader never sees a half-written ``.dcm``.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from pe_triage_node.dicom.uids import validate_uid
from pe_triage_node.errors import SpoolFull

log = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"


class Spool:
    """Durable storage of received instances under ``root``."""

    def __init__(self, root: Path, *, min_free_mb: int = 0, fsync: bool = True) -> None:
        self.root = root
        self.min_free_bytes = min_free_mb * 1024 * 1024
        self.fsync = fsync
        self._known_dirs: set[str] = set()
        self._dirs_lock = threading.Lock()
        self._counter = 0
        root.mkdir(parents=True, exist_ok=True)

    # -- paths ------------------------------------------------------------
    @staticmethod
    def relative_path(study_uid: str, series_uid: str, sop_uid: str) -> str:
        """The spool path of an instance, from UIDs checked here (never from other values)."""
        study = validate_uid(study_uid, "StudyInstanceUID")
        series = validate_uid(series_uid, "SeriesInstanceUID")
        sop = validate_uid(sop_uid, "SOPInstanceUID")
        return f"{study}/{series}/{sop}.dcm"

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def exists(self, relative: str) -> bool:
        return os.path.exists(os.path.join(self.root, relative))

    # -- space --------------------------------------------------------------
    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def check_space(self, incoming: int) -> None:
        """Raise :class:`SpoolFull` when writing ``incoming`` bytes would cross the floor."""
        if self.min_free_bytes and self.free_bytes() - incoming < self.min_free_bytes:
            raise SpoolFull(f"spool free space below {self.min_free_bytes // (1024 * 1024)} MiB")

    # -- writing ------------------------------------------------------------
    def write(self, relative: str, chunks: Sequence[bytes | memoryview], *, space_checked: bool = False) -> int:
        """Write ``chunks`` to ``relative`` atomically and durably; return the size.

        Raises :class:`SpoolFull` when below the floor or the disk is full (nothing
        is left behind), ``OSError`` for other I/O errors (nothing left behind).
        """
        size = sum(len(c) for c in chunks)
        if not space_checked:
            self.check_space(size)
        final = os.path.join(self.root, relative)
        directory = os.path.dirname(final)
        self._ensure_dir(directory)
        with self._dirs_lock:
            self._counter += 1
            tmp = os.path.join(directory, f"{_TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{self._counter}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            try:
                _write_all(fd, chunks)
                if self.fsync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as exc:
            _unlink_quietly(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull("no space left on the spool device") from exc
            raise
        if self.fsync:
            _fsync_dir(directory)
        return size

    def remove(self, relative: str) -> None:
        _unlink_quietly(os.path.join(self.root, relative))

    def _ensure_dir(self, directory: str) -> None:
        if directory in self._known_dirs:
            return
        created: list[str] = []
        path = directory
        while not os.path.isdir(path):
            created.append(path)
            path = os.path.dirname(path)
        for d in reversed(created):
            try:
                os.mkdir(d, 0o750)
            except FileExistsError:
                pass
        if self.fsync:
            # New directory entries must be durable before files in them are acknowledged.
            for d in created:
                _fsync_dir(os.path.dirname(d))
        with self._dirs_lock:
            if len(self._known_dirs) > 10000:
                self._known_dirs.clear()
            self._known_dirs.add(directory)

    def sweep_temporaries(self) -> int:
        """Remove temporary files a crash left behind; return how many."""
        removed = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if name.startswith(_TMP_PREFIX):
                    _unlink_quietly(os.path.join(dirpath, name))
                    removed += 1
        if removed:
            log.info("removed %d temporary files left by an interrupted write", removed)
        return removed


def _write_all(fd: int, chunks: Sequence[bytes | memoryview]) -> None:
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            n = os.write(fd, view)
            view = view[n:]


def _fsync_dir(directory: str) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        log.warning("could not remove %s", path, exc_info=True)
