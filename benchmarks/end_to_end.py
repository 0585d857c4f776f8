"""End to end: last instance of a 300-slice phantom CTPA acknowledged -> SR stored at the destination.

    .venv/bin/python benchmarks/end_to_end.py [--slices 300] [--random-weights] [--device cpu]

Generates a full-size phantom CTPA (512 x 512, central PE), starts the node as
``pe-triage run`` (SQLite, its default timers: queue and export polls 0.1 s) with a
dcmtk ``storescp`` as its only destination, waits until the worker has loaded the
model and mapped its heap reserve (a running node has), sends the series with one ``storescu`` association
and measures, from the moment ``storescu`` got the last response, the time until
the SR file exists at ``storescp``. Stages come from the node's database and the
worker's timings:

* assembly wait: last instance stored -> series complete and its job queued
* queue wait: infer job queued -> claimed by the worker
* inference: the engine's ``analyse`` inside the worker
* rendering: what is rendered before the SR is stored (the SR; the images come after it)
* store: results row + the SR's export job committed
* export: the SR's export job queued -> SR file written by storescp (poll, association, C-STORE)

Then the engine's own time for the same series (same weights, device and
settings, model already loaded) is measured in this process, after the node has
stopped. Goals: end to end within 1.5 x the engine's own time, and ``overhead_s``
(end to end minus the worker's phase 1 + phase 2 + Grad-CAM, same run) <= 1.0 s.
The last line is one JSON object with all figures. Uses the demo weights (models/demo) when
present, else random weights (the timings are the same; the findings are not).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from pe_triage_node.db.models import Instance, Job, JobEvent, JobKind, Series, TriageResult  # noqa: E402
from pe_triage_node.config import QueueSection  # noqa: E402
from pe_triage_node.db.session import make_engine  # noqa: E402
from tests import node_support, peers  # noqa: E402


def _ts(value: dt.datetime | None) -> float:
    if value is None:
        raise RuntimeError("missing timestamp")
    return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).timestamp()


def make_phantom(out: Path, slices: int, seed: int) -> Path:
    from pe_triage_node.synth.phantom import render_phantom, sample_spec
    from pe_triage_node.synth.rspect import write_phantom_study

    for s in range(seed, seed + 200):
        spec = sample_spec(s, size="full", slices=slices, category="positive", pe_type="acute")
        if any(e.side == "central" for e in spec.emboli):
            return write_phantom_study(render_phantom(spec), out, split="bench").series_dir
    raise RuntimeError("no central-PE phantom found")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--random-weights", action="store_true", help="random weights even when the demo weights exist")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--poll-s", type=float, default=QueueSection().poll_interval_s,
                    help="queue.poll_interval_s and export.poll_interval_s (default: the node's own default)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, outputs)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="pe-triage-e2e-"))
    node: subprocess.Popen[bytes] | None = None
    pacs: subprocess.Popen[bytes] | None = None
    try:
        t = time.perf_counter()
        series_dir = make_phantom(tmp / "phantom", args.slices, args.seed)
        files = sorted(series_dir.glob("*.dcm"))
        print(f"phantom: {len(files)} slices 512 x 512 written in {time.perf_counter() - t:.1f} s", flush=True)

        demo = node_support.DEMO_MANIFEST
        random_weights = args.random_weights or not demo.is_file()
        node_port, pacs_port = peers.free_port(), peers.free_port()
        out = tmp / "pacs"
        out.mkdir()
        pacs = subprocess.Popen([peers.dcmtk("storescp"), "-aet", "PACS", "-od", str(out), str(pacs_port)],
                                env=peers.dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peers.wait_for_port(pacs_port, proc=pacs)
        db_url = f"sqlite:///{tmp / 'var' / 'node.db'}"
        config = node_support.write_node_config(
            tmp, database_url=db_url, receiver_port=node_port, manifest=demo,
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
            sections={
                # the node's defaults for everything that adds latency
                "assembly": {"quiet_period_s": 30.0, "check_interval_s": 2.0},
                "queue": {"poll_interval_s": args.poll_s, "lease_s": 120.0, "heartbeat_s": 15.0},
                "export": {"poll_interval_s": args.poll_s},
                "inference": {"device": args.device, "lung_crop": "auto", "batch_size": 8},
            },
        )
        if random_weights:  # no weights_manifest needed: --random-weights
            text = config.read_text().replace(f"weights_manifest = {json.dumps(str(demo))}\n", "")
            config.write_text(text)
        log_path = tmp / "node.log"
        run_args = ["run", "--no-web", *(["--random-weights"] if random_weights else [])]
        node = node_support.start_node_process(config, run_args, log_path=log_path)
        peers.wait_for_port(node_port, proc=node, timeout=180)
        node_support.wait_until(lambda: " started (device" in log_path.read_text(errors="replace"), 300,
                                "the worker to load the model", procs=[node], log_path=log_path)
        # ... and to map its heap reserve while idle (worker.heap_reserve_mb; a running node has)
        node_support.wait_until(lambda: any(line in log_path.read_text(errors="replace")
                                            for line in ("heap reserve of", "keeps no freed memory")), 60,
                                "the worker to map its heap reserve", procs=[node], log_path=log_path)

        sent = peers.storescu(node_port, [series_dir], timeout=600)
        t_ack = time.time()  # storescu exits right after the last response and the release
        if sent.returncode != 0:
            raise RuntimeError(f"storescu failed: {sent.stderr[-2000:]}")

        def sr_file() -> Path | None:
            return next((p for p in out.iterdir() if p.name.startswith("SR")), None)

        sr = node_support.wait_until(sr_file, args.timeout, "the SR at the destination", every=0.05,
                                     procs=[node], log_path=log_path)
        t_sr = sr.stat().st_mtime
        engine = make_engine(db_url)

        def export_done() -> bool:  # every export job (the SR's, then the images')
            with Session(engine) as s:
                jobs = s.scalars(select(Job.finished_at).where(Job.kind == JobKind.export)).all()
                infer_done = s.scalar(select(func.count()).select_from(Job).where(
                    Job.kind == JobKind.infer, Job.finished_at.is_not(None)))
            return bool(jobs) and bool(infer_done) and all(at is not None for at in jobs)

        node_support.wait_until(export_done, 120, "the export job to complete", procs=[node], log_path=log_path)
        with Session(engine) as s:
            last_stored = _ts(s.scalar(select(func.max(Instance.received_at))))
            series = s.scalars(select(Series)).one()
            infer = s.scalars(select(Job).where(Job.kind == JobKind.infer)).one()
            claimed = _ts(s.scalar(select(JobEvent.at).where(JobEvent.job_id == infer.id, JobEvent.event == "claimed")))
            export = s.scalars(select(Job).where(Job.kind == JobKind.export).order_by(Job.id)).first()  # the SR's
            assert export is not None
            result = s.scalars(select(TriageResult)).one()
            timings = json.loads(result.result_json)["timings_s"]
            priority = result.priority
            completed_at = _ts(series.completed_at)
        engine.dispose()
        stages = {
            "ack_to_last_stored_s": last_stored - t_ack,  # negative: stored before the ack (as it must be)
            "assembly_wait_s": _ts(infer.created_at) - t_ack,
            "queue_wait_s": claimed - _ts(infer.created_at),
            "worker_prepare_s": timings["worker_before_store"] - timings["worker_inference"] - timings["worker_render"],
            "inference_s": timings["worker_inference"],
            "rendering_s": timings["worker_render"],
            "store_s": _ts(export.created_at) - claimed - timings["worker_before_store"],
            "export_s": t_sr - _ts(export.created_at),
        }
        end_to_end = t_sr - t_ack
        print(f"series complete {completed_at - t_ack:+.2f} s after the ack; priority {priority}", flush=True)
    finally:
        if node is not None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(timeout=200)
            except subprocess.TimeoutExpired:
                node.kill()
        peers.stop_process(pacs)

    # the engine's own time for the same series, model loaded, nothing else running
    from pe_triage_node.config import InferenceSection
    from pe_triage_node.inference.engine import InferenceEngine

    section = InferenceSection(device=args.device, lung_crop="auto", batch_size=8,
                               weights_manifest=None if random_weights else demo)
    own = InferenceEngine.from_config(section, random_weights=random_weights)
    t = time.perf_counter()
    own_result = own.analyse(series_dir)
    engine_s = time.perf_counter() - t
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)

    ratio = end_to_end / engine_s
    # the model's own compute inside the worker, same run: what no overhead work can take away
    model_compute = sum(timings.get(k, 0.0) for k in ("phase1", "phase2", "gradcam"))
    overhead = end_to_end - model_compute
    print(f"end to end (last ack -> SR at destination): {end_to_end:.2f} s")
    for k, v in stages.items():
        print(f"  {k:24s} {v:8.2f} s")
    print(f"engine's own time, same series:             {engine_s:.2f} s (stages {own_result.timings_s})")
    print(f"ratio {ratio:.2f} (goal <= 1.5); overhead {end_to_end - engine_s:+.2f} s; "
          f"vs the inference inside the worker {end_to_end / stages['inference_s']:.2f}")
    print(f"model compute in the worker (phase 1 + phase 2 + Grad-CAM) {model_compute:.2f} s; "
          f"overhead_s {overhead:.2f} (goal <= 1.0)")
    print(json.dumps({
        "benchmark": "end_to_end",
        "slices": len(files),
        "matrix": 512,
        "weights": "random" if random_weights else "demo",
        "device": own_result.device,
        "precision": own_result.precision,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "end_to_end_s": round(end_to_end, 3),
        "stages_s": {k: round(v, 3) for k, v in stages.items()},
        "worker_engine_timings_s": timings,
        "engine_own_s": round(engine_s, 3),
        "ratio": round(ratio, 3),
        # the same against the engine's time inside the worker (no second run's noise on a shared CPU)
        "ratio_vs_worker_inference": round(end_to_end / stages["inference_s"], 3),
        "goal_ratio": 1.5,
        "met": ratio <= 1.5,
        "priority": priority,
        "poll_interval_s": args.poll_s,
        # end to end minus the worker's phase 1 + phase 2 + Grad-CAM (issue 12: goal <= 1.0 s on this CPU)
        "model_compute_s": round(model_compute, 3),
        "overhead_s": round(overhead, 3),
        "goal_overhead_s": 1.0,
        "overhead_met": overhead <= 1.0,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
