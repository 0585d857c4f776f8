"""Grad-CAM evidence a reader can trust: windows inside the lungs, the marker inside the patient.

The phantom is a chest whose air component reaches above the lungs (a trachea),
so the lung box, and the prepared slices, include windows without lung; a
network that attends there, and a map that peaks in the air around the patient,
must still give a secondary capture on a lung slice with its marker in the body.
"""

from __future__ import annotations

import numpy as np
import torch

from pe_triage_node.inference.engine import InferenceEngine, evidence_windows
from pe_triage_node.inference.gradcam import evidence_peak
from pe_triage_node.inference.labels import STUDY_LABELS
from pe_triage_node.inference.preprocess import prepare_study
from pe_triage_node.inference.volume import WINDOW_SLICES, CTVolume
from pe_triage_node.inference.weights import random_model

LUNG_Z = (10, 50)
N = 96
NZ = 90
GRID_MM = 4


def chest_with_trachea(phantom) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Lungs in slices 10-49; a trachea from slice 40 to the top, joined to both lungs by a bronchial bar."""
    vol = phantom(nz=NZ, n=N, lung_z=LUNG_Z)
    c = N // 2
    z, y, x = np.mgrid[:NZ, :N, :N]
    trachea = ((y - c) ** 2 + (x - c) ** 2 < 7**2) & (z >= 40)
    bar = (np.abs(y - c) < 4) & (np.abs(x - c) < 28) & (z >= 40) & (z < 46)
    vol[trachea | bar] = -950.0
    return vol


def _volume(hu: np.ndarray) -> CTVolume:
    n = hu.shape[0]
    return CTVolume(
        hu=hu.astype(np.float32),
        spacing=(1.0, 1.0, 1.0),
        origin=(0.0, 0.0, 0.0),
        orientation=(1, 0, 0, 0, 1, 0),
        sop_instance_uids=[f"2.25.{i + 1}" for i in range(n)],
        instance_numbers=list(range(1, n + 1)),
        positions_mm=[float(i) for i in range(n)],
        series_instance_uid="2.25.1",
        study_instance_uid="2.25.2",
    )


def test_evidence_windows_are_the_lung_windows(phantom) -> None:  # type: ignore[no-untyped-def]
    p = prepare_study(_volume(chest_with_trachea(phantom)), device=torch.device("cpu"), input_size=32)
    z0 = p.box[0]
    assert p.box[1] >= NZ - 4  # the trachea keeps the slices above the lungs in the crop
    ok = evidence_windows(p)
    assert ok.any() and not ok.all()
    for w in range(p.n_windows):
        first, last = z0 + w * WINDOW_SLICES, z0 + (w + 1) * WINDOW_SLICES - 1
        if first >= LUNG_Z[1]:
            assert not ok[w], f"window {w} (slices {first}-{last}) holds no lung"
        if first >= LUNG_Z[0] and last < LUNG_Z[1]:
            assert ok[w], f"window {w} (slices {first}-{last}) is all lung"
    region = p.region
    assert region is not None and region.shape == p.slices.shape
    corners = region[:, 0, 0] | region[:, 0, -1] | region[:, -1, 0] | region[:, -1, -1]
    assert not bool(corners.any())  # the air around the patient is never evidence


def test_evidence_peak_leaves_the_air_around_the_patient() -> None:
    cam = torch.zeros(WINDOW_SLICES, 16, 16)
    cam[0, 0, 0] = 1.0  # outside
    cam[5, 8, 9] = 0.5  # inside
    region = torch.zeros(WINDOW_SLICES, 16, 16, dtype=torch.bool)
    region[:, 4:12, 4:12] = True
    assert evidence_peak(cam, region) == (5, 8, 9)
    assert evidence_peak(cam, None) == (0, 0, 0)
    assert evidence_peak(cam, torch.zeros_like(region)) == (0, 0, 0)  # no region: the map as it is


def test_gradcam_secondary_capture_is_a_lung_slice_with_the_marker_in_the_body(phantom) -> None:  # type: ignore[no-untyped-def]
    hu = chest_with_trachea(phantom)
    volume = _volume(hu)
    engine = InferenceEngine(random_model(0, input_size=64), device="cpu", precision="fp32", lung_crop="threshold")
    p = prepare_study(volume, device=torch.device("cpu"), input_size=64)
    n = p.n_windows
    top = n - 1  # a window above the lungs (trachea only)
    assert not evidence_windows(p)[top]
    cams = torch.zeros(n, 2, 4, 4)
    cams[:, :, 0, 0] = 5.0  # every map peaks in a corner: air outside the body
    cams[:, :, 2, 1] = 1.0
    attention = {k: [0.0] * n for k in STUDY_LABELS}
    for k in attention:
        attention[k][top] = 1.0  # the study model attends above the lungs
    labels = {k: k in ("central_pe", "rightsided_pe") for k in STUDY_LABELS} | {"pe_present_on_image": True}
    window_probs = [0.1] * n
    window_probs[top] = 0.9
    maps = engine._gradcam(p, volume, cams, labels, attention, window_probs)
    assert maps
    for m in maps:
        assert m.window != top
        # the lung masks live on a 4 mm grid: a lung slice, give or take one cell
        assert LUNG_Z[0] - GRID_MM <= m.source_slice_index < LUNG_Z[1] + GRID_MM, m.source_slice_index
        row, col = int(round(m.peak_row)), int(round(m.peak_column))
        assert hu[m.source_slice_index, row, col] > -1000.0, f"marker at ({row}, {col}) is outside the body"
