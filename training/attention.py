"""The attention loss of the attention-guided phase 1 (seeds/001, section 2.1; MODEL.md).

For a window with an embolus mask, the Grad-CAM map of the positive logit on
r3d_18's last block, A = ReLU(sum_k alpha_k f_k) with alpha_k the mean gradient
(for global average pooling and a linear head alpha_k = w_k / (T'H'W'), so the
map is :class:`~pe_triage_node.inference.networks.WindowEncoder`'s closed form),
divided by its maximum on positive windows when that is > 0, is compared with
the mask M brought to the map's grid (every cell that holds a mask voxel is 1;
all zeros on negative windows) by the continuous Dice coefficient (Shamir et
al. 2019): cDC = 2 sum(a m) / (c sum(a) + sum(m)), c = sum(a m) / sum(a sign(m))
(1 where there is no overlap). Loss = 1 - cDC. One departure, on purpose: both
sums carry a smoothing term ``eps`` (1 cell), so that a negative window's
all-zero mask asks for an all-zero map (loss eps / (sum(a) + eps), with a
gradient) instead of a constant 1, and an empty map on an empty mask scores 0.
"""

from __future__ import annotations

import torch

from pe_triage_node.inference.gradcam import LAYER4_STRIDE


def _nearest_cell(n_in: int, n_out: int, stride: int, device: torch.device) -> torch.Tensor:
    """(n_in, n_out) one-hot: input voxel i belongs to the cell whose centre (cell j sits on voxel j * stride) is nearest."""
    j = torch.clamp(torch.round(torch.arange(n_in, device=device, dtype=torch.float32) / stride), max=n_out - 1).long()
    return torch.nn.functional.one_hot(j, n_out).float()


def mask_to_cells(mask: torch.Tensor, cells: tuple[int, int, int], stride: tuple[int, int, int] = LAYER4_STRIDE) -> torch.Tensor:
    """A (B, T, H, W) voxel mask on the map's (B, T', H', W') grid: 1 where a cell holds any mask voxel."""
    _, t, h, w = mask.shape
    pz, py, px = (_nearest_cell(n, c, s, mask.device) for n, c, s in zip((t, h, w), cells, stride))
    hits = torch.einsum("bthw,tu,hv,wx->buvx", mask.float(), pz, py, px)
    return (hits > 0).float()


def normalised_cam(cam: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """ReLU of the raw map (B, T', H', W'); positive windows divided by their maximum when it is > 0."""
    a = torch.relu(cam)
    peak = a.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
    scale = torch.where((positive.view(-1, 1, 1, 1) > 0) & (peak > 0), peak, torch.ones_like(peak))
    return a / scale


def continuous_dice_loss(a: torch.Tensor, m: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - cDC per window, (B,): ``a`` the normalised map, ``m`` the binary cell mask, both (B, ...)."""
    a, m = a.flatten(1), m.flatten(1)
    inter = (a * m).sum(dim=1)
    on_mask = (a * torch.sign(m)).sum(dim=1)
    c = torch.where(on_mask > 0, inter / on_mask.clamp(min=1e-12), torch.ones_like(inter))
    cdc = (2 * inter + eps) / (c * a.sum(dim=1) + m.sum(dim=1) + eps)
    return 1.0 - cdc


def attention_losses(cam: torch.Tensor, mask: torch.Tensor, label: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Attention loss per window (B,): ``cam`` (B, T', H', W') raw Grad-CAM, ``mask`` (B, T, H, W) voxels, ``label`` (B,)."""
    cells = mask_to_cells(mask, tuple(cam.shape[1:]))  # type: ignore[arg-type]
    cells = cells * (label.view(-1, 1, 1, 1) > 0)  # negative windows: an all-zero mask
    return continuous_dice_loss(normalised_cam(cam if cam.dtype == torch.float64 else cam.float(), label), cells.to(cam.dtype if cam.dtype == torch.float64 else torch.float32), eps)


def attention_loss(cam: torch.Tensor, mask: torch.Tensor, label: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean of :func:`attention_losses` over a batch."""
    return attention_losses(cam, mask, label, eps).mean()
