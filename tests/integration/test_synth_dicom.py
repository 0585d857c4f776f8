"""``pe-triage synth`` writes valid CT DICOM in the RSPECT layout, with labels that match the phantoms."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from pe_triage_node.cli import main
from pe_triage_node.synth.phantom import STUDY_LABELS, generate_phantom
from pe_triage_node.rspect import CSV_COLUMNS, read_train_csv

DCIODVFY = shutil.which("dciodvfy")


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "rspect"
    assert main(["synth", str(out), "--studies", "4", "--seed", "31", "--quiet"]) == 0
    return out


def _dciodvfy_errors(path: Path) -> list[str]:
    assert DCIODVFY is not None
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_layout_csv_and_json_agree(small_set: Path) -> None:
    rows = read_train_csv(small_set / "train.csv")
    assert rows and list(rows[0]) == list(CSV_COLUMNS)
    files = sorted(small_set.glob("train/*/*/*.dcm"))
    assert len(files) == len(rows)
    on_disk = {(p.parts[-3], p.parts[-2], p.stem) for p in files}
    assert on_disk == {(r["StudyInstanceUID"], r["SeriesInstanceUID"], r["SOPInstanceUID"]) for r in rows}
    meta = json.loads((small_set / "phantoms.json").read_text())
    assert meta["studies"] == 4 and len(meta["records"]) == 4
    by_study: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_study[r["StudyInstanceUID"]].append(r)
    for rec in meta["records"]:
        study_rows = by_study[rec["StudyInstanceUID"]]
        assert len(study_rows) == rec["shape_zyx"][0]
        # study labels repeated on every row, as in RSPECT
        for name in STUDY_LABELS:
            assert {int(r[name]) for r in study_rows} == {rec["labels"][name]}
        assert sum(int(r["pe_present_on_image"]) for r in study_rows) == rec["positive_slices"]
        for e in rec["emboli"]:
            assert e["subsegmental"] == (e["order"] >= 4)
            assert e["voxels"] > 0


def test_csv_rows_follow_slice_position_and_the_regenerated_phantom(small_set: Path) -> None:
    rows = read_train_csv(small_set / "train.csv")
    meta = json.loads((small_set / "phantoms.json").read_text())
    rec = max(meta["records"], key=lambda r: r["positive_slices"])
    study_rows = [r for r in rows if r["StudyInstanceUID"] == rec["StudyInstanceUID"]]
    series_dir = small_set / "train" / rec["StudyInstanceUID"] / rec["SeriesInstanceUID"]
    z = [float(pydicom.dcmread(series_dir / f"{r['SOPInstanceUID']}.dcm", stop_before_pixels=True).ImagePositionPatient[2]) for r in study_rows]
    assert z == sorted(z)  # rows in slice order, inferior first
    ph = generate_phantom(rec["seed"], size="small")
    np.testing.assert_array_equal(ph.pe_present_on_image.astype(int), [int(r["pe_present_on_image"]) for r in study_rows])
    assert ph.labels.as_dict() == rec["labels"]
    k = int(np.argmax(ph.pe_present_on_image)) if ph.pe_positive else len(study_rows) // 2
    ds = pydicom.dcmread(series_dir / f"{study_rows[k]['SOPInstanceUID']}.dcm")
    hu = ds.pixel_array.astype(np.int16) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    np.testing.assert_array_equal(hu, ph.volume_hu[k])


def test_attributes_of_a_ctpa_series(small_set: Path) -> None:
    path = next(small_set.glob("train/*/*/*.dcm"))
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == CTImageStorage and ds.Modality == "CT"
    assert path.stem == ds.SOPInstanceUID
    assert path.parent.name == ds.SeriesInstanceUID and path.parent.parent.name == ds.StudyInstanceUID
    assert ds.ContrastBolusAgent and ds.ContrastBolusRoute == "IV"
    assert ds.ConvolutionKernel and ds.SeriesDescription and ds.StudyDescription and ds.ProtocolName
    assert "NOT FOR DIAGNOSTIC USE" in ds.ImageComments
    assert (ds.Rows, ds.Columns) == (128, 128)


@pytest.mark.skipif(DCIODVFY is None, reason="dicom3tools (dciodvfy) not installed")
def test_dciodvfy_reports_no_errors_on_a_sample(small_set: Path) -> None:
    for series in sorted(small_set.glob("train/*/*")):
        files = sorted(series.glob("*.dcm"))
        for path in (files[0], files[len(files) // 2], files[-1]):
            assert _dciodvfy_errors(path) == [], path


@pytest.mark.slow
def test_full_size_study(tmp_path: Path) -> None:
    out = tmp_path / "full"
    assert main(["synth", str(out), "--studies", "1", "--seed", "5", "--size", "full", "--slices", "200", "--quiet"]) == 0
    files = sorted(out.glob("train/*/*/*.dcm"))
    assert len(files) == 200
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert (ds.Rows, ds.Columns) == (512, 512)
    assert 0.6 <= float(ds.SliceThickness) <= 3.0
    if DCIODVFY is not None:
        assert _dciodvfy_errors(files[100]) == []


def test_refuses_a_non_empty_folder_and_splits_keep_their_own_files(small_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", str(small_set), "--studies", "1", "--seed", "1", "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err
    foreign = tmp_path / "other"
    (foreign / "train" / "x").mkdir(parents=True)
    assert main(["synth", str(foreign), "--studies", "1", "--seed", "1", "--overwrite", "--quiet"]) == 2
    assert (foreign / "train" / "x").is_dir()
    out = tmp_path / "sets"
    assert main(["synth", str(out), "--studies", "1", "--seed", "1", "--slices", "16", "--split", "val", "--quiet"]) == 0
    assert main(["synth", str(out), "--studies", "1", "--seed", "2", "--slices", "16", "--split", "val", "--overwrite", "--quiet"]) == 0
    assert len(list(out.glob("val/*"))) == 1 and len(read_train_csv(out / "val.csv")) == 16
    assert json.loads((out / "phantoms_val.json").read_text())["seed"] == 2
