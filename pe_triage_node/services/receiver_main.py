"""The receiver process(es): configuration → logging → Storage SCP → signals.

``receiver.processes = 1``: the Storage SCP runs in this process.
``receiver.processes = N > 1``: this process supervises N forked receiving
processes that share the port through SO_REUSEPORT (the kernel spreads new
associations across them, so parallel associations use several cores); the
``on_association_released`` callback still runs here, in this process, fed by
the children over a pipe.

SIGTERM/SIGINT: stop accepting, let open associations finish their current
instances (up to a grace period), commit, exit.

Run alone (tests, systemd): ``python -m pe_triage_node.services.receiver_main --config node.toml``.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pe_triage_node.config import NodeConfig
from pe_triage_node.services.node import process_config
from pe_triage_node.stopping import stop_on_signals

log = logging.getLogger(__name__)

GRACE_S = 20.0
ReleasedCallback = Callable[[str], None]


class _CallbackDispatcher(threading.Thread):
    """Runs ``on_association_released`` off the association threads (a slow callback never delays a sender)."""

    def __init__(self, callback: ReleasedCallback) -> None:
        super().__init__(name="association-released", daemon=True)
        self.callback = callback
        self.queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    def run(self) -> None:
        while True:
            association_id = self.queue.get()
            if association_id is None:
                return
            try:
                self.callback(association_id)
            except Exception:
                log.error("on_association_released failed for %s", association_id, exc_info=True)

    def stop(self) -> None:
        self.queue.put(None)
        self.join(timeout=10)


def _serve_one(
    cfg: NodeConfig,
    released: Callable[[str], None] | None,
    stop: threading.Event,
    *,
    reuse_port: bool,
    committer_conn: multiprocessing.connection.Connection | None = None,
    on_started: Callable[[], None] | None = None,
) -> None:
    from pe_triage_node.db.session import make_engine
    from pe_triage_node.dicom.committer import CommitterClient
    from pe_triage_node.dicom.receiver import StorageSCP

    engine = make_engine(cfg.database_url, echo=cfg.database.echo)
    client = CommitterClient(committer_conn, engine) if committer_conn is not None else None
    scp = StorageSCP(cfg, engine, on_association_released=released, reuse_port=reuse_port, committer=client)
    scp.start()
    if on_started is not None:
        on_started()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        scp.stop(grace_s=GRACE_S)
        engine.dispose()


def _child_main(cfg: NodeConfig, conn: multiprocessing.connection.Connection) -> None:
    stop = threading.Event()
    stop_on_signals("stopping the receiver", stop)
    try:
        _serve_one(cfg, None, stop, reuse_port=True, committer_conn=conn)
    except Exception:
        log.critical("receiving process %d failed", os.getpid(), exc_info=True)
        raise SystemExit(1) from None


def serve(
    cfg: NodeConfig,
    *,
    on_association_released: ReleasedCallback | None = None,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Run the Storage SCP until SIGTERM/SIGINT (blocks).

    ``on_association_released(association_id)`` is called, in this process and off
    the association threads, after an association ended (released or aborted) and
    its ``associations`` row (released_at, outcome) was committed.
    ``on_started()`` runs once listening (after the receiving processes were
    forked): start this process's own threads there, not before.
    """
    cfg.spool_dir.mkdir(parents=True, exist_ok=True)
    _repair(cfg)  # before any receiving process writes
    stop = threading.Event()
    if cfg.receiver.processes <= 1:
        stop_on_signals("stopping the receiver", stop)
        dispatcher = _CallbackDispatcher(on_association_released) if on_association_released else None
        if dispatcher is not None:
            dispatcher.start()
        try:
            _serve_one(
                cfg, dispatcher.queue.put if dispatcher else None, stop, reuse_port=False, on_started=on_started
            )
        finally:
            if dispatcher is not None:
                dispatcher.stop()
        return
    _supervise(cfg, on_association_released, stop, on_started)


def _repair(cfg: NodeConfig) -> None:
    """After a crash: temporary files, and (SQLite: this node owns the database) unacknowledged rows."""
    from pe_triage_node.db.session import make_engine
    from pe_triage_node.dicom.repair import repair_after_crash
    from pe_triage_node.dicom.spool import Spool

    engine = make_engine(cfg.database_url)
    try:
        repair_after_crash(engine, Spool(cfg.spool_dir))
    finally:
        engine.dispose()


def _supervise(
    cfg: NodeConfig,
    callback: ReleasedCallback | None,
    stop: threading.Event,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Fork the receiving processes, then commit their rows here (one writer for all)."""
    from pe_triage_node.db.session import make_engine
    from pe_triage_node.dicom.committer import IndexCommitter, serve_committer_connection

    ctx = multiprocessing.get_context("fork")  # forked before this process starts its threads

    def start_child() -> tuple[Any, multiprocessing.connection.Connection]:
        parent_end, child_end = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_child_main, args=(cfg, child_end), name="receiver", daemon=False)
        proc.start()
        child_end.close()
        return proc, parent_end

    children = [start_child() for _ in range(cfg.receiver.processes)]
    stop_on_signals("stopping the receiver", stop)
    engine = make_engine(cfg.database_url, echo=cfg.database.echo)
    committer = IndexCommitter(engine)
    committer.start()
    dispatcher = _CallbackDispatcher(callback) if callback else None
    if dispatcher is not None:
        dispatcher.start()
    released = dispatcher.queue.put if dispatcher else None

    def serve_conn(conn: multiprocessing.connection.Connection) -> threading.Thread:
        t = threading.Thread(
            target=serve_committer_connection, args=(conn, committer, released), name="commit-link", daemon=True
        )
        t.start()
        return t

    links = [serve_conn(conn) for _p, conn in children]
    if on_started is not None:
        on_started()
    log.info("receiver supervising %d receiving processes on port %d", len(children), cfg.receiver.port)
    try:
        while not stop.is_set():
            ready = multiprocessing.connection.wait([p.sentinel for p, _c in children], timeout=1.0)
            for i, (proc, conn) in enumerate(list(children)):
                if proc.sentinel in ready and not stop.is_set():
                    log.error("receiving process %d exited (code %s); restarting it", proc.pid, proc.exitcode)
                    links[i].join(timeout=5)
                    conn.close()
                    children[i] = start_child()
                    links[i] = serve_conn(children[i][1])
    finally:
        for proc, _conn in children:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: each child drains its associations
        for proc, _conn in children:
            proc.join(timeout=GRACE_S + 10)
            if proc.is_alive():
                proc.kill()
        for link in links:
            link.join(timeout=5)
        committer.stop()
        for _proc, conn in children:
            conn.close()
        if dispatcher is not None:
            dispatcher.stop()
        engine.dispose()


def run_receiver_service(cfg: NodeConfig) -> None:
    """The ``pe-triage receiver`` process: Storage SCP plus series assembly."""
    from pe_triage_node.db.session import make_engine
    from pe_triage_node.dicom.assembly import SeriesAssembler

    engine = make_engine(cfg.database_url, echo=cfg.database.echo)
    assembler = SeriesAssembler(engine, cfg)
    stop_sweeps = threading.Event()

    def sweeper() -> None:
        while not stop_sweeps.wait(cfg.assembly.check_interval_s):
            try:
                assembler.sweep()
            except Exception:
                log.error("series assembly sweep failed", exc_info=True)

    def start_sweeps() -> None:
        threading.Thread(target=sweeper, name="assembly-sweep", daemon=True).start()

    try:
        serve(cfg, on_association_released=assembler.on_association_released, on_started=start_sweeps)
    finally:
        stop_sweeps.set()
        engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m pe_triage_node.services.receiver_main``: the Storage SCP alone."""
    parser = argparse.ArgumentParser(prog="pe-triage-receiver")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--no-assembly", action="store_true", help="store only, no series assembly")
    args = parser.parse_args(argv)
    cfg = process_config("pe-triage-receiver", "receiver", args.config)
    if cfg is None:
        return 2
    from pe_triage_node.db.migrate import upgrade

    cfg.node.var_dir.mkdir(parents=True, exist_ok=True)
    upgrade(cfg.database_url)
    if args.no_assembly:
        serve(cfg)
    else:
        run_receiver_service(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
