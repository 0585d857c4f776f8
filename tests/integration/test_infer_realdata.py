"""Real scanner series (../shared/realdata, TCIA Lung-PET-CT-Dx): geometry and an end-to-end run.

They are chest CTs without contrast and without PE labels: this checks that real
headers (Philips Implicit VR 5 mm, Siemens Explicit VR 8 mm) load with the right
order, orientation and spacing, and that the pipeline runs on them (random
weights, small input: the numbers mean nothing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from pe_triage_node.inference.consistency import violations
from pe_triage_node.inference.engine import InferenceEngine
from pe_triage_node.inference.preprocess import prepare_study
from pe_triage_node.inference.volume import load_ct_volume
from pe_triage_node.inference.weights import random_model

REPO_ROOT = Path(__file__).resolve().parents[2]
REALDATA = REPO_ROOT.parent / "shared" / "realdata" / "lung-pet-ct-dx"
SERIES = sorted(p for p in REALDATA.glob("*/*/*") if p.is_dir()) if REALDATA.is_dir() else []
# folder name fragment -> (slices, slice spacing mm, pixel spacing mm, transfer syntax)
EXPECTED = {
    "5mm": (64, 5.0, 0.841796875, "1.2.840.10008.1.2"),
    "ThoraxRoutine": (30, 8.0, 0.646484375, "1.2.840.10008.1.2.1"),
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SERIES, reason=f"real series not present at {REALDATA} (only in the shared workspace)"),
]


def _expected(series: Path) -> tuple[int, float, float, str]:
    return next(v for k, v in EXPECTED.items() if k in series.name)


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    return InferenceEngine(random_model(0, input_size=32), device="cpu", batch_size=2, lung_crop="threshold")


@pytest.mark.parametrize("series", SERIES, ids=[p.name for p in SERIES])
def test_geometry_and_end_to_end(series: Path, engine: InferenceEngine) -> None:
    n, dz, dxy, ts = _expected(series)
    first = pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True)
    assert first.file_meta.TransferSyntaxUID == ts
    vol = load_ct_volume(series)
    assert vol.shape == (n, 512, 512)
    assert vol.spacing == pytest.approx((dz, dxy, dxy))
    # slice order feet to head, by position (not by file name or InstanceNumber)
    z_ipp = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in series.iterdir()]
    assert vol.origin[2] == pytest.approx(min(z_ipp))
    assert np.all(np.diff(vol.positions_mm) == pytest.approx(dz))
    assert -1100 <= float(vol.hu.min()) <= -900  # air in HU after rescale
    # in-plane orientation: the spine (bone) lies posterior (larger y) to the body's centre
    mid = vol.hu[n // 2]
    by, _ = np.nonzero(mid > 300)
    ty, _ = np.nonzero(mid > -500)
    assert by.mean() > ty.mean() + 40

    prepared = prepare_study(vol, device=torch.device("cpu"), input_size=64)
    assert prepared.resampled_shape == (round(n * dz), round(512 * dxy), round(512 * dxy))
    assert prepared.lung_crop_method == "threshold"
    z0, z1, y0, y1, x0, x1 = prepared.box
    assert z1 - z0 > 150 and 150 < x1 - x0 < 0.95 * prepared.resampled_shape[2]

    result = engine.analyse(vol)
    assert len(result.windows) == prepared.n_windows
    assert violations(result.labels, result.window_labels) == []
    assert result.windows[-1].source_slices[1] <= n - 1
    for m in result.gradcam:
        assert m.sop_instance_uid == vol.sop_instance_uids[m.source_slice_index]
    assert result.series_instance_uid == str(first.SeriesInstanceUID)
