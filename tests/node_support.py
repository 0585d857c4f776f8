"""Helpers for the worker, fault and acceptance tests: a tiny model, node configs, seeded series, the node as processes.

The tiny model is the real network architecture with random weights at a 32-pixel
input (a second or two per small series on a CPU): its numbers mean nothing,
its structure is exactly the real one. Tests that compare findings compare them
with what the node stored and with what the rules decide, never with truth, so
they also pass with the shipped demo weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from pe_triage_node.db.models import Instance, JobKind, Series, SeriesState, Study
from pe_triage_node.queue import enqueue

from tests import export_support, peers

PROJECT_ROOT = peers.PROJECT_ROOT
DEMO_MANIFEST = PROJECT_ROOT / "models" / "demo" / "manifest.json"


def tiny_manifest(out_dir: Path, seed: int = 0) -> Path:
    """Random weights at a 32-pixel input saved as a weights folder; returns its manifest."""
    from pe_triage_node.inference.weights import random_model, save_weights

    model = random_model(seed, input_size=32)
    return save_weights(
        out_dir, model.phase1, model.phase2, model_name="pe-triage-test-random", model_version=f"test-random-{seed}",
        intended_use="NONE: random weights for tests", input_size=32, dtype="float32",
    )


def toml_value(value: Any) -> str:
    """A TOML value for strings, numbers, booleans and lists of them (JSON's syntax is TOML's here)."""
    if isinstance(value, Path):
        value = str(value)
    return json.dumps(value)


def write_node_config(
    tmp: Path,
    *,
    database_url: str,
    receiver_port: int,
    manifest: Path,
    destinations: Sequence[Mapping[str, Any]] = (),
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """A node.toml with all state under ``tmp/var``, loopback ports and fast timers for tests."""
    base: dict[str, dict[str, Any]] = {
        "node": {"var_dir": tmp / "var", "log_level": "INFO"},
        "receiver": {"host": "127.0.0.1", "port": receiver_port, "min_free_mb": 0},
        "database": {"url": database_url},
        "assembly": {"quiet_period_s": 5.0, "check_interval_s": 0.5},
        # the small phantoms (tests' CTPAs) have slices of up to 5 mm; the default refuses thicker than 3 mm
        "selection": {"max_slice_thickness_mm": 6.0},
        "inference": {"device": "cpu", "weights_manifest": manifest, "lung_crop": "threshold", "batch_size": 4},
        "queue": {"poll_interval_s": 0.2, "lease_s": 30.0, "heartbeat_s": 2.0},
        "export": {"poll_interval_s": 0.2, "backoff_base_s": 0.5, "backoff_cap_s": 2.0},
        "worker": {"run_web": False, "backoff_base_s": 0.5, "backoff_cap_s": 2.0},
    }
    for name, values in (sections or {}).items():
        base.setdefault(name, {}).update(values)
    lines: list[str] = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    for dest in destinations:
        lines.append("[[export.destinations]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in dest.items()]
        lines.append("")
    path = tmp / "node.toml"
    path.write_text("\n".join(lines))
    return path


def tiny_series(out_dir: Path, study_uid: str, series_uid: str, *, slices: int = 30) -> list[Path]:
    """A small chest-like CT series (64 x 64, ``slices`` slices) of its own study."""
    from pe_triage_node.synth.ct_series import StudyIdentity, write_ct_series

    ident = StudyIdentity(study_instance_uid=study_uid, patient_id="WORKER-TEST", patient_name="Worker^Test")
    return write_ct_series(
        export_support.chest_volume(nz=slices), out_dir, pixel_spacing=(1.5, 1.5), slice_spacing=2.0,
        study=ident, series_instance_uid=series_uid, name_files_by_uid=True, extra=export_support.CONTRAST,
    )


def phantom_ctpa(tmp: Path, seed: int, case: str, *, slices: int = 40) -> Path:
    """A small phantom CTPA study of a demo ``case`` ("central": an acute central embolus, "negative", ...;
    the phantom the demo sends for that seed, slices of at most 3 mm); returns its series folder."""
    from pe_triage_node.services.demo import demo_phantom

    return demo_phantom(case, tmp, slices=slices, seed=seed)[0]


def seed_selected_series(
    engine: Engine, spool_dir: Path, files: Sequence[Path], *, generation: int = 0, max_attempts: int = 3,
    priority: int = 0, receiving: bool = False,
) -> int:
    """Put ``files`` (one series) in the spool with their rows, series ``selected``, and queue its
    ``infer`` job as the assembler does; returns the job id. Called again for the same series
    (with more files and a higher ``generation``) it re-opens it as late instances do.
    ``receiving``: the series is still arriving (no job queued; returns 0)."""
    import pydicom

    from pe_triage_node.dicom.spool import Spool

    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    first = headers[0]
    with Session(engine) as s, s.begin():
        series = s.scalars(select(Series).where(Series.series_instance_uid == first.SeriesInstanceUID)).one_or_none()
        if series is None:
            # PatientID clipped to the column as the receiver's index does (dicom/index.py)
            study = Study(study_instance_uid=first.StudyInstanceUID, patient_id=str(first.get("PatientID", ""))[:64])
            s.add(study)
            s.flush()
            series = Series(study_id=study.id, series_instance_uid=first.SeriesInstanceUID, modality="CT")
            s.add(series)
        state = SeriesState.receiving if receiving else SeriesState.selected
        series.state, series.generation, series.instance_count = state, generation, len(files)
        s.flush()
        known = set(s.scalars(select(Instance.sop_instance_uid).where(Instance.series_id == series.id)))
        for path, ds in zip(files, headers):
            if ds.SOPInstanceUID in known:
                continue
            rel = Spool.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            target = spool_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            s.add(Instance(
                series_id=series.id, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), spool_path=rel,
                size_bytes=target.stat().st_size,
            ))
        if receiving:
            return 0
        job = enqueue(
            s, JobKind.infer, priority=priority, study_instance_uid=first.StudyInstanceUID,
            series_instance_uid=first.SeriesInstanceUID,
            payload={"series_instance_uid": first.SeriesInstanceUID, "study_instance_uid": first.StudyInstanceUID,
                     "generation": generation, "instance_count": len(files)},
            dedupe_key=f"infer:{first.SeriesInstanceUID}:{generation}", max_attempts=max_attempts,
        )
        return int(job.id)


def start_node_process(
    config: Path, args: Sequence[str], *, log_path: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``python -m pe_triage_node.cli ARGS --config CONFIG`` from the project root, output to ``log_path``."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env["TCP_NODELAY"] = "1"
    full_env.update(env or {})
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    cmd = [sys.executable, "-m", "pe_triage_node.cli", *args, "--config", str(config)]
    return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)


def wait_until(condition: Callable[[], Any], timeout: float, what: str, *, every: float = 0.2,
               procs: Sequence[subprocess.Popen[bytes]] = (), log_path: Path | None = None) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` (and the log tail) on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{proc.args!r} exited with {proc.returncode} while waiting for {what}\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{_tail(log_path)}")
        time.sleep(every)


def _tail(path: Path | None, chars: int = 6000) -> str:
    if path is None or not path.is_file():
        return ""
    return path.read_text(errors="replace")[-chars:]
