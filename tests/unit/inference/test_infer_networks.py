"""Phase-2 TCN lengths and padding, attention masks, sequence fitting; phase-1 shapes and the Grad-CAM closed form."""

from __future__ import annotations

import pytest
import torch

from pe_triage_node.inference.gradcam import gradcam_autograd
from pe_triage_node.inference.networks import (
    StudyModel,
    StudyModelSpec,
    TemporalConvNet,
    WindowEncoder,
    fit_sequence,
    step_inputs,
    unfit_sequence,
)


@pytest.mark.parametrize("padding", ["symmetric", "causal"])
@pytest.mark.parametrize("length", [1, 7, 40])
def test_tcn_keeps_sequence_length(padding: str, length: int) -> None:
    tcn = TemporalConvNet(12, 8, 2, 3, 0.2, padding).eval()  # type: ignore[arg-type]
    assert tcn(torch.randn(2, 12, length)).shape == (2, 8, length)


def test_causal_tcn_ignores_the_future_symmetric_does_not() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 6, 20)
    y = x.clone()
    y[..., 12:] += 5.0
    causal = TemporalConvNet(6, 8, 2, 3, 0.0, "causal").eval()
    assert torch.allclose(causal(x)[..., :12], causal(y)[..., :12])
    sym = TemporalConvNet(6, 8, 2, 3, 0.0, "symmetric").eval()
    # 2 levels x 2 convs (kernel 3, dilation 1 then 2) reach 1 + 1 + 2 + 2 = 6 steps each side
    assert torch.allclose(sym(x)[..., :6], sym(y)[..., :6])
    assert not torch.allclose(sym(x)[..., 6:12], sym(y)[..., 6:12])


def test_weight_norm_on_every_tcn_conv() -> None:
    model = StudyModel()
    names = [n for n, _ in model.named_parameters() if "parametrizations.weight.original" in n]
    assert len(names) == 2 * 2 * 2  # 2 levels x 2 convs x (g, v)
    assert model.spec.padding == "symmetric"


def test_attention_masks_padded_steps() -> None:
    torch.manual_seed(0)
    model = StudyModel(StudyModelSpec(feature_dim=16)).eval()
    f = torch.randn(1, 40, 16)
    mask = torch.zeros(1, 40, dtype=torch.bool)
    mask[0, :13] = True
    w1, s1, a1 = model(f, mask)
    g = f.clone()
    g[0, 13:] = torch.randn(27, 16) * 100  # garbage in padded steps
    w2, s2, a2 = model(g, mask)
    assert a1.shape == (1, 9, 40) and s1.shape == (1, 9) and w1.shape == (1, 40)
    assert torch.all(a1[0, :, 13:] == 0)
    assert torch.allclose(a1.sum(-1), torch.ones(1, 9))
    assert torch.allclose(s1, s2) and torch.allclose(a1, a2) and torch.allclose(w1[:, :13], w2[:, :13])


def test_step_inputs_differences() -> None:
    f = torch.arange(4.0).view(1, 4, 1).repeat(1, 1, 2)  # steps 0,1,2,3
    mask = torch.tensor([[True, True, True, False]])
    x = step_inputs(f, mask)
    assert x.shape == (1, 4, 6)
    assert x[0, :, 2].tolist() == [0.0, 1.0, 1.0, 0.0]  # f_t - f_{t-1}; first step 0
    assert x[0, :, 4].tolist() == [-1.0, -1.0, 0.0, 0.0]  # f_t - f_{t+1}; last valid step 0


def test_fit_sequence_pads_and_interpolates() -> None:
    short, m = fit_sequence(torch.ones(13, 4), 40)
    assert short.shape == (40, 4) and m.sum() == 13 and short[13:].abs().sum() == 0
    ramp = torch.linspace(0, 1, 97)[:, None].repeat(1, 3)
    long, m2 = fit_sequence(ramp, 40)
    assert long.shape == (40, 3) and bool(m2.all())
    assert torch.all(long[1:, 0] > long[:-1, 0])
    assert unfit_sequence(long[:, 0], 97).shape == (97,)
    assert unfit_sequence(torch.arange(40.0), 13).tolist() == list(range(13))


def test_window_encoder_shapes_and_gradcam_closed_form() -> None:
    torch.manual_seed(0)
    enc = WindowEncoder().eval()
    x = torch.rand(2, 3, 10, 32, 32)
    with torch.inference_mode():
        logit, feats, cam = enc(x)
    assert logit.shape == (2,) and feats.shape == (2, 512) and cam.shape == (2, 2, 2, 2)
    auto = gradcam_autograd(enc, x[1:2])
    assert torch.allclose(auto, cam[1], atol=1e-5, rtol=1e-4)
    assert float(cam[1].sum()) == pytest.approx(float(logit[1]) - float(enc.fc.bias[0].detach()), abs=1e-5)


def test_folded_batchnorm_is_exact() -> None:
    from torch import nn

    from pe_triage_node.inference.networks import fold_batchnorm

    torch.manual_seed(1)
    enc = WindowEncoder().eval()
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    folded = fold_batchnorm(enc)
    assert not any(isinstance(m, nn.BatchNorm3d) for m in folded.modules())
    x = torch.rand(1, 3, 10, 32, 32)
    with torch.inference_mode():
        for a, b in zip(enc(x), folded(x)):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)
