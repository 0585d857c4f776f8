"""``pe-triage synth``: generate synthetic CTPA phantoms in the RSPECT layout."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def _slices(text: str) -> int | tuple[int, int]:
    """``N`` or ``MIN-MAX`` slices per study."""
    try:
        if "-" in text:
            lo, hi = (int(v) for v in text.split("-", 1))
            if not 8 <= lo <= hi <= 2000:
                raise ValueError
            return lo, hi
        n = int(text)
        if not 8 <= n <= 2000:
            raise ValueError
        return n
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX slices (8..2000), got {text!r}") from None


def _synth(args: argparse.Namespace) -> int:
    """Generate the phantoms and report one line per study on stderr."""
    from pe_triage_node.rspect import phantoms_json_name
    from pe_triage_node.synth.rspect import write_rspect_dataset

    out: Path = args.out_dir
    split_dir = out / args.split
    if split_dir.exists() and any(split_dir.iterdir()):
        if not args.overwrite:
            print(f"pe-triage synth: {split_dir} is not empty (--overwrite replaces it)", file=sys.stderr)
            return 2
        if not (out / phantoms_json_name(args.split)).is_file():
            print(f"pe-triage synth: {split_dir} was not written by pe-triage synth; not replacing it", file=sys.stderr)
            return 2
        shutil.rmtree(split_dir)
        if (out / f"{args.split}_masks").is_dir():
            shutil.rmtree(out / f"{args.split}_masks")
    t0 = time.perf_counter()

    def progress(i: int, rec: dict[str, Any]) -> None:
        if args.quiet:
            return
        positive = [k for k, v in rec["labels"].items() if v]
        print(
            f"[{i + 1}/{args.studies}] seed={rec['seed']} {rec['category']:<13} "
            f"slices={rec['shape_zyx'][0]} pe_slices={rec['positive_slices']} emboli={rec['n_emboli']} "
            f"labels={','.join(positive)} {rec['seconds']:.1f}s",
            file=sys.stderr,
        )

    records = write_rspect_dataset(
        out,
        studies=args.studies,
        seed=args.seed,
        size=args.size,
        slices=args.slices,
        split=args.split,
        progress=progress,
    )
    n_pos = sum(1 for r in records if r["positive_slices"] > 0)
    print(
        f"wrote {len(records)} studies ({n_pos} with PE) to {out} in {time.perf_counter() - t0:.1f}s: "
        f"{args.split}/, {args.split}.csv, {args.split}_masks/, {phantoms_json_name(args.split)} (synthetic, NOT FOR DIAGNOSTIC USE)"
    )
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``synth`` to the ``pe-triage`` command."""
    p = subparsers.add_parser(
        "synth",
        help="generate synthetic CTPA phantoms with planted emboli (RSPECT layout: DICOM tree + train.csv)",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="output folder")
    p.add_argument("--studies", type=int, default=10, help="number of studies (default 10)")
    p.add_argument("--seed", type=int, default=0, help="data-set seed; study i uses study_seed(seed, i) (default 0)")
    p.add_argument(
        "--size",
        choices=("small", "full"),
        default="small",
        help="small: 128² × 64-96 slices (CPU training, tests); full: 512² × 200-400 slices, 0.6-3 mm (default small)",
    )
    p.add_argument("--slices", type=_slices, default=None, metavar="N|MIN-MAX", help="slices per study (default by size)")
    p.add_argument("--split", default="train", help="folder and CSV name (default train, as in RSPECT)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier pe-triage synth output of the same split")
    p.add_argument("--quiet", action="store_true", help="no per-study lines")
    p.set_defaults(handler=_synth)
