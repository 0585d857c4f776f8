"""SQLite write-lock waits with the whole node running: what a writer waits for while the others poll.

    .venv/bin/python benchmarks/sqlite_locks.py [--seconds 20] [--slices 120]

A probe process, beside the node, takes the database's write lock the way the
receiver does for each instance (``BEGIN IMMEDIATE`` ... ``COMMIT``) every
20 ms and records how long ``BEGIN IMMEDIATE`` waited. Three phases, measured
in the same run:

1. reference: the database alone (the node stopped);
2. idle: ``pe-triage run`` with receiver, worker, exporter and web console up,
   nothing arriving (their polls only), plus a client reading the web console's
   ``/readyz`` and ``/metrics`` in a loop;
3. busy: the same while dcmtk ``storescu`` sends a phantom CTPA and the node
   analyses it and exports the result to a dcmtk ``storescp``.

Prints p50 / p99 / max wait per phase; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pe_triage_node.db.migrate import upgrade  # noqa: E402
from tests import node_support, peers  # noqa: E402


class LockProbe:
    """Measure BEGIN IMMEDIATE waits every ``every_s`` from its own connection."""

    def __init__(self, db: Path, every_s: float = 0.02) -> None:
        self.conn = sqlite3.connect(db, isolation_level=None, timeout=30, check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout=30000")
        self.every = every_s
        self.waits: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            t = time.perf_counter()
            self.conn.execute("BEGIN IMMEDIATE")
            self.waits.append(time.perf_counter() - t)
            self.conn.execute("COMMIT")

    def measure(self, seconds: float) -> list[float]:
        self.waits = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(seconds)
        self._stop.set()
        self._thread.join()
        return list(self.waits)


def summary(waits: list[float]) -> dict[str, float]:
    ms = sorted(w * 1000 for w in waits)
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 3),
        "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 3),
        "max_ms": round(ms[-1], 3),
        "over_5ms": sum(1 for m in ms if m > 5),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the reference and idle phases")
    ap.add_argument("--slices", type=int, default=120, help="slices of the phantom sent in the busy phase")
    args = ap.parse_args()

    from pe_triage_node.synth.phantom import render_phantom, sample_spec
    from pe_triage_node.synth.rspect import write_phantom_study

    tmp = Path(tempfile.mkdtemp(prefix="pe-triage-locks-"))
    db = tmp / "var" / "node.db"
    db.parent.mkdir(parents=True)
    url = f"sqlite:///{db}"
    upgrade(url)
    series = write_phantom_study(render_phantom(sample_spec(7, size="full", slices=args.slices)), tmp / "in",
                                 split="bench").series_dir
    port, web_port, pacs_port = peers.free_port(), peers.free_port(), peers.free_port()
    pacs = peers.start_storescp(pacs_port, tmp / "pacs")
    config = node_support.write_node_config(
        tmp, database_url=url, receiver_port=port, manifest=node_support.DEMO_MANIFEST,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        sections={"worker": {"run_web": True}, "web": {"port": web_port},
                  "queue": {"poll_interval_s": 0.1}, "export": {"poll_interval_s": 0.1}},
    )
    probe = LockProbe(db)
    figures: dict[str, dict[str, float]] = {}
    figures["reference"] = summary(probe.measure(args.seconds))
    log_path = tmp / "node.log"
    node = node_support.start_node_process(config, ["run"], log_path=log_path)
    stop_web = threading.Event()
    try:
        peers.wait_for_port(port, timeout=300, proc=node)
        peers.wait_for_port(web_port, timeout=120, proc=node)
        node_support.wait_until(lambda: "warmed up" in log_path.read_text(errors="replace"), 300, "the worker's warm-up",
                                procs=[node], log_path=log_path)

        def web_client() -> None:
            while not stop_web.is_set():
                for page in ("/readyz", "/metrics"):
                    try:
                        urllib.request.urlopen(f"http://127.0.0.1:{web_port}{page}", timeout=10).read()
                    except OSError:
                        pass
                stop_web.wait(0.1)

        threading.Thread(target=web_client, daemon=True).start()
        figures["idle"] = summary(probe.measure(args.seconds))
        sender = peers.storescu_popen(port, [series])
        busy: list[float] = []
        deadline = time.monotonic() + 600
        while not any((tmp / "pacs").rglob("SR*")) and time.monotonic() < deadline:
            busy += probe.measure(2.0)
        sender.wait(timeout=60)
        figures["busy"] = summary(busy)
    finally:
        stop_web.set()
        peers.stop_process(node, timeout=120)
        peers.stop_process(pacs)
    for phase, f in figures.items():
        print(f"{phase:10s} " + "  ".join(f"{k} {v}" for k, v in f.items()))
    print(json.dumps({"benchmark": "sqlite_locks", "tmp": str(tmp), **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
