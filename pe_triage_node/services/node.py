"""The node's processes and their supervisor for ``pe-triage run``.

Each role runs in its own operating-system process (the receiver never imports
torch; a worker's model stays out of the others' memory)::

    python -m pe_triage_node.services.node receiver|worker|exporter|web [--config FILE]

``pe-triage run`` (:class:`NodeSupervisor`) starts one receiver, ``worker.processes``
workers, one exporter and, when ``worker.run_web`` is true, the web console; restarts a child that dies (with a
growing delay); on SIGTERM/SIGINT sends SIGTERM to every child, waits for them
(a worker finishes its current job), and kills what is left after the grace
period. A worker that exits with :data:`~pe_triage_node.worker.inference_worker.EXIT_NO_WEIGHTS`
(no model weights) or a child with a configuration error (exit 2) is not restarted.

Under systemd each role has its own unit instead (``systemd/``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pe_triage_node.config import NodeConfig, load_config
from pe_triage_node.errors import ConfigError
from pe_triage_node.stopping import stop_on_signals

log = logging.getLogger(__name__)

ROLES = ("receiver", "worker", "exporter", "web")
#: Seconds the supervisor waits for its children after SIGTERM before killing them.
STOP_GRACE_S = {"receiver": 30.0, "worker": 120.0, "exporter": 60.0, "web": 10.0}
_NO_RESTART = {2, 3}  # configuration error, no model weights


def quiet_libraries() -> None:
    """APScheduler logs every poll at INFO: keep it at WARNING in the node's processes."""
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def process_config(prog: str, role: str, path: Path | None) -> NodeConfig | None:
    """The configuration of one of the node's processes, its logging set up; ``None`` (the reason
    printed on stderr, exit code 2 for the caller) when the configuration is invalid."""
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None
    from pe_triage_node.services.logs import configure_logging

    configure_logging(cfg, role)
    return cfg


# -- the roles ---------------------------------------------------------------------


def run_exporter_service(cfg: NodeConfig) -> int:
    """The ``pe-triage exporter`` process: export jobs until SIGTERM/SIGINT."""
    from pe_triage_node.export.exporter import run_exporter_service as serve_exports

    serve_exports(cfg, stop_on_signals("stopping"))
    return 0


def run_web_service(cfg: NodeConfig) -> int:
    """The web console (uvicorn stops on SIGTERM/SIGINT by itself)."""
    from pe_triage_node.web.cli import serve_console

    return serve_console(cfg)


def run_role(role: str, cfg: NodeConfig, *, random_weights: bool = False) -> int:
    """Run one role in this process until it is told to stop; returns the exit code."""
    if role == "receiver":
        from pe_triage_node.services.receiver_main import run_receiver_service

        run_receiver_service(cfg)
        return 0
    if role == "worker":
        from pe_triage_node.worker import run_worker_service

        return run_worker_service(cfg, random_weights=random_weights)
    if role == "exporter":
        return run_exporter_service(cfg)
    if role == "web":
        return run_web_service(cfg)
    raise ValueError(f"unknown role {role!r}")


# -- the supervisor ---------------------------------------------------------------


@dataclass
class _Child:
    role: str
    command: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    next_start: float = 0.0
    given_up: bool = False
    env: dict[str, str] = field(default_factory=dict)


def child_command(role: str, config: Path | None, *, random_weights: bool = False) -> list[str]:
    """The command line of one child process."""
    cmd = [sys.executable, "-m", "pe_triage_node.services.node", role]
    if config is not None:
        cmd += ["--config", str(config)]
    if random_weights and role == "worker":
        cmd.append("--random-weights")
    return cmd


class NodeSupervisor:
    """Starts the node's processes, restarts the ones that die, stops them all on a signal."""

    def __init__(
        self, cfg: NodeConfig, config: Path | None, *, random_weights: bool = False, web: bool | None = None
    ) -> None:
        with_web = cfg.worker.run_web if web is None else web
        roles = ["receiver", *(["worker"] * cfg.worker.processes), "exporter", *(["web"] if with_web else [])]
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if cfg.worker.processes > 1 and "OMP_NUM_THREADS" not in env:
            # Share the cores between the workers instead of oversubscribing them.
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cfg.worker.processes))
        self.children = [
            _Child(role, child_command(role, config, random_weights=random_weights), env=env) for role in roles
        ]
        self.stop = threading.Event()

    def _start(self, child: _Child) -> None:
        child.proc = subprocess.Popen(child.command, env=child.env)
        child.started = time.monotonic()
        log.info("started %s (pid %d)", child.role, child.proc.pid)

    def _check(self, child: _Child) -> None:
        if child.given_up:
            return
        now = time.monotonic()
        if child.proc is None:
            if now >= child.next_start:
                self._start(child)
            return
        code = child.proc.poll()
        if code is None:
            return
        child.proc = None
        if code in _NO_RESTART:
            child.given_up = True
            log.critical("%s exited with code %d (configuration or model weights): not restarted; "
                         "the other processes keep running", child.role, code)
            return
        if now - child.started > 60:
            child.restarts = 0  # it ran a while: start the back-off afresh
        delay = min(30.0, 2.0 ** child.restarts)
        child.restarts += 1
        child.next_start = now + delay
        log.error("%s exited with code %d; restarting in %.0f s", child.role, code, delay)

    def run(self) -> int:
        """Start everything and supervise until SIGTERM/SIGINT; returns 0 after a clean stop."""
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        stop = stop_on_signals("stopping the node")
        for child in self.children:
            self._start(child)
        try:
            while not stop.wait(0.5) and not self.stop.is_set():
                for child in self.children:
                    self._check(child)
        finally:
            self.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0

    def shutdown(self) -> None:
        """SIGTERM to every child, wait per role's grace period, SIGKILL what is left."""
        running = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        for child in running:
            if child.proc is not None:
                child.proc.send_signal(signal.SIGTERM)
        for child in running:
            proc = child.proc
            if proc is None:
                continue
            try:
                proc.wait(timeout=STOP_GRACE_S.get(child.role, 30.0))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not stop in time: killed", child.role, proc.pid)
                proc.kill()
                proc.wait(timeout=10)
        log.info("node stopped")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pe_triage_node.services.node ROLE [--config FILE]``: one of the node's processes."""
    parser = argparse.ArgumentParser(prog="pe-triage-node-process")
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--random-weights", action="store_true", help="worker: meaningless random weights (tests)")
    args = parser.parse_args(argv)
    cfg = process_config(f"pe-triage {args.role}", args.role, args.config)
    if cfg is None:
        return 2
    quiet_libraries()
    return run_role(args.role, cfg, random_weights=args.random_weights)


if __name__ == "__main__":
    sys.exit(main())
