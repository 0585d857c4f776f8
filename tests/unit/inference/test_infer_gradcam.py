"""Grad-CAM peaks inside a planted bright lesion when the network's weights make that lesion the signal."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pe_triage_node.inference.gradcam import (
    gradcam_autograd,
    guided_backprop,
    guided_encoder,
    guided_gradcam_peak,
    peak_location,
    upsample_cam,
)
from pe_triage_node.inference.networks import WindowEncoder
from pe_triage_node.inference.preprocess import hu_to_channels

import pytest

LESIONS = [  # slices, rows, columns of a 64 x 64 window
    (slice(2, 9), slice(30, 54), slice(6, 30)),
    (slice(0, 5), slice(8, 30), slice(36, 60)),
]


def lesion_detector() -> WindowEncoder:
    """r3d_18 whose channel 0 carries "mediastinal channel above 0.75" (HU > 140) to the logit.

    Stem: centre tap on the mediastinal channel, BN bias -0.75, ReLU. Plain blocks:
    zero convs (identity through the residual). Down-sampling blocks: conv1
    averages channel 0 over 3x3x3 (stride 2), conv2 passes it, shortcut zero.
    fc reads channel 0 only.
    """
    enc = WindowEncoder().eval()
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.zero_()
            elif isinstance(m, nn.BatchNorm3d):
                m.weight.fill_(1.0)
                m.bias.zero_()
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
        enc.stem[0].weight[0, 2, 1, 3, 3] = 1.0
        enc.stem[1].bias[0] = -0.75
        for layer in (enc.layer2, enc.layer3, enc.layer4):
            block = layer[0]
            block.conv1[0].weight[0, 0] = 1.0 / 27
            block.conv2[0].weight[0, 0, 1, 1, 1] = 1.0
        enc.fc.weight.zero_()
        enc.fc.weight[0, 0] = 1.0
        enc.fc.bias.zero_()
    return enc


def window_with_lesion(lesion: tuple[slice, slice, slice]) -> torch.Tensor:
    hu = torch.full((10, 64, 64), 40.0)  # soft tissue
    hu[lesion] = 300.0  # the bright lesion
    hu[6:9, 4:12, 4:12] = 120.0  # a dimmer distractor below the detector's threshold
    return hu_to_channels(hu)[None]  # (1, 3, 10, 64, 64)


@pytest.mark.parametrize("lesion", LESIONS)
def test_gradcam_peaks_inside_the_lesion(lesion: tuple[slice, slice, slice]) -> None:
    enc = lesion_detector()
    x = window_with_lesion(lesion)
    with torch.inference_mode():
        logit, _, cam = enc(x)
    assert float(logit[0]) > 0
    up, peak = upsample_cam(cam[0], (10, 64, 64))
    assert peak > 0 and float(up.max()) == 1.0
    z, r, c = peak_location(up)
    assert lesion[0].start <= z < lesion[0].stop
    assert lesion[1].start <= r < lesion[1].stop
    assert lesion[2].start <= c < lesion[2].stop
    # the textbook (backpropagated) Grad-CAM gives the same map
    assert torch.allclose(gradcam_autograd(enc, x), cam[0], atol=1e-6)
    # and the lesion-free window gives no response
    with torch.inference_mode():
        _, _, empty = enc(hu_to_channels(torch.full((10, 64, 64), 40.0))[None])
    assert float(empty.clamp(min=0).max()) == 0.0
    assert np.isfinite(up.numpy()).all()


SMALL_CLOT = (slice(3, 6), slice(37, 40), slice(21, 24))  # 3 x 3 pixels, between layer4's cell centres


def test_guided_gradcam_marks_a_small_lesion_the_coarse_map_misses() -> None:
    enc = lesion_detector()
    x = window_with_lesion(SMALL_CLOT)
    with torch.inference_mode():
        _, _, cam = enc(x)
    up, _ = upsample_cam(cam[0], (10, 64, 64))
    coarse = peak_location(up)
    inside = all(s.start <= v < s.stop for s, v in zip(SMALL_CLOT, coarse))
    assert not inside, "the layer4 map alone should peak on a cell centre, off a 3-pixel lesion"
    both = guided_backprop(guided_encoder(enc), torch.cat([x, window_with_lesion(LESIONS[0])]))
    assert both.shape == (2, 10, 64, 64) and float(both.min()) >= 0
    saliency = both[0]
    z, r, c = guided_gradcam_peak(up, saliency, None)
    assert all(s.start <= v < s.stop for s, v in zip(SMALL_CLOT, (z, r, c)))
    # a region that excludes the lesion keeps the marker inside the region
    region = torch.zeros(10, 64, 64, dtype=torch.bool)
    region[:, :, 40:] = True
    assert guided_gradcam_peak(up, saliency, region)[2] >= 40


def test_guided_encoder_is_a_copy_with_guided_relus() -> None:
    enc = lesion_detector()
    guided = guided_encoder(enc)
    assert any(isinstance(m, nn.ReLU) for m in enc.modules())
    assert not any(isinstance(m, nn.ReLU) for m in guided.modules())
    x = torch.randn(1, 3, 10, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(enc(x)[0], guided(x)[0])  # same forward
    # backward: only positive gradients through positive inputs
    t = torch.tensor([-1.0, 2.0, 3.0], requires_grad=True)
    relu = next(m for m in guided.modules() if type(m).__name__ == "_GuidedReLU")
    relu(t).backward(torch.tensor([5.0, -4.0, 6.0]))
    assert t.grad is not None and t.grad.tolist() == [0.0, 0.0, 6.0]


def test_guided_backprop_takes_windows_made_under_inference_mode() -> None:
    """The engine prepares its windows under ``torch.inference_mode``; guided backpropagation must still run."""
    guided = guided_encoder(lesion_detector())
    with torch.inference_mode():
        x = window_with_lesion(LESIONS[0])
    assert guided_backprop(guided, x).shape == (1, 10, 64, 64)
