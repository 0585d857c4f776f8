"""Write phantoms in the RSPECT layout (the RSNA STR PE challenge's training data).

``OUT/train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` plus
``OUT/train.csv`` (one row per slice, the challenge's columns with the study
labels repeated on every row), ``OUT/train_masks/<SeriesInstanceUID>.npz`` (each
study's embolus voxels, see :func:`pe_triage_node.rspect.read_embolus_mask`) and ``OUT/phantoms.json`` (each study's spec:
emboli, RV/LV ratio, subsegmental flags). The same loader reads this and the
real Kaggle download.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import generate_uid

from pe_triage_node.rspect import CSV_COLUMNS, phantoms_json_name
from pe_triage_node.synth.ct_series import (
    SYNTH_UID_PREFIX,
    StudyIdentity,
    write_ct_series,
)
from pe_triage_node.synth.phantom import render_phantom
from pe_triage_node.synth.sampling import sample_spec, study_seed
from pe_triage_node.synth.spec import (
    DEFAULT_MIX,
    SLICE_LABEL,
    Phantom,
    Size,
)

NOT_FOR_DIAGNOSTIC_USE = "SYNTHETIC PHANTOM - NOT FOR DIAGNOSTIC USE"

_AGENTS = (
    ("OMNIPAQUE 350", "IOHEXOL", 350),
    ("ISOVUE 370", "IOPAMIDOL", 370),
    ("VISIPAQUE 320", "IODIXANOL", 320),
    ("ULTRAVIST 370", "IOPROMIDE", 370),
)
_STUDY_DESCRIPTIONS = (
    "CT ANGIO CHEST PE PROTOCOL",
    "CTA CHEST PULMONARY EMBOLISM W CONTRAST",
    "CT PULMONARY ANGIOGRAM",
    "CTA THORAX PE",
)


@dataclass(frozen=True)
class WrittenStudy:
    """Where one phantom went: its UIDs (SOPs in slice order, inferior first) and series folder."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]
    series_dir: Path


def _uid(*parts: object) -> str:
    """A reproducible UID under the project's synthetic root."""
    return str(generate_uid(SYNTH_UID_PREFIX, entropy_srcs=["pe-triage-node phantom", *map(str, parts)]))


def phantom_identity(seed: int) -> StudyIdentity:
    """Patient and study attributes of the phantom drawn from ``seed`` (reproducible, no real person)."""
    rng = np.random.default_rng([seed, 7])
    age = int(rng.integers(24, 90))
    day = np.datetime64("2025-01-01") + np.timedelta64(int(rng.integers(0, 600)), "D")
    study_date = str(day).replace("-", "")
    birth_year = int(study_date[:4]) - age
    return StudyIdentity(
        study_instance_uid=_uid(seed, "study"),
        patient_id=f"PHANTOM-{seed:010d}",
        patient_name=f"Phantom^{seed:010d}",
        patient_birth_date=f"{birth_year:04d}0101",
        patient_sex=str(rng.choice(["M", "F"])),
        patient_age=f"{age:03d}Y",
        accession_number=f"SYN{seed % 10**10:010d}",
        study_id=str(int(rng.integers(1, 99999))),
        study_description=str(rng.choice(_STUDY_DESCRIPTIONS)),
        study_date=study_date,
        study_time=f"{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}",
    )


def ctpa_attributes(phantom: Phantom) -> dict[str, Any]:
    """CT acquisition and contrast attributes of a CTPA protocol (PS3.3 C.8.2.1, C.7.6.4)."""
    spec = phantom.spec
    rng = np.random.default_rng([spec.seed, 8])
    agent, ingredient, conc = _AGENTS[int(rng.integers(len(_AGENTS)))]
    fov = spec.pixel_spacing * spec.shape[2]
    ma = int(rng.integers(120, 400))
    rot_ms = int(rng.choice([280, 330, 500]))
    return {
        "ImageComments": NOT_FOR_DIAGNOSTIC_USE,
        "ProtocolName": "CTA CHEST PE",
        "ContrastBolusAgent": agent,
        "ContrastBolusRoute": "IV",
        "ContrastBolusVolume": f"{int(rng.integers(50, 90))}",
        "ContrastFlowRate": f"{float(rng.choice([4.0, 4.5, 5.0])):.1f}",
        "ContrastBolusIngredient": ingredient,
        "ContrastBolusIngredientConcentration": f"{conc}",
        "ScanOptions": "HELICAL MODE",
        "KVP": f"{spec.kvp}",
        "DataCollectionDiameter": "500",
        "ReconstructionDiameter": f"{fov:.1f}",
        "GantryDetectorTilt": "0",
        "TableHeight": f"{float(rng.uniform(120, 190)):.1f}",
        "RotationDirection": "CW",
        "ExposureTime": f"{rot_ms}",
        "XRayTubeCurrent": f"{ma}",
        "Exposure": f"{ma * rot_ms // 1000}",
        "FilterType": "BODY FILTER",
        "SpiralPitchFactor": float(rng.choice([0.9, 1.0, 1.2, 1.4])),
        "PatientWeight": f"{70 * spec.anatomy.scale**2 * float(rng.uniform(0.85, 1.3)):.1f}",
    }


def write_phantom_study(phantom: Phantom, out_dir: Path, *, split: str = "train") -> WrittenStudy:
    """Write one phantom as a CT series under ``out_dir/<split>/<study>/<series>/<sop>.dcm``."""
    spec = phantom.spec
    ident = phantom_identity(spec.seed)
    series_uid = _uid(spec.seed, "series")
    sops = [_uid(spec.seed, "sop", i) for i in range(spec.shape[0])]
    series_dir = out_dir / split / ident.study_instance_uid / series_uid
    write_ct_series(
        phantom.volume_hu,
        series_dir,
        pixel_spacing=(spec.pixel_spacing, spec.pixel_spacing),
        slice_spacing=spec.slice_spacing,
        slice_thickness=spec.slice_thickness,
        study=ident,
        series_instance_uid=series_uid,
        series_number=int(np.random.default_rng([spec.seed, 9]).integers(2, 9)),
        series_description=f"CTA PE {spec.slice_thickness:.2g}mm {spec.kernel}",
        kernel=spec.kernel,
        origin=spec.origin,
        extra=ctpa_attributes(phantom),
        sop_instance_uids=sops,
        frame_of_reference_uid=_uid(spec.seed, "frame"),
        name_files_by_uid=True,
    )
    return WrittenStudy(ident.study_instance_uid, series_uid, tuple(sops), series_dir)


def write_study_mask(phantom: Phantom, written: WrittenStudy, out_dir: Path, *, split: str = "train") -> Path:
    """The study's embolus mask beside the CSV (``<split>_masks/<SeriesInstanceUID>.npz``), one plane per
    SOP instance in its pixel grid, aligned with the CSV's ``pe_present_on_image`` (both come from the
    same rendered embolus voxels). Needs a phantom rendered with ``keep_masks``."""
    from pe_triage_node.rspect import mask_path, write_embolus_mask

    if phantom.embolus_index is None:
        raise ValueError("render the phantom with keep_masks=True to write its embolus mask")
    return write_embolus_mask(mask_path(out_dir, split, written.series_instance_uid), phantom.embolus_index, written.sop_instance_uids)


def csv_rows(phantom: Phantom, written: WrittenStudy) -> list[dict[str, Any]]:
    """``train.csv`` rows of one study, in slice order (inferior first)."""
    study = phantom.labels.as_dict()
    reasons = phantom.spec.indeterminate_reasons
    flags = {
        "qa_motion": int("qa_motion" in reasons),
        "qa_contrast": int("qa_contrast" in reasons),
        "flow_artifact": int(phantom.spec.flow_artifact),
        "true_filling_defect_not_pe": 0,
    }
    rows = []
    for sop, present in zip(written.sop_instance_uids, phantom.pe_present_on_image):
        row: dict[str, Any] = {
            "StudyInstanceUID": written.study_instance_uid,
            "SeriesInstanceUID": written.series_instance_uid,
            "SOPInstanceUID": sop,
            SLICE_LABEL: int(present),
        }
        row.update(study)
        row.update(flags)
        rows.append({k: row[k] for k in CSV_COLUMNS})
    return rows


def phantom_record(phantom: Phantom, written: WrittenStudy) -> dict[str, Any]:
    """The ``phantoms.json`` entry of one study: spec summary, labels, emboli (with subsegmental flags)."""
    rec = phantom.spec.summary()
    emboli = phantom.emboli_records()
    rec.update(
        StudyInstanceUID=written.study_instance_uid,
        SeriesInstanceUID=written.series_instance_uid,
        labels=phantom.labels.as_dict(),
        positive_slices=int(phantom.pe_present_on_image.sum()),
        n_emboli=len(emboli),
        subsegmental_only=bool(emboli) and all(e["subsegmental"] for e in emboli),
        emboli=emboli,
    )
    return rec


def slices_record(slices: int | tuple[int, int] | None) -> int | list[int] | None:
    """``slices`` as ``phantoms.json`` keeps it (a range as a list)."""
    return list(slices) if isinstance(slices, tuple) else slices


def write_rspect_dataset(
    out_dir: Path,
    *,
    studies: int,
    seed: int,
    size: Size = "small",
    slices: int | tuple[int, int] | None = None,
    split: str = "train",
    mix: dict[str, float] | None = None,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Generate ``studies`` phantoms (study i from :func:`study_seed` (seed, i)) into ``out_dir``.

    Writes the DICOM tree, ``<split>.csv`` and ``phantoms.json`` (train) or
    ``phantoms_<split>.json``; returns the records of that JSON file. ``progress(i, record)`` is called after each study.
    """
    if studies < 1:
        raise ValueError("studies must be >= 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    csv_path = out_dir / f"{split}.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        for i in range(studies):
            t0 = time.perf_counter()
            s = study_seed(seed, i)
            phantom = render_phantom(sample_spec(s, size=size, slices=slices, mix=mix), keep_masks=True)
            written = write_phantom_study(phantom, out_dir, split=split)
            write_study_mask(phantom, written, out_dir, split=split)
            writer.writerows(csv_rows(phantom, written))
            fh.flush()
            rec = phantom_record(phantom, written)
            rec["index"] = i
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            records.append(rec)
            if progress is not None:
                progress(i, rec)
    meta = {
        "generator": "pe_triage_node.synth.phantom",
        "intended_use": "software testing and demonstration training only; not patient data, not for diagnostic use",
        "seed": seed,
        "size": size,
        "split": split,
        "studies": studies,
        "slices": slices_record(slices),
        "mix": mix or DEFAULT_MIX,
        "study_seed": "numpy SeedSequence([seed, index]).generate_state(1)[0]",
        "records": records,
    }
    (out_dir / phantoms_json_name(split)).write_text(json.dumps(meta, indent=1))
    return records


__all__: Sequence[str] = (
    "WrittenStudy",
    "csv_rows",
    "ctpa_attributes",
    "phantom_identity",
    "phantom_record",
    "write_phantom_study",
    "write_rspect_dataset",
    "write_study_mask",
)
