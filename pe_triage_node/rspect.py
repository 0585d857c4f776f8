"""The RSPECT layout (the RSNA STR PE challenge's training data): read and write what lies beside the DICOM.

``DATA/<split>.csv`` (one row per slice, the challenge's columns, the study labels
repeated on every row), ``DATA/<split>/<StudyInstanceUID>/<SeriesInstanceUID>/*.dcm``
and, where a data set ships them (the phantoms do), embolus masks in
``DATA/<split>_masks/<SeriesInstanceUID>.npz`` and the phantoms' specs in
``phantoms.json``. The Kaggle download and the phantoms are read by the same code.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pe_triage_node.inference.labels import (  # no torch import
    STUDY_LABELS,
    WINDOW_LABEL,
)

# Column order of the Kaggle ``train.csv`` (a superset of the ten labels: the
# four QA/finding flags are kept so that one reader serves both data sets).
CSV_COLUMNS: tuple[str, ...] = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "pe_present_on_image",
    "negative_exam_for_pe",
    "qa_motion",
    "qa_contrast",
    "flow_artifact",
    "rv_lv_ratio_gte_1",
    "rv_lv_ratio_lt_1",
    "leftsided_pe",
    "chronic_pe",
    "true_filling_defect_not_pe",
    "rightsided_pe",
    "acute_and_chronic_pe",
    "central_pe",
    "indeterminate",
)
LABEL_COLUMNS: tuple[str, ...] = (WINDOW_LABEL,) + STUDY_LABELS

@dataclass
class RspectStudy:
    """One study of an RSPECT-format CSV: its series folder, per-slice labels by SOP and study labels."""

    study_instance_uid: str
    series_instance_uid: str
    series_dir: Path
    slice_labels: dict[str, int]  # SOPInstanceUID -> pe_present_on_image
    labels: dict[str, int]  # nine study labels
    mask_path: Path | None = None  # the series' embolus mask, when the data set ships one


# Embolus masks beside the CSV: ``<split>_masks/<SeriesInstanceUID>.npz`` holding ``embolus``
# (uint8, one plane per SOP instance in the pixel grid its DICOM file stores; 0 background,
# k the k-th embolus) and ``sop_instance_uids`` (the plane order).
MASK_FORMAT = "pe-triage-embolus-mask/1"


def mask_path(data_dir: Path, split: str, series_instance_uid: str) -> Path:
    """Where the embolus mask of a series lies (the UID is checked before it names a file)."""
    from pe_triage_node.dicom.uids import validate_uid

    return Path(data_dir) / f"{split}_masks" / f"{validate_uid(series_instance_uid, 'SeriesInstanceUID')}.npz"


@dataclass
class EmbolusMask:
    """A series' embolus voxels: ``planes[k]`` belongs to ``sop_instance_uids[k]`` (its stored pixel grid)."""

    planes: np.ndarray  # uint8 (n, rows, columns)
    sop_instance_uids: list[str]

    def aligned(self, sop_order: Sequence[str]) -> np.ndarray:
        """The planes in ``sop_order`` (e.g. a loaded volume's z order); empty planes for SOPs the mask lacks."""
        at = {u: k for k, u in enumerate(self.sop_instance_uids)}
        out = np.zeros((len(sop_order), *self.planes.shape[1:]), dtype=self.planes.dtype)
        for i, u in enumerate(sop_order):
            k = at.get(u)
            if k is not None:
                out[i] = self.planes[k]
        return out

    def positive_sops(self) -> set[str]:
        """SOP instances whose plane holds an embolus voxel."""
        flags = np.asarray(self.planes.reshape(len(self.planes), -1).any(axis=1), dtype=bool).tolist()
        return {u for u, any_ in zip(self.sop_instance_uids, flags) if any_}


def write_embolus_mask(path: Path, planes: np.ndarray, sop_instance_uids: Sequence[str]) -> Path:
    """Write an :class:`EmbolusMask` (compressed npz, written atomically)."""
    if planes.ndim != 3 or len(planes) != len(sop_instance_uids):
        raise ValueError(f"mask planes {planes.shape} do not match {len(sop_instance_uids)} SOP instances")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, format=np.array(MASK_FORMAT), embolus=planes.astype(np.uint8), sop_instance_uids=np.array(list(sop_instance_uids)))
    tmp.replace(path)
    return path


def read_embolus_mask(path: Path) -> EmbolusMask:
    """Read a mask written by :func:`write_embolus_mask` (no pickles)."""
    with np.load(path, allow_pickle=False) as z:
        if str(z["format"]) != MASK_FORMAT:
            raise ValueError(f"{path.name}: not a {MASK_FORMAT} file")
        return EmbolusMask(np.asarray(z["embolus"]), [str(u) for u in z["sop_instance_uids"]])


def read_rspect(data_dir: Path, split: str = "train") -> list[RspectStudy]:
    """Studies of ``data_dir/<split>.csv`` (Kaggle column names), in order of first appearance."""
    csv_path = Path(data_dir) / f"{split}.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path} not found (expected the RSPECT layout: {split}.csv + {split}/<study>/<series>/)")
    studies: dict[tuple[str, str], RspectStudy] = {}
    with csv_path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            key = (row["StudyInstanceUID"], row["SeriesInstanceUID"])
            st = studies.get(key)
            if st is None:
                st = RspectStudy(
                    key[0],
                    key[1],
                    Path(data_dir) / split / key[0] / key[1],
                    {},
                    {k: int(float(row[k])) for k in STUDY_LABELS},
                )
                studies[key] = st
            st.slice_labels[row["SOPInstanceUID"]] = int(float(row[WINDOW_LABEL]))
    if (Path(data_dir) / f"{split}_masks").is_dir():
        from pe_triage_node.errors import InputRejected

        for st in studies.values():
            try:
                path = mask_path(data_dir, split, st.series_instance_uid)
            except InputRejected:  # a UID that cannot name a file has no mask
                continue
            st.mask_path = path if path.is_file() else None
    return list(studies.values())


def subsegmental_only_studies(data_dir: Path) -> set[str]:
    """StudyInstanceUIDs that ``phantoms.json`` marks as having only subsegmental emboli (empty without the file)."""
    path = Path(data_dir) / "phantoms.json"
    if not path.is_file():
        return set()
    meta = json.loads(path.read_text())
    return {r["StudyInstanceUID"] for r in meta.get("records", []) if r.get("subsegmental_only")}


def phantoms_json_name(split: str) -> str:
    """``phantoms.json`` for the train split (as documented), ``phantoms_<split>.json`` for others."""
    return "phantoms.json" if split == "train" else f"phantoms_{split}.json"


def read_train_csv(path: Path) -> list[dict[str, str]]:
    """Rows of an RSPECT-format CSV as dicts of strings (tests, quick checks)."""
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))
