"""Grad-CAM peaks inside a planted bright lesion when the network's weights make that lesion the signal."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pe_triage_node.inference.gradcam import gradcam_autograd, peak_location, upsample_cam
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
