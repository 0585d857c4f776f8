"""``pe-triage infer``: analyse one series folder standalone and print the findings."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pe_triage_node.cli import add_config_option, config_from_args
from pe_triage_node.errors import InputRejected, WeightsError


def _infer(args: argparse.Namespace) -> int:
    """Run the inference engine on one folder (torch is imported here, not at start-up)."""
    from pe_triage_node.inference.engine import InferenceEngine
    from pe_triage_node.inference.result import findings_block
    from pe_triage_node.inference.volume import load_ct_volume

    cfg = config_from_args(args)
    section = cfg.inference
    if args.batch_size is not None:
        section = section.model_copy(update={"batch_size": args.batch_size})
    if args.lung_crop is not None:
        section = section.model_copy(update={"lung_crop": args.lung_crop})
    if args.random_weights:
        print("pe-triage infer: WARNING: --random-weights: the output is MEANINGLESS (smoke tests and benchmarks only)", file=sys.stderr)
    try:
        engine = InferenceEngine.from_config(section, weights_manifest=args.weights, device=args.device, random_weights=args.random_weights)
        # With --outputs the headers are kept: the SR and SCs are rendered from the volume analysed, as in the worker.
        t0 = time.perf_counter()
        volume = load_ct_volume(args.dicom_dir, max_tilt_deg=engine.max_tilt_deg, keep_datasets=True) if args.outputs else None
        load_s = time.perf_counter() - t0
        result = engine.analyse(volume if volume is not None else args.dicom_dir)
        if volume is not None:
            result.timings_s["load"] = round(load_s, 4)
            result.timings_s["total"] = round(result.timings_s["total"] + load_s, 4)
    except WeightsError as exc:
        print(f"pe-triage infer: {exc}", file=sys.stderr)
        return 2
    except InputRejected as exc:
        print(f"pe-triage infer: series rejected: {exc}", file=sys.stderr)
        return 3
    print(findings_block(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(result.to_json(maps=args.maps, indent=1), encoding="utf-8")
        print(f"result written to {args.json}")
    if volume is not None:
        from pe_triage_node.export.messages import write_messages
        from pe_triage_node.export.outputs import OutputSource, standalone_triage, write_outputs
        from pe_triage_node.export.record import ResultRecord

        decision = standalone_triage(result, volume, args.rules).decision
        source = OutputSource.of(result, volume, decision, uid_prefix=cfg.export.uid_prefix)
        paths = write_outputs(source, args.outputs, pngs=True)
        record = ResultRecord.from_analysis(result, decision, volume.datasets[0])
        paths += write_messages(record, args.outputs, uid_prefix=cfg.export.uid_prefix)
        print(f"priority {decision.priority.value}: {decision.explanation}")
        for path in paths:
            print(f"wrote {path}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``infer`` to the ``pe-triage`` command."""
    p = subparsers.add_parser("infer", help="analyse one CT series folder and print the findings (NOT FOR DIAGNOSTIC USE)")
    p.add_argument("dicom_dir", metavar="DICOM_DIR", type=Path, help="folder holding the DICOM files of one CT series")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the full result as JSON")
    p.add_argument("--outputs", type=Path, default=None, metavar="OUT_DIR", help="also write what the node would send, for inspection before connecting anything: the SR, SCs and KOS (DICOM), the HL7 ORU^R01 (OUT_DIR/hl7/) and the FHIR Bundle (OUT_DIR/fhir/)")
    p.add_argument("--rules", type=Path, default=None, metavar="RULES_TOML", help="with --outputs: the priority rules to decide with (default: config/rules.toml, else the packaged defaults)")
    p.add_argument("--maps", choices=("summary", "full", "none"), default="summary", help="Grad-CAM maps in the JSON (default: summary)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="override inference.device")
    p.add_argument("--weights", type=Path, default=None, metavar="MANIFEST", help="weights manifest.json (default: inference.weights_manifest, else models/demo/manifest.json)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per phase-1 batch (override inference.batch_size)")
    p.add_argument("--lung-crop", choices=("auto", "lungmask", "threshold"), default=None, help="override inference.lung_crop")
    p.add_argument("--random-weights", action="store_true", help="random networks: MEANINGLESS output, for smoke tests and benchmarks only")
    add_config_option(p)
    p.set_defaults(handler=_infer)
