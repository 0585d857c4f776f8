"""Helpers for the export tests: a tiny CTPA-like series, a real StudyResult from it, validators.

The result comes from the real inference engine with random weights at a small
input size (seconds on a CPU): its numbers mean nothing, but its structure
(labels, windows, Grad-CAM maps with slice indices and SOP UIDs) is exactly
what the worker hands to the exporter.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import numpy as np

from pe_triage_node.inference.labels import STUDY_LABELS, WINDOW_LABEL
from pe_triage_node.inference.result import StudyResult
from pe_triage_node.inference.volume import CTVolume, load_ct_volume
from pe_triage_node.rules import Priority, PriorityDecision
from pe_triage_node.synth.ct_series import StudyIdentity, write_ct_series

PATIENT_NAME = "Export^Test"
PATIENT_ID = "EXPORT-0001"
IDENTITY = StudyIdentity(
    study_instance_uid="1.2.826.0.1.3680043.10.1453.77.1",
    patient_id=PATIENT_ID,
    patient_name=PATIENT_NAME,
    accession_number="ACC77",
)
SERIES_UID = "1.2.826.0.1.3680043.10.1453.77.2"
#: A contrast-enhanced CTPA says so (the synthetic chest also has an enhanced pulmonary trunk).
CONTRAST = {"ContrastBolusAgent": "IOMEPROL 350"}


def chest_volume(nz: int = 30, n: int = 64) -> np.ndarray:
    """(z, y, x) HU: body ellipse, two lungs, an enhanced pulmonary trunk with a dark filling defect."""
    z, y, x = np.mgrid[:nz, :n, :n]
    c = n / 2
    vol = np.full((nz, n, n), -1000.0, dtype=np.float32)
    vol[((y - c) / (0.42 * n)) ** 2 + ((x - c) / (0.47 * n)) ** 2 < 1] = 40.0
    for side in (-1, 1):
        lung = ((y - c) / (0.3 * n)) ** 2 + ((x - c - side * 0.22 * n) / (0.15 * n)) ** 2 < 1
        vol[lung & (z >= 3) & (z < nz - 3)] = -850.0
    trunk = ((y - c + 4) ** 2 + (x - c) ** 2 < 25) & (z >= 8) & (z < 22)
    vol[trunk] = 350.0  # contrast-filled artery
    vol[trunk & ((y - c + 4) ** 2 + (x - c - 1) ** 2 < 5) & (z >= 12) & (z < 16)] = 30.0  # embolus
    return vol


def write_series(out_dir: Path) -> Path:
    """30 axial slices of 64 x 64 at 1.5 mm, 2 mm apart, one series of :data:`IDENTITY`'s study."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_ct_series(chest_volume(), out_dir, pixel_spacing=(1.5, 1.5), slice_spacing=2.0, study=IDENTITY,
                    series_instance_uid=SERIES_UID, extra=CONTRAST)
    return out_dir


#: A private element holding text in a binary VR, as a Philips scanner writes (01F1,1026):
#: pydicom raises ``BytesLengthException`` when anything converts it.
MALFORMED_TAG = 0x01F11026


def add_malformed_private_element(paths: list[Path]) -> None:
    """Give every file a private (01F1,1026) element of VR FD holding 6 bytes of text (FD needs multiples of 8).

    Written as SH (same explicit-VR header layout), then the VR bytes patched to FD.
    """
    import pydicom

    for path in paths:
        ds = pydicom.dcmread(path)
        ds.add_new(0x01F10010, "LO", "ELSCINT1")
        ds.add_new(MALFORMED_TAG, "SH", "V1.0 ")
        ds.save_as(path, enforce_file_format=True)
        raw = path.read_bytes()
        marker = bytes.fromhex("f1012610") + b"SH"
        if raw.count(marker) != 1:
            raise RuntimeError(f"{path.name}: the private element is not where it was written")
        path.write_bytes(raw.replace(marker, bytes.fromhex("f1012610") + b"FD"))


def load_volume(series_dir: Path) -> CTVolume:
    """The series as the worker loads it: HU volume and headers (what the outputs are rendered from)."""
    return load_ct_volume(series_dir, keep_datasets=True)


def analyse(series_dir: Path, seed: int = 0) -> StudyResult:
    """The engine's result for ``series_dir`` with random weights (meaningless numbers, real structure)."""
    from pe_triage_node.inference.engine import InferenceEngine
    from pe_triage_node.inference.weights import random_model

    engine = InferenceEngine(random_model(seed, input_size=32), device="cpu", precision="fp32", batch_size=4, lung_crop="threshold")
    return engine.analyse(series_dir)


def positive(result: StudyResult) -> StudyResult:
    """``result`` with a consistent positive label set: acute central + right PE, RV/LV >= 1."""
    labels = {k: False for k in STUDY_LABELS}
    labels.update({WINDOW_LABEL: True, "central_pe": True, "rightsided_pe": True, "rv_lv_ratio_gte_1": True})
    return dataclasses.replace(result, labels=labels)


def minimal_result() -> StudyResult:
    """A positive StudyResult built directly (no engine, no series, no Grad-CAM): acute central and right PE,
    RV/LV >= 1, probability 0.7 for each positive label and 0.1 for the others; what the exporter reads."""
    labels = {k: False for k in STUDY_LABELS}
    labels.update({WINDOW_LABEL: True, "central_pe": True, "rightsided_pe": True, "rv_lv_ratio_gte_1": True})
    return StudyResult(
        model_name="test-model", model_version="1.0", intended_use="tests", meaningless=True,
        series_instance_uid=SERIES_UID, study_instance_uid=IDENTITY.study_instance_uid,
        probabilities={k: 0.7 if labels[k] else 0.1 for k in STUDY_LABELS}, window_probabilities=[0.2, 0.9],
        phase1_window_probabilities=[0.2, 0.9], labels=labels, window_labels=[False, True], consistency={"chosen": "positive"},
        thresholds={k: 0.5 for k in labels}, attention={k: [0.5, 0.5] for k in STUDY_LABELS}, gradcam=[], windows=[],
        lung_crop_method="threshold", crop={}, geometry={}, device="cpu", precision="fp32", timings_s={},
    )


def negative(result: StudyResult) -> StudyResult:
    """``result`` with a consistent negative label set and no Grad-CAM maps."""
    labels = {k: False for k in STUDY_LABELS}
    labels.update({WINDOW_LABEL: False, "negative_exam_for_pe": True})
    return dataclasses.replace(result, labels=labels, gradcam=[])


def decision(priority: Priority = Priority.STAT, rule: str | None = "Central PE", flags: tuple[str, ...] = ()) -> PriorityDecision:
    return PriorityDecision(priority=priority, rule_name=rule, rule_number=1 if rule else None, flags=flags, explanation="test")


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dicom3tools' ``dciodvfy`` prints for one file (its IOD check)."""
    if shutil.which("dciodvfy") is None:
        raise RuntimeError("dciodvfy (dicom3tools) is not installed: apt-get install dicom3tools")
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def dsrdump(path: Path) -> str:
    """dcmtk's ``dsrdump`` of an SR file; raises when it cannot parse the document."""
    proc = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"dsrdump failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout
