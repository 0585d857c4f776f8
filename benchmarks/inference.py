"""Benchmark the inference engine on a synthetic 300-slice 512 x 512 CTPA-sized study.

Prints the time of each stage, phase 1 beside its FLOP-bound time on this
machine (windows x GFLOP per window, counted with torch.utils.flop_counter, /
the GFLOP/s of a conv3d probe measured in this run in fp32 and bf16), peak
memory, and as the last line one JSON object with all figures. Random
weights: the findings are meaningless, the timings are not.

    .venv/bin/python benchmarks/inference.py [--slices 300] [--device cpu] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pe_triage_node.inference.engine import InferenceEngine, cpu_has_native_bf16, resolve_device, resolve_precision
from pe_triage_node.inference.networks import WindowEncoder
from pe_triage_node.inference.weights import random_model
from pe_triage_node.synth.ct_series import write_ct_series

GOAL_RATIO = 1.3


def chest_phantom(nz: int, n: int, pixel_mm: float, seed: int = 0) -> np.ndarray:
    """Body, two lungs (z 8 %..92 %), mediastinum with contrast-filled vessels, spine; 10 HU noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:n, :n].astype(np.float32) * pixel_mm
    c = n * pixel_mm / 2
    vol = np.full((nz, n, n), -1000.0, dtype=np.float32)
    body = ((y - c) / 130) ** 2 + ((x - c) / 170) ** 2 < 1
    spine = ((y - c - 85) / 18) ** 2 + ((x - c) / 18) ** 2 < 1
    for k in range(nz):
        t = k / nz
        sl = vol[k]
        sl[body] = 40.0
        if 0.08 < t < 0.92:
            s = np.sin(np.pi * (t - 0.08) / 0.84) ** 0.5
            for side in (-1, 1):
                lung = ((y - c + 5) / (90 * s)) ** 2 + ((x - c - side * 75) / (55 * s)) ** 2 < 1
                sl[lung] = -850.0
            sl[((y - c) / 35) ** 2 + ((x - c - 20) / 45) ** 2 < 1] = 300.0  # contrast-filled heart/vessels
        sl[spine] = 500.0
        sl += rng.normal(0, 10, sl.shape).astype(np.float32)
    return vol


def _write_study(tmp: Path, slices: int, size: int, pixel_mm: float, slice_mm: float) -> None:
    vol = chest_phantom(slices, size, pixel_mm)
    write_ct_series(vol, tmp / "series", pixel_spacing=(pixel_mm, pixel_mm), slice_spacing=slice_mm)
    small = vol[:40, ::4, ::4].copy()
    write_ct_series(small, tmp / "warm", pixel_spacing=(pixel_mm * 4, pixel_mm * 4), slice_spacing=slice_mm)


def conv3d_probe(precision: str, device: torch.device, repeats: int = 3) -> float:
    """GFLOP/s of one r3d_18-like 3x3x3 convolution (64 -> 64 channels, 4 x 10 x 96 x 96)."""
    conv = torch.nn.Conv3d(64, 64, 3, padding=1, bias=False).to(device).eval()
    x = torch.rand(4, 64, 10, 96, 96, device=device).contiguous(memory_format=torch.channels_last_3d)
    conv = conv.to(memory_format=torch.channels_last_3d)
    flop = 2 * 64 * 64 * 27 * 10 * 96 * 96 * 4
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    best = float("inf")
    with torch.inference_mode(), ctx:
        conv(x)
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            conv(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
    return flop / best / 1e9


def window_gflop(input_size: int = 192) -> float:
    """FLOP of one phase-1 forward (3 x 10 x S x S), from torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    enc = WindowEncoder().eval()
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        enc(torch.zeros(1, 3, 10, input_size, input_size))
    return counter.get_total_flops() / 1e9


def phase1_layout_probe(engine: InferenceEngine, batch: int) -> dict[str, float]:
    """Seconds per window of phase 1 in channels-first vs channels-last 3-D layout (same batch)."""
    out = {}
    x = torch.rand(batch, 3, 10, engine.input_size, engine.input_size, device=engine.device).to(engine.input_dtype)
    enc = engine.window_encoder
    amp = engine.device.type == "cuda" and engine.precision != "fp32"
    dtype = torch.bfloat16 if engine.precision == "bf16" else torch.float16
    for name, fmt in (("channels_first", torch.contiguous_format), ("channels_last", torch.channels_last_3d)):
        enc.to(memory_format=fmt)
        xi = x.contiguous(memory_format=fmt)
        with torch.inference_mode(), torch.autocast(engine.device.type, dtype=dtype, enabled=amp):
            enc(xi[:1])
            t = time.perf_counter()
            enc(xi)
            out[name] = (time.perf_counter() - t) / batch
    enc.to(memory_format=torch.channels_last_3d if engine.channels_last else torch.contiguous_format)
    return out


def _memory_only(series: Path, device: torch.device, precision: str, batch_size: int) -> int:
    from pe_triage_node.inference.preprocess import prepare_study
    from pe_triage_node.inference.volume import load_ct_volume

    engine = InferenceEngine(random_model(0), device=str(device), precision=precision, batch_size=batch_size, lung_crop="threshold")  # type: ignore[arg-type]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    vol = load_ct_volume(series)
    prepared = prepare_study(vol, device=engine.device, input_size=engine.input_size)
    with torch.inference_mode():
        for start in (0, batch_size):
            x = prepared.window_batch(start, min(prepared.n_windows, start + batch_size), channels_last=engine.channels_last)
            engine.window_encoder(x.to(engine.input_dtype))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{vol.shape[0]} slices, {prepared.n_windows} windows: peak RSS {peak:.0f} MB (engine loaded: {rss0:.0f} MB)")
    print(json.dumps({"benchmark": "inference-memory", "slices": vol.shape[0], "windows": prepared.n_windows, "peak_rss_mb": round(peak), "engine_rss_mb": round(rss0), "precision": engine.precision}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--pixel-mm", type=float, default=0.7)
    ap.add_argument("--slice-mm", type=float, default=1.0)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--memory-only",
        action="store_true",
        help="peak memory of load + preprocess + two phase-1 batches only (phase-1 memory does not grow with the study), no timing figures",
    )
    ap.add_argument("--layout-probe", action="store_true", help="also time phase 1 channels-first vs channels-last (costs ~2 x batch windows)")
    args = ap.parse_args()

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)  # type: ignore[arg-type]
    print(f"device {device}, precision {precision}, torch {torch.__version__}, threads {torch.get_num_threads()}, native bf16 {cpu_has_native_bf16()}", flush=True)

    with tempfile.TemporaryDirectory(prefix="petriage-bench-") as tmp:
        t = time.perf_counter()
        # Written in a child process, so this process's peak RSS is the engine's alone.
        writer = multiprocessing.get_context("fork").Process(target=_write_study, args=(Path(tmp), args.slices, args.size, args.pixel_mm, args.slice_mm))
        writer.start()
        writer.join()
        if writer.exitcode != 0:
            raise SystemExit(f"writing the phantom study failed (exit {writer.exitcode})")
        print(f"wrote {args.slices} slices {args.size}x{args.size} in {time.perf_counter() - t:.1f} s", flush=True)

        if args.memory_only:
            return _memory_only(Path(tmp) / "series", device, precision, args.batch_size)
        gflop = window_gflop()
        kinds = ["fp32"] + (["bf16"] if precision == "bf16" or cpu_has_native_bf16() or device.type == "cuda" else [])
        probe_before = {k: conv3d_probe(k, device) for k in kinds}
        print(f"phase-1 window: {gflop:.1f} GFLOP (flop counter); conv3d probe GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in probe_before.items()), flush=True)

        engine = InferenceEngine(
            random_model(0), device=str(device), precision=precision, batch_size=args.batch_size, lung_crop="threshold"  # type: ignore[arg-type]
        )
        engine.analyse(Path(tmp) / "warm")  # first-call kernel set-up, not part of the study time
        layout = phase1_layout_probe(engine, args.batch_size) if args.layout_probe else {}
        if layout:
            print("phase-1 s/window: " + ", ".join(f"{k} {v:.3f}" for k, v in layout.items()), flush=True)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        load_before = os.getloadavg()[0]
        result = engine.analyse(Path(tmp) / "series")
        load_after = os.getloadavg()[0]
        # Probe again right after the study: on a shared machine the rate drifts; the bound uses the mean.
        probe_after = {k: conv3d_probe(k, device) for k in kinds}
        probe = {k: (probe_before[k] + probe_after[k]) / 2 for k in kinds}

    n_windows = len(result.windows)
    probe_rate = probe.get(precision, probe["fp32"])
    bound = n_windows * gflop / probe_rate
    total = result.timings_s["total"]
    phase1 = result.timings_s["phase1"]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for k, v in result.timings_s.items():
        print(f"  {k:<12} {v:7.2f} s")
    print(f"windows {n_windows} (crop z {result.crop['z']}), phase 1 {phase1:.2f} s vs FLOP-bound {bound:.2f} s ({phase1 / bound:.2f}x); "
          f"whole study {total:.2f} s = {total / bound:.2f}x FLOP-bound (goal <= {GOAL_RATIO}x); peak RSS {peak_mb:.0f} MB")
    summary = {
        "benchmark": "inference",
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "precision": precision,
        "batch_size": args.batch_size,
        "channels_last": engine.channels_last,
        "slices": args.slices,
        "matrix": args.size,
        "windows": n_windows,
        "timings_s": result.timings_s,
        "window_gflop": round(gflop, 1),
        "probe_gflops": {k: round(v, 1) for k, v in probe.items()},
        "probe_gflops_before_after": {k: [round(probe_before[k], 1), round(probe_after[k], 1)] for k in kinds},
        "load_average_before_after": [round(load_before, 2), round(load_after, 2)],
        "phase1_s_per_window": round(phase1 / n_windows, 3),
        "phase1_flop_bound_s": round(bound, 2),
        "phase1_vs_bound": round(phase1 / bound, 2),
        "total_vs_bound": round(total / bound, 2),
        "goal_met": total <= GOAL_RATIO * bound,
        "layout_probe_s_per_window": {k: round(v, 3) for k, v in layout.items()},
        "peak_rss_mb": round(peak_mb),
        "rss_before_study_mb": round(rss_before),
        "lung_crop": result.lung_crop_method,
        "meaningless_findings": result.meaningless,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
