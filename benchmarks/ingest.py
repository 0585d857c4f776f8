"""Ingest throughput: dcmtk storescp vs Orthanc vs the node's receiver, same series, same storescu.

    .venv/bin/python benchmarks/ingest.py [--slices 300] [--size 512] [--processes 2] [--repeat 1]

Generates a CT series (``write_ct_series``), then for each receiver in turn:
starts it on a free loopback port, sends the series with one ``storescu``
(one association) and with 4 parallel ``storescu`` each sending a quarter
(4 associations), and measures wall time from launching the storescu
process(es) to the last exit (association set-up included). Every storescu
must succeed. dcmtk/Orthanc run with TCP_NODELAY=1. storescp writes without
fsync; Orthanc uses its defaults; the node keeps its durability guarantee
(fsync of file and directory + committed SQLite row, synchronous=FULL, before
each 0x0000). With --repeat N the best of N runs is reported per mode. Each run also reports
the CPU time the receiver's process tree used per image (user+system, /proc),
which stays meaningful when other work shares the CPUs (wall-clock rates do not).
Two more references from the same run bound what the node can reach: stock
pynetdicom with a C-STORE handler that does nothing (``benchmarks/noop_scp.py``),
and the node's durable write alone (``Spool.write`` of each file in turn, no
network): on one association every 0x0000 waits for that write.
The last line is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from pe_triage_node.synth.ct_series import write_ct_series  # noqa: E402
from tests import peers  # noqa: E402


def make_series(out: Path, slices: int, size: int) -> list[Path]:
    rng = np.random.default_rng(1453)
    z, y, x = np.mgrid[0:slices, 0:size, 0:size]
    r = np.sqrt((y - size / 2) ** 2 + (x - size / 2) ** 2)
    vol = np.where(r < size * 0.45, 40.0, -1000.0) + rng.normal(0, 20, (slices, size, size))
    del z
    return write_ct_series(vol.astype(np.float32), out, slice_spacing=1.0)


_TICK = os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(root_pid: int) -> float:
    """User+system CPU seconds of a process and its live descendants (from /proc)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        parents[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / _TICK
    total = 0.0
    for pid in cpu:
        p = pid
        while p and p != root_pid:
            p = parents.get(p, 0)
        if p == root_pid:
            total += cpu[pid]
    return total


def send_one(port: int, files: list[Path], called: str) -> float:
    t0 = time.perf_counter()
    res = peers.storescu(port, files, called=called, timeout=600)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"storescu failed ({res.returncode}): {res.stderr[-500:]}")
    return dt


def send_parallel(port: int, files: list[Path], called: str, n: int = 4) -> float:
    parts = [files[i::n] for i in range(n)]
    t0 = time.perf_counter()
    procs = [peers.storescu_popen(port, part, called=called) for part in parts]
    codes = []
    for p in procs:
        _out, err = p.communicate(timeout=600)
        codes.append((p.returncode, err))
    dt = time.perf_counter() - t0
    for code, err in codes:
        if code != 0:
            raise RuntimeError(f"storescu failed ({code}): {err[-500:]}")
    return dt


def measure(
    name: str,
    start: Callable[[Path, int], Any],
    stop: Callable[[Any], None],
    files: list[Path],
    called: str,
    work: Path,
    repeat: int,
) -> dict[str, float]:
    one: list[float] = []
    four: list[float] = []
    cpu_one: list[float] = []
    cpu_four: list[float] = []
    for r in range(repeat):
        for mode in ("one", "four"):
            d = work / f"{name}-{mode}-{r}"
            port = peers.free_port()
            handle = start(d, port)
            try:
                cpu0 = _tree_cpu_s(handle.pid)
                t = send_one(port, files, called) if mode == "one" else send_parallel(port, files, called)
                cpu_ms = (_tree_cpu_s(handle.pid) - cpu0) * 1000 / len(files)
            finally:
                stop(handle)
                shutil.rmtree(d, ignore_errors=True)
            (one if mode == "one" else four).append(len(files) / t)
            (cpu_one if mode == "one" else cpu_four).append(cpu_ms)
            print(
                f"  {name:9s} {mode:4s} run {r + 1}: {len(files) / t:7.1f} images/s ({t:.2f} s), "
                f"receiver CPU {cpu_ms:.2f} ms/image",
                flush=True,
            )
    return {
        "one_association": round(max(one), 1),
        "four_associations": round(max(four), 1),
        "cpu_ms_per_image_one": round(min(cpu_one), 2),
        "cpu_ms_per_image_four": round(min(cpu_four), 2),
    }


def durable_write_floor(files: list[Path], work: Path) -> float:
    """Images/s of the node's own durable write alone (``Spool.write``: temp file, fdatasync,
    rename, directory fsync), one file after the other: what one association can reach at
    best when each 0x0000 waits for the disk, with no network, parsing or database at all."""
    from pe_triage_node.dicom.spool import Spool

    spool = Spool(work / "floor")
    blobs = [f.read_bytes() for f in files]
    t = time.perf_counter()
    for i, blob in enumerate(blobs):
        spool.write(f"1.2.3/1.2.3.4/1.2.3.4.{i + 1}.dcm", (blob,))
    dt = time.perf_counter() - t
    shutil.rmtree(work / "floor", ignore_errors=True)
    return len(files) / dt


def start_noop_scp(d: Path, port: int) -> subprocess.Popen[bytes]:
    d.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "noop_scp.py"), str(port), "PETRIAGE"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peers.wait_for_port(port, proc=proc)
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--processes", type=int, default=2, help="node receiving processes (SO_REUSEPORT)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--only", choices=["storescp", "orthanc", "pynetdicom-noop", "node"], action="append")
    args = ap.parse_args()
    only = set(args.only or ["storescp", "orthanc", "pynetdicom-noop", "node"])

    load_at_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-", dir=os.environ.get("BENCH_TMP")))
    try:
        print(f"generating {args.slices} x {args.size}x{args.size} CT slices ...", flush=True)
        files = make_series(work / "series", args.slices, args.size)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"series: {len(files)} files, {mb:.0f} MB", flush=True)
        results: dict[str, Any] = {}

        if "storescp" in only:
            results["storescp"] = measure(
                "storescp",
                lambda d, port: peers.start_storescp(port, d / "out", aet="PETRIAGE"),
                peers.stop_process,
                files,
                "PETRIAGE",
                work,
                args.repeat,
            )
        if "orthanc" in only:
            results["orthanc"] = measure(
                "orthanc",
                lambda d, port: peers.start_orthanc(d, port, peers.free_port(), aet="PETRIAGE"),
                peers.stop_process,
                files,
                "PETRIAGE",
                work,
                args.repeat,
            )
        if "pynetdicom-noop" in only:
            results["pynetdicom_noop"] = measure(
                "pynetdicom-noop", start_noop_scp, peers.stop_process, files, "PETRIAGE", work, args.repeat
            )
        if "node" in only:

            def start_node(d: Path, port: int) -> subprocess.Popen[bytes]:
                d.mkdir(parents=True, exist_ok=True)
                cfg = peers.write_receiver_config(
                    d, port, receiver={"processes": args.processes, "min_free_mb": 100}
                )
                return peers.start_receiver(cfg, port, log_path=d.parent / f"{d.name}.log")

            def stop_node(proc: subprocess.Popen[bytes]) -> None:
                peers.stop_process(proc)

            results["node"] = measure("node", start_node, stop_node, files, "PETRIAGE", work, args.repeat)
        floor = durable_write_floor(files, work)
        print(f"  durable write alone (Spool.write, one file after the other): {floor:7.1f} images/s", flush=True)

        summary: dict[str, Any] = {
            "benchmark": "ingest",
            "slices": len(files),
            "matrix": args.size,
            "series_mb": round(mb, 1),
            "node_processes": args.processes,
            "node_durability": "fsync file + dir, committed SQLite row (WAL, synchronous=FULL) before 0x0000",
            "parallel": "4 storescu, each a quarter of the series",
            "cpus": os.cpu_count(),
            "load_average_at_start": round(load_at_start, 2),
            "python": platform.python_version(),
            "images_per_s": results,
            "durable_write_only_images_per_s": round(floor, 1),
        }
        if "node" in results and "storescp" in results:
            for mode in ("one_association", "four_associations"):
                summary[f"node_vs_storescp_{mode}"] = round(results["node"][mode] / results["storescp"][mode], 3)
        if "node" in results and "orthanc" in results:
            for mode in ("one_association", "four_associations"):
                summary[f"node_vs_orthanc_{mode}"] = round(results["node"][mode] / results["orthanc"][mode], 3)
        if "node" in results and "pynetdicom_noop" in results:
            for mode in ("one_association", "four_associations"):
                summary[f"node_vs_pynetdicom_noop_{mode}"] = round(results["node"][mode] / results["pynetdicom_noop"][mode], 3)
        if "storescp" in results:
            summary["durable_write_only_vs_storescp_one_association"] = round(floor / results["storescp"]["one_association"], 3)
        if "pynetdicom_noop" in results and "storescp" in results:
            for mode in ("one_association", "four_associations"):
                summary[f"pynetdicom_noop_vs_storescp_{mode}"] = round(results["pynetdicom_noop"][mode] / results["storescp"][mode], 3)
        for key, value in summary.items():
            if key.startswith(("node_vs", "durable_write_only_vs", "pynetdicom_noop_vs")):
                print(f"{key}: {value}")
        print(json.dumps(summary))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
