"""The two networks of Ma et al. 2022 (MODEL.md): r3d_18 window encoder and TCN + attention study model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from pe_triage_node.inference.labels import STUDY_LABELS

FEATURE_DIM = 512
SEQUENCE_LENGTH = 40
Padding = Literal["symmetric", "causal"]


class WindowEncoder(nn.Module):
    """Phase 1: torchvision ``r3d_18`` with a 1-logit head; state-dict keys identical to torchvision's.

    ``forward`` returns the logit (B,), the 512-d penultimate features (B, 512)
    and the class activation map of the last block (B, T', H', W'): with global
    average pooling and a linear head, Grad-CAM of the logit on ``layer4`` is
    exactly ``sum_c fc.weight[c] * A_c / (T'H'W')`` (the gradient of the logit
    with respect to A_c is that constant), so it comes free with the forward pass.
    """

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.video import r3d_18

        net = r3d_18(weights=None, num_classes=1)
        self.stem, self.layer1, self.layer2, self.layer3, self.layer4 = net.stem, net.layer1, net.layer2, net.layer3, net.layer4
        self.avgpool, self.fc = net.avgpool, net.fc

    def block_output(self, x: torch.Tensor) -> torch.Tensor:
        """Activations of r3d_18's last block (``layer4``), (B, 512, T', H', W')."""
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.block_output(x)
        feats = self.avgpool(a).flatten(1)
        logit = self.fc(feats)[:, 0]
        n = a.shape[2] * a.shape[3] * a.shape[4]
        cam = torch.einsum("bcthw,c->bthw", a.float(), self.fc.weight[0].float()) / n
        return logit, feats, cam


def fold_batchnorm(encoder: WindowEncoder) -> WindowEncoder:
    """A copy of an eval-mode encoder with every BatchNorm folded into the convolution before it.

    Exact up to rounding; saves one memory-bound pass over the activations per
    convolution, which matters most in bf16 on a CPU.
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    enc = copy.deepcopy(encoder).eval()
    for seq in [m for m in enc.modules() if isinstance(m, nn.Sequential)]:
        keys = list(seq._modules)
        for a, b in zip(keys, keys[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv3d) and isinstance(bn, nn.BatchNorm3d):
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    return enc


@dataclass(frozen=True)
class StudyModelSpec:
    """Phase-2 architecture (recorded in the weights manifest)."""

    feature_dim: int = FEATURE_DIM
    channels: int = 128
    levels: int = 2
    kernel_size: int = 3
    dropout: float = 0.2
    padding: Padding = "symmetric"
    sequence_length: int = SEQUENCE_LENGTH
    mlp_hidden: int = 128

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TemporalBlock(nn.Module):
    """Bai et al.'s residual block: 2 x (dilated conv, weight norm, ReLU, dropout) + 1x1 conv residual."""

    def __init__(self, n_in: int, n_out: int, kernel_size: int, dilation: int, dropout: float, padding: Padding) -> None:
        super().__init__()
        self.conv1 = weight_norm(nn.Conv1d(n_in, n_out, kernel_size, dilation=dilation))
        self.conv2 = weight_norm(nn.Conv1d(n_out, n_out, kernel_size, dilation=dilation))
        self.dropout = nn.Dropout(dropout)
        self.downsample = nn.Conv1d(n_in, n_out, 1) if n_in != n_out else None
        total = (kernel_size - 1) * dilation
        # Causal: all padding before (Bai's pad-then-chomp); symmetric: half each side.
        self.pad = (total, 0) if padding == "causal" else (total // 2, total - total // 2)
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.parametrizations.weight.original1, 0.0, 0.01)
        if self.downsample is not None:
            nn.init.normal_(self.downsample.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(F.relu(self.conv1(F.pad(x, self.pad))))
        out = self.dropout(F.relu(self.conv2(F.pad(out, self.pad))))
        res = x if self.downsample is None else self.downsample(x)
        return F.relu(out + res)


class TemporalConvNet(nn.Module):
    """Stack of :class:`TemporalBlock` with dilation 2**i; (B, C_in, T) -> (B, C, T)."""

    def __init__(self, n_in: int, channels: int, levels: int, kernel_size: int, dropout: float, padding: Padding) -> None:
        super().__init__()
        self.network = nn.Sequential(
            *[TemporalBlock(n_in if i == 0 else channels, channels, kernel_size, 2**i, dropout, padding) for i in range(levels)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.network(x)
        return out


class AttentionHead(nn.Module):
    """a = softmax(tanh(X w_q)) over unmasked steps, e = a X, then a 2-layer MLP -> 1 logit."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(dim) / dim**0.5)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.tanh(x @ self.query).masked_fill(~mask, float("-inf"))
        a = torch.softmax(scores, dim=1)
        e = torch.einsum("bt,btd->bd", a, x)
        return self.mlp(e)[:, 0], a


def step_inputs(f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[f_t, f_t - f_{t-1}, f_t - f_{t+1}] per step, (B, T, 512) -> (B, T, 1536).

    A missing neighbour (sequence end or a padded step) counts as f_t itself,
    so its difference is 0; padded steps are zero.
    """
    m = mask[..., None].to(f.dtype)
    f = f * m
    prev = torch.cat([f[:, :1], f[:, :-1]], dim=1)
    nxt = torch.cat([f[:, 1:], f[:, -1:]], dim=1)
    prev_ok = torch.cat([mask[:, :1], mask[:, :-1]], dim=1)[..., None]
    next_ok = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)[..., None]
    prev = torch.where(prev_ok, prev, f)
    nxt = torch.where(next_ok, nxt, f)
    return torch.cat([f, f - prev, f - nxt], dim=2) * m


class StudyModel(nn.Module):
    """Phase 2: TCN over the window features, a window head and nine attention heads (MODEL.md)."""

    def __init__(self, spec: StudyModelSpec | None = None) -> None:
        super().__init__()
        self.spec = spec or StudyModelSpec()
        s = self.spec
        self.tcn = TemporalConvNet(3 * s.feature_dim, s.channels, s.levels, s.kernel_size, s.dropout, s.padding)
        self.window_head = nn.Linear(s.channels, 1)
        self.heads = nn.ModuleList([AttentionHead(s.channels, s.mlp_hidden) for _ in STUDY_LABELS])

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, 512) features + (B, T) bool mask -> window logits (B, T), study logits (B, 9), attention (B, 9, T)."""
        x = self.tcn(step_inputs(features, mask).transpose(1, 2)).transpose(1, 2)  # (B, T, C)
        window = self.window_head(x)[..., 0]
        outs = [head(x, mask) for head in self.heads]
        logits = torch.stack([o[0] for o in outs], dim=1)
        attention = torch.stack([o[1] for o in outs], dim=1)
        return window, logits, attention


def fit_sequence(features: torch.Tensor, length: int = SEQUENCE_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) window features -> (length, D) and a bool mask: longer sequences linearly
    interpolated down (cell-centred), shorter ones zero-padded at the end (MODEL.md)."""
    n, d = features.shape
    if n > length:
        seq = F.interpolate(features.T[None].float(), size=length, mode="linear", align_corners=False)[0].T
        return seq.contiguous(), torch.ones(length, dtype=torch.bool, device=features.device)
    seq = torch.zeros(length, d, dtype=features.dtype, device=features.device)
    seq[:n] = features
    mask = torch.zeros(length, dtype=torch.bool, device=features.device)
    mask[:n] = True
    return seq, mask


def unfit_sequence(values: torch.Tensor, n: int) -> torch.Tensor:
    """Per-step values (..., length) back onto the N original windows (inverse of :func:`fit_sequence`)."""
    length = values.shape[-1]
    if n > length:
        flat = values.reshape(-1, 1, length).float()
        return F.interpolate(flat, size=n, mode="linear", align_corners=False).reshape(*values.shape[:-1], n)
    return values[..., :n]
