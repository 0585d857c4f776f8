"""Preprocessing geometry: 1 mm resampling, lung crop, windows, channels, source mapping, lungmask path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pe_triage_node.errors import WeightsError
from pe_triage_node.inference.preprocess import (
    LungmaskBox,
    hu_to_channels,
    prepare_study,
    resample_isotropic,
    resize_slices,
    threshold_lung_box,
)
from pe_triage_node.inference.volume import CTVolume, load_ct_volume

CPU = torch.device("cpu")


def _volume(hu: np.ndarray, spacing: tuple[float, float, float]) -> CTVolume:
    n = hu.shape[0]
    return CTVolume(
        hu=hu.astype(np.float32),
        spacing=spacing,
        origin=(0.0, 0.0, 0.0),
        orientation=(1, 0, 0, 0, 1, 0),
        sop_instance_uids=[f"1.2.3.{i}" for i in range(n)],
        instance_numbers=list(range(1, n + 1)),
        positions_mm=[i * spacing[0] for i in range(n)],
    )


def test_resample_to_1mm() -> None:
    out = resample_isotropic(torch.zeros(20, 16, 24), (2.0, 2.0, 0.5))
    assert tuple(out.shape) == (40, 32, 12)


def test_spacing_from_positions_not_thickness(small_series: Path, tmp_path: Path, phantom) -> None:  # type: ignore[no-untyped-def]
    from pe_triage_node.synth.ct_series import write_ct_series

    write_ct_series(phantom(), tmp_path, pixel_spacing=(2.0, 2.0), slice_spacing=2.0, slice_thickness=5.0)
    vol = load_ct_volume(tmp_path)
    p = prepare_study(vol, device=CPU, input_size=32)
    assert p.resampled_shape == (60, 96, 96)  # 30 x 2 mm, not 30 x 5 mm


def test_channels_fixed_bounds() -> None:
    hu = torch.tensor([-1350.0, 150.0, -250.0, 450.0, -160.0, 240.0, 40.0, -3000.0, 3000.0])
    ch = hu_to_channels(hu)
    assert ch[0, 0] == 0 and ch[0, 1] == 1
    assert ch[1, 2] == 0 and ch[1, 3] == 1
    assert ch[2, 4] == 0 and ch[2, 5] == 1
    assert ch[2, 6] == pytest.approx(0.5)
    assert ch.min() >= 0 and ch.max() <= 1
    flat = hu_to_channels(torch.full((4, 4), 40.0))  # flat slice: no division by zero
    assert torch.isfinite(flat).all()


def test_threshold_crop_finds_the_lungs(phantom) -> None:  # type: ignore[no-untyped-def]
    vol = torch.from_numpy(phantom(nz=60, n=96, lung_z=(10, 50)))
    box = threshold_lung_box(vol)
    assert box is not None
    z0, z1, y0, y1, x0, x1 = box
    assert 4 <= z0 <= 10 and 50 <= z1 <= 56
    zz, yy, xx = np.nonzero(vol.numpy() == -850)
    assert y0 <= yy.min() and y1 > yy.max() and x0 <= xx.min() and x1 > xx.max()
    assert y1 - y0 <= yy.max() - yy.min() + 17 and x1 - x0 <= xx.max() - xx.min() + 17


def test_no_lungs_keeps_whole_field(phantom) -> None:  # type: ignore[no-untyped-def]
    p = prepare_study(_volume(phantom(lung_z=None), (1.0, 1.0, 1.0)), device=CPU, input_size=32)
    assert p.lung_crop_method.startswith("threshold: no lungs found")
    assert p.box == (0, 30, 0, 48, 0, 48)


def test_windows_padding_and_source_mapping(phantom) -> None:  # type: ignore[no-untyped-def]
    vol = _volume(phantom(nz=30, n=48, lung_z=None), (2.5, 1.0, 1.0))  # 75 mm -> 8 windows, last 5 real slices
    p = prepare_study(vol, device=CPU, input_size=24)
    assert p.slices.shape == (75, 24, 24) and p.n_windows == 8
    batch = p.window_batch(6, 8)
    assert batch.shape == (2, 3, 10, 24, 24)
    assert batch[1, :, 5:].abs().max() == 0  # zero padding after the last real slice
    assert batch[1, :, :5].max() > 0
    assert batch.min() >= 0 and batch.max() <= 1
    assert p.source_slice(0, 0, 30) == 0 and p.source_slice(7, 4, 30) == 29
    assert p.source_slice(3, 7, 30) == round((37 + 0.5) / 2.5 - 0.5)
    assert p.window_source_slices(7, 30) == (28, 29)
    row, col = p.source_pixel(11.5, 11.5)
    assert row == pytest.approx(23.5) and col == pytest.approx(23.5)


def test_channels_last_batch_same_values(phantom) -> None:  # type: ignore[no-untyped-def]
    p = prepare_study(_volume(phantom(), (1.0, 1.0, 1.0)), device=CPU, input_size=16)
    a, b = p.window_batch(0, 2), p.window_batch(0, 2, channels_last=True)
    assert b.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(a, b)


def _tiny_r231(path: Path) -> Path:
    """A random-init state dict of lungmask's R231 architecture (the real file is 3 classes, depth 5)."""
    from lungmask.resunet import UNet

    torch.manual_seed(0)
    net = UNet(n_classes=3, padding=True, depth=5, up_mode="upsample", batch_norm=True, residual=False)
    torch.save(net.state_dict(), path)
    return path


def test_lungmask_weights_load_and_run(tmp_path: Path, phantom) -> None:  # type: ignore[no-untyped-def]
    weights = _tiny_r231(tmp_path / "unet_r231-test.pth")
    box = LungmaskBox(weights, device=CPU, batch_size=2)
    vol = _volume(phantom(nz=10, n=64), (1.0, 1.0, 1.0))
    p = prepare_study(vol, device=CPU, input_size=16, lungmask=box)  # 2 slices through the U-Net
    assert p.lung_crop_method.startswith("lungmask")


def test_lungmask_wrong_file_is_a_weights_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(WeightsError, match="lungmask weights"):
        LungmaskBox(bad, device=CPU)


def test_engine_auto_uses_configured_lungmask_and_records_it(tmp_path: Path, phantom) -> None:  # type: ignore[no-untyped-def]
    from pe_triage_node.inference.engine import InferenceEngine
    from pe_triage_node.inference.weights import random_model

    weights = _tiny_r231(tmp_path / "r231.pth")
    engine = InferenceEngine(random_model(0, input_size=16), device="cpu", lung_crop="auto", lungmask_weights=weights)
    assert engine.lungmask is not None
    result = engine.analyse(_volume(phantom(nz=10, n=64), (1.0, 1.0, 1.0)))
    assert result.lung_crop_method.startswith("lungmask")
    forced = InferenceEngine(random_model(0, input_size=16), device="cpu", lung_crop="threshold", lungmask_weights=weights)
    assert forced.lungmask is None


def test_shrinking_keeps_a_small_embolus_partial_volume() -> None:
    """A 3-pixel filling defect in a 320² slice shrunk to 64² darkens the output by its partial
    volume wherever it falls; plain bilinear sampling would miss it at some offsets."""
    deficits = []
    for off in range(5):
        crop = torch.full((1, 320, 320), 300.0)
        crop[0, 150 + off : 153 + off, 150 + off : 153 + off] = 50.0
        out = resize_slices(crop, 64)
        deficits.append(float((300.0 - out).sum()))
    expected = 9 * 250.0 / 25  # defect area x contrast, in output pixels of 5 x 5 input pixels
    assert all(abs(d - expected) < 0.1 * expected for d in deficits), deficits


def test_embolus_mask_keeps_a_small_embolus(phantom) -> None:  # type: ignore[no-untyped-def]
    """A 2-voxel embolus mask survives the shrink to the prepared grid (any coverage counts)."""
    from pe_triage_node.inference.preprocess import prepare_mask

    vol = _volume(phantom(24, 96, lung_z=(2, 22)), (2.0, 1.0, 1.0))
    p = prepare_study(vol, device=CPU, input_size=16)
    for y in range(40, 46):
        planes = np.zeros(vol.hu.shape, dtype=np.uint8)
        planes[12, y, 47:49] = 1
        assert bool(prepare_mask(planes, vol, p).any()), y
