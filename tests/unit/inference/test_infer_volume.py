"""Volume loading: order along the slice normal, HU, spacing from positions, every refusal path."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from pe_triage_node.errors import VolumeRejected
from pe_triage_node.inference.volume import load_ct_volume
from pe_triage_node.synth.ct_series import write_ct_series


def _ramp(nz: int = 12, n: int = 16) -> np.ndarray:
    return np.broadcast_to((np.arange(nz, dtype=np.float32) * 10)[:, None, None], (nz, n, n)).copy()


def _edit(path: Path, **attrs: object) -> None:
    ds = pydicom.dcmread(path)
    for k, v in attrs.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    ds.save_as(path)


def test_sorted_by_position_not_name_spacing_from_positions(tmp_path: Path) -> None:
    paths = write_ct_series(_ramp(), tmp_path, pixel_spacing=(0.8, 0.7), slice_spacing=1.25, slice_thickness=2.5)
    names = [f"{i:03d}.dcm" for i in range(len(paths))]
    random.Random(3).shuffle(names)
    for p, name in zip(paths, names):
        p.rename(tmp_path / f"x{name}")
    vol = load_ct_volume(tmp_path)
    assert vol.hu[:, 0, 0].tolist() == [i * 10.0 for i in range(12)]
    assert vol.spacing == pytest.approx((1.25, 0.8, 0.7))  # overlapping: spacing < thickness
    assert vol.slice_thickness == pytest.approx(2.5)
    assert vol.instance_numbers == list(range(1, 13))
    assert len(set(vol.sop_instance_uids)) == 12
    assert vol.positions_mm == pytest.approx([i * 1.25 for i in range(12)])


def test_hu_from_slope_and_intercept(tmp_path: Path) -> None:
    write_ct_series(_ramp() + 100, tmp_path, extra={"RescaleSlope": "2", "RescaleIntercept": "-1024"})
    vol = load_ct_volume(tmp_path)
    assert vol.hu[3, 5, 5] == pytest.approx(2 * 130 - 1024)


def test_reversed_axes_are_made_canonical(tmp_path: Path) -> None:
    v = _ramp()
    v[:, 0, :] += 1  # mark the first stored row
    v[:, :, 0] += 2  # and the first stored column
    write_ct_series(v, tmp_path, extra={"ImageOrientationPatient": [-1, 0, 0, 0, -1, 0]})
    vol = load_ct_volume(tmp_path)
    assert vol.flipped_x and vol.flipped_y
    assert vol.hu[0, -1, 5] == 1 and vol.hu[0, 5, -1] == 2


@pytest.mark.parametrize("orientation", [[1, 0, 0, 0, 1, 0], [-1, 0, 0, 0, -1, 0], [1, 0, 0, 0, -1, 0]])
def test_kept_headers_and_slice_hu_as_stored(tmp_path: Path, orientation: list[int]) -> None:
    """What the worker renders its outputs from: the headers without pixel data, each slice's HU as the file holds it."""
    from pe_triage_node.export.sc import hu_image

    v = _ramp()
    v[:, 0, :] += 1
    v[:, :, 0] += 2
    paths = write_ct_series(v, tmp_path, extra={"ImageOrientationPatient": orientation})
    vol = load_ct_volume(tmp_path, keep_datasets=True)
    assert [ds.SOPInstanceUID for ds in vol.datasets] == vol.sop_instance_uids
    assert all("PixelData" not in ds for ds in vol.datasets)
    for path in (paths[0], paths[7]):
        stored = pydicom.dcmread(path)
        header = next(ds for ds in vol.datasets if ds.SOPInstanceUID == stored.SOPInstanceUID)
        np.testing.assert_array_equal(vol.slice_hu(header), hu_image(stored))
    assert load_ct_volume(tmp_path).datasets == []


def test_compressed_transfer_syntax(tmp_path: Path) -> None:
    for p in write_ct_series(_ramp(), tmp_path):
        ds = pydicom.dcmread(p)
        ds.compress(RLELossless)
        ds.save_as(p)
    vol = load_ct_volume(tmp_path)
    assert vol.hu[:, 2, 2].tolist() == [i * 10.0 for i in range(12)]


def test_non_dicom_files_are_skipped(tmp_path: Path) -> None:
    write_ct_series(_ramp(), tmp_path)
    (tmp_path / "README.txt").write_text("not DICOM")
    assert load_ct_volume(tmp_path).shape == (12, 16, 16)


def _mixed_orientation(paths: list[Path]) -> None:
    _edit(paths[5], ImageOrientationPatient=[1, 0, 0, 0, 0.995, 0.0998])


def _tilt(paths: list[Path]) -> None:
    for i, p in enumerate(paths):
        _edit(p, ImagePositionPatient=[-5.6, -5.6 + 0.2 * i, float(i)])  # 11 degrees of shear


def _missing_position(paths: list[Path]) -> None:
    _edit(paths[4], ImagePositionPatient=None)


def _gap(paths: list[Path]) -> None:
    paths[6].unlink()


def _duplicate(paths: list[Path]) -> None:
    _edit(paths[6], ImagePositionPatient=pydicom.dcmread(paths[5]).ImagePositionPatient)


def _two_series(paths: list[Path]) -> None:
    _edit(paths[3], SeriesInstanceUID="1.2.3.4")


def _bad_pixels(paths: list[Path]) -> None:
    ds = pydicom.dcmread(paths[2])
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(paths[2])


def _huge_matrix(paths: list[Path]) -> None:
    _edit(paths[5], Rows=65535, Columns=65535)  # declared only: refused before any pixel is allocated


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_huge_matrix, "matrix 65535 x 65535 outside"),
        (_mixed_orientation, "mixed image orientations"),
        (_tilt, "gantry tilt"),
        (_missing_position, "ImagePositionPatient missing"),
        (_gap, "gap in slice positions"),
        (_duplicate, "duplicate slice positions"),
        (_two_series, "more than one series"),
        (_bad_pixels, "cannot be decoded"),
    ],
)
def test_refusals(tmp_path: Path, damage, reason: str) -> None:  # type: ignore[no-untyped-def]
    paths = write_ct_series(_ramp(), tmp_path)
    damage(paths)
    with pytest.raises(VolumeRejected, match=reason):
        load_ct_volume(tmp_path)


def test_refuses_fewer_slices_than_a_window(tmp_path: Path) -> None:
    write_ct_series(_ramp(nz=9), tmp_path)
    with pytest.raises(VolumeRejected, match="fewer than one window"):
        load_ct_volume(tmp_path)


def test_refuses_non_ct(tmp_path: Path) -> None:
    write_ct_series(_ramp(), tmp_path, extra={"Modality": "MR", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.4"})
    with pytest.raises(VolumeRejected, match="not a CT image series"):
        load_ct_volume(tmp_path)


def test_refuses_non_axial(tmp_path: Path) -> None:
    write_ct_series(_ramp(), tmp_path, extra={"ImageOrientationPatient": [1, 0, 0, 0, 0, -1]})
    with pytest.raises(VolumeRejected, match="not an axial series"):
        load_ct_volume(tmp_path)


def test_refuses_empty_and_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(VolumeRejected, match="no DICOM CT slices"):
        load_ct_volume(tmp_path)
    with pytest.raises(VolumeRejected, match="not a folder"):
        load_ct_volume(tmp_path / "absent")


def test_left_handed_cosines_still_run_feet_to_head(tmp_path: Path) -> None:
    # normal of [1,0,0, 0,-1,0] points to the feet; slices must still come out in increasing z
    write_ct_series(_ramp(), tmp_path, extra={"ImageOrientationPatient": [1, 0, 0, 0, -1, 0]})
    vol = load_ct_volume(tmp_path)
    assert vol.hu[:, 0, 0].tolist() == [i * 10.0 for i in range(12)]
    assert vol.flipped_y and not vol.flipped_x
