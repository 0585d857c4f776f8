"""Non-contrast chest CT is refused with a readable reason, never analysed into "no PE"."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pe_triage_node.errors import VolumeRejected
from pe_triage_node.inference.contrast import measure_enhancement, require_contrast
from pe_triage_node.inference.engine import InferenceEngine
from pe_triage_node.inference.volume import CTVolume, load_ct_volume
from pe_triage_node.inference.weights import random_model
from pe_triage_node.synth.ct_series import write_ct_series

REALDATA = Path(__file__).resolve().parents[3].parent / "shared" / "realdata" / "lung-pet-ct-dx"


def ctpa(phantom: Callable[..., np.ndarray], trunk_hu: float) -> np.ndarray:
    """The tiny chest with a heart-and-trunk blood pool of ``trunk_hu`` between the lungs and lung arteries."""
    vol = phantom(nz=40, n=96, lung_z=(4, 36))
    z, y, x = np.mgrid[:40, :96, :96]
    pool = ((y - 34) / 9.0) ** 2 + ((x - 48) / 8.0) ** 2 < 1  # in front of the lungs' mid-line
    vol[pool & (z >= 8) & (z < 30)] = trunk_hu
    for side in (-1, 1):  # a lobar artery in each lung
        artery = ((y - 48) / 2.5) ** 2 + ((x - 48 - side * 21) / 2.5) ** 2 < 1
        vol[artery & (z >= 6) & (z < 34)] = trunk_hu
    return vol


def volume_of(hu: np.ndarray, agent: str = "") -> CTVolume:
    return CTVolume(hu=hu.astype(np.float32), spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0),
                    orientation=(1, 0, 0, 0, 1, 0), contrast_bolus_agent=agent)


@pytest.mark.parametrize("trunk_hu", [200.0, 350.0, 650.0])
def test_an_enhanced_trunk_passes_from_poor_to_dense_contrast(phantom: Callable[..., np.ndarray], trunk_hu: float) -> None:
    found = measure_enhancement(volume_of(ctpa(phantom, trunk_hu)))
    assert found.enhanced, found.describe()
    require_contrast(volume_of(ctpa(phantom, trunk_hu)), "")


def test_unenhanced_blood_is_refused_with_the_measurements(phantom: Callable[..., np.ndarray]) -> None:
    plain = volume_of(ctpa(phantom, 45.0))
    with pytest.raises(VolumeRejected, match=r"^not a contrast-enhanced CTPA: ContrastBolusAgent empty .* cm²"):
        require_contrast(plain, "")
    require_contrast(plain, "IOHEXOL")  # the header's word is taken: no look at the pixels


@pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/realdata absent (a user's checkout has none)")
@pytest.mark.parametrize("series", sorted(p.name for p in REALDATA.glob("*/*/*")) if REALDATA.is_dir() else [])
def test_real_plain_chest_ct_is_not_taken_for_a_ctpa(series: str) -> None:
    (folder,) = REALDATA.glob(f"*/*/{series}")
    volume = load_ct_volume(folder)
    assert volume.contrast_bolus_agent == ""
    with pytest.raises(VolumeRejected, match="not a contrast-enhanced CTPA"):
        require_contrast(volume, volume.contrast_bolus_agent)


def test_the_engine_refuses_before_running_the_model(phantom: Callable[..., np.ndarray], tmp_path: Path) -> None:
    write_ct_series(ctpa(phantom, 45.0), tmp_path, pixel_spacing=(2.0, 2.0), slice_spacing=2.0,
                    extra={"ContrastBolusAgent": ""})
    engine = InferenceEngine(random_model(0, input_size=16), device="cpu", lung_crop="threshold", require_contrast=True)
    with pytest.raises(VolumeRejected, match="not a contrast-enhanced CTPA"):
        engine.analyse(tmp_path)
    assert load_ct_volume(tmp_path).contrast_bolus_agent == ""


def test_the_warm_up_chest_is_not_refused() -> None:
    engine = InferenceEngine(random_model(0, input_size=16), device="cpu", lung_crop="threshold", require_contrast=True)
    assert engine.warm_up(slices=10, matrix=64) > 0
