"""The demo recipe, one command: phantoms -> training -> thresholds -> held-out evaluation -> ``models/demo``.

``python -m training.demo_recipe --out models/demo [--work /tmp/pe-demo]``

1. Generate three phantom sets with :func:`pe_triage_node.synth.rspect.write_rspect_dataset`
   (small size: 128 x 128 pixels, 64-96 slices or ``--slices``): train (seed 1001), validation
   (seed 2002) and a held-out test set (seed 4004, used by nothing but the final evaluation; the generator
   changed since seed 3003 judged earlier weights).
2. Run :func:`training.pipeline.run_pipeline` with the CPU variant: 64 x 64
   windows (recorded in the manifest as ``input_size``, so the engine resizes
   to it), phase 1 for at most ``--phase1-epochs`` epochs and ``--phase1-max-minutes``
   minutes, phase 2 with the paper's settings (200 epochs).
3. Thresholds by Youden's J on validation; weights in fp16 safetensors with a
   sha256 manifest; the held-out set evaluated with the node's own
   :class:`~pe_triage_node.inference.engine.InferenceEngine`; the metrics (95 %
   DeLong intervals), recipe, seeds and data description go into the manifest.

Every step resumes from what ``--work`` holds. Seeds fixed throughout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from training.phase1 import Phase1Config
from training.phase2 import Phase2Config
from training.pipeline import DEMO_INTENDED_USE, PipelineConfig, run_pipeline

log = logging.getLogger(__name__)

SEEDS = {"train": 1001, "val": 2002, "test": 4004, "training": 0}
DEFAULT_STUDIES = {"train": 240, "val": 40, "test": 60}


def parse_slices(text: str) -> int | tuple[int, int]:
    """``--slices``: ``N`` or ``LO-HI`` slices a phantom."""
    lo, _, hi = text.partition("-")
    return (int(lo), int(hi)) if hi else int(lo)


def slices_text(slices: int | tuple[int, int] | None) -> str:
    """The phantoms' slices in words, for the manifest."""
    if slices is None:
        return "64-96 slices of 2.5-4.5 mm"
    lo, hi = (slices, slices) if isinstance(slices, int) else slices
    return f"{lo}-{hi} slices a study (spacing = coverage / slices, 0.8-5 mm)"


def make_phantoms(root: Path, split: str, studies: int, seed: int, *, slices: int | tuple[int, int] | None = None) -> Path:
    """Write (or reuse) one phantom set as an RSPECT-format folder ``root/<split>`` with ``train.csv``."""
    from pe_triage_node.synth.rspect import slices_record, write_rspect_dataset

    out = root / split
    meta = out / "phantoms.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        if m.get("seed") == seed and m.get("studies") == studies and m.get("slices") == slices_record(slices):
            return out
    write_rspect_dataset(out, studies=studies, seed=seed, size="small", slices=slices)
    return out


def run_demo(
    out: Path,
    work: Path,
    *,
    studies: dict[str, int] | None = None,
    input_size: int = 64,
    phase1_epochs: int = 8,
    phase1_max_minutes: float | None = 26.0,
    phase2_epochs: int = 200,
    window_q_floor: float = 0.05,
    slices: int | tuple[int, int] | None = None,
    device: str = "auto",
    init_manifest: Path | None = None,
    neg_position_match: float = 0.0,
    show_progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Run the recipe; returns :func:`run_pipeline`'s result."""
    t0 = time.perf_counter()
    n = {**DEFAULT_STUDIES, **(studies or {})}
    data = work / "phantoms"
    sets = {split: make_phantoms(data, split, n[split], SEEDS[split], slices=slices) for split in ("train", "val", "test")}
    synth_s = round(time.perf_counter() - t0, 1)
    cfg = PipelineConfig(
        input_size=input_size,
        lung_crop="threshold",
        phase1=Phase1Config(
            epochs=phase1_epochs, seed=SEEDS["training"], max_minutes=phase1_max_minutes, device=device,
            init_manifest=str(init_manifest) if init_manifest is not None else None,
            neg_position_match=neg_position_match,
        ),
        phase2=Phase2Config(epochs=phase2_epochs, seed=SEEDS["training"], window_q_floor=window_q_floor, device=device),
        model_name="pe-tcn-attention-demo-phantoms",
        model_version="0.1.0-demo",
        intended_use=DEMO_INTENDED_USE,
        show_progress=show_progress,
    )
    extra = {
        "recipe": command or "python -m training.demo_recipe --out models/demo",
        "seeds": SEEDS,
        "data_description": (
            f"synthetic CTPA phantoms (pe_triage_node.synth, size 'small': 128 x 128 pixels of 2.5-4 mm, {slices_text(slices)}): train {n['train']} studies (seed {SEEDS['train']}), validation {n['val']} (seed {SEEDS['val']}), "
            f"held-out test {n['test']} (seed {SEEDS['test']}, not used in training or threshold choice); study mix of the "
            "generator's default (about 48 % positive, 10 % indeterminate)"
        ),
        "cpu_variant": {
            "input_size": input_size,
            "phase1_epochs": phase1_epochs,
            "phase1_max_minutes": phase1_max_minutes,
            "window_q_floor": window_q_floor,
            "phase1_init": str(init_manifest) if init_manifest is not None else "random",
            "neg_position_match": neg_position_match,
            "note": "paper: 192 x 192 (train crops of 224), 20 epochs, Kinetics-400 pretrained r3d_18; here "
            + ("phase 1 continues from earlier demo weights (phase1.json -> initialised_from)" if init_manifest is not None else "from scratch"),
        },
        "synth_s": synth_s,
    }
    res = run_pipeline(
        (sets["train"], "train"), (sets["val"], "train"), work, out, cfg, test=(sets["test"], "train"), training_extra=extra
    )
    total = round(time.perf_counter() - t0, 1)
    manifest = Path(res["manifest"])
    m = json.loads(manifest.read_text())
    m["training"]["recipe_seconds"] = total
    from training.common import write_json

    write_json(manifest, m)
    write_model_card(out, m, res["test"])
    res["seconds"] = total
    return res


def write_model_card(out: Path, manifest: dict[str, Any], report: dict[str, Any]) -> Path:
    """``OUT/README.md``: what the weights are, how they were made, the held-out table."""
    from pe_triage_node.evaluation import metrics_table

    tr = manifest["training"]
    sub = report.get("subsegmental_only", {})
    det = report.get("study_pe_detection", {})
    lines = [
        f"# {manifest['model_name']} {manifest['model_version']}",
        "",
        f"**{manifest['intended_use']}**",
        "",
        f"Rebuild: `{tr.get('recipe', 'python -m training.demo_recipe --out models/demo')}` "
        f"({tr.get('recipe_seconds', '?')} s on {tr.get('device')} / {tr.get('precision')}; see `manifest.json` -> training).",
        "",
        f"Data: {tr.get('data_description', '')}",
        "",
        f"Input {manifest['input_size']} x {manifest['input_size']} x 10 windows, 1 mm, lung crop `{tr.get('lung_crop')}`; "
        f"phase 1 best epoch {tr['phase1'].get('best_epoch')} of {tr['phase1'].get('epochs_run')}, "
        f"phase 2 best epoch {tr['phase2'].get('best_epoch')} of {tr['phase2'].get('epochs_run')}.",
        "",
        f"## Held-out phantom set ({report['n_studies']} studies, {report['n_windows']} windows), the node's own engine",
        "",
        metrics_table(report),
        "",
        f"Study-level PE detection (consistent labels): sensitivity {det.get('sensitivity')}, specificity {det.get('specificity')}.",
        "",
        f"Studies whose emboli are all subsegmental: {sub.get('n_studies', 0)}, detected {sub.get('detected', 'n/a')} "
        f"(sensitivity {sub.get('sensitivity', 'n/a')}, 95% CI {sub.get('sensitivity_ci95', 'n/a')}).",
        "",
        "ROC curves: `evaluation/roc_<label>.png`; full report: `evaluation/heldout_report.json`.",
        "",
    ]
    path = Path(out) / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.demo_recipe", description="train the demo weights on phantoms (NOT FOR CLINICAL USE)")
    ap.add_argument("--out", type=Path, default=Path("models/demo"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/pe-triage-demo"))
    ap.add_argument("--train-studies", type=int, default=DEFAULT_STUDIES["train"])
    ap.add_argument("--val-studies", type=int, default=DEFAULT_STUDIES["val"])
    ap.add_argument("--test-studies", type=int, default=DEFAULT_STUDIES["test"])
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--phase1-epochs", type=int, default=8)
    ap.add_argument("--phase1-max-minutes", type=float, default=26.0)
    ap.add_argument("--phase2-epochs", type=int, default=200)
    ap.add_argument("--slices", type=parse_slices, default=None, metavar="N|LO-HI",
                    help="slices a phantom (default 64-96, 2.5-4.5 mm; more give thinner ones, e.g. 90-300: 0.8-3 mm)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--init", type=Path, default=None, metavar="MANIFEST",
                    help="start phase 1 from these weights (e.g. the previous models/demo/manifest.json) instead of random ones")
    ap.add_argument("--neg-position-match", type=float, default=0.0,
                    help="share of phase 1's negative windows drawn at the positives' levels in the chest")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from pe_triage_node.evaluation import metrics_table

    res = run_demo(
        args.out,
        args.work,
        studies={"train": args.train_studies, "val": args.val_studies, "test": args.test_studies},
        input_size=args.input_size,
        phase1_epochs=args.phase1_epochs,
        phase1_max_minutes=args.phase1_max_minutes,
        phase2_epochs=args.phase2_epochs,
        slices=args.slices,
        device=args.device,
        init_manifest=args.init,
        neg_position_match=args.neg_position_match,
        show_progress=not args.quiet,
        command="python -m training.demo_recipe " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    print(metrics_table(res["test"]))
    print(json.dumps(res["test"]["subsegmental_only"], indent=1))
    print(f"weights: {res['manifest']} in {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
