"""Grad-CAM (Selvaraju et al. 2017) of the phase-1 logit on r3d_18's last block (``layer4``).

The engine uses the closed form that :class:`~.networks.WindowEncoder` returns with
every forward pass (exact for global average pooling + a linear head);
:func:`gradcam_autograd` is the textbook hook-and-backward version, kept to
check that equality and for heads that are not linear.

``layer4`` is 16 input pixels per cell, so its map alone cannot say which vessel
holds the clot. The same paper's Guided Grad-CAM (the map times guided
backpropagation's input gradient, :func:`guided_backprop`) has the input's
resolution; the engine marks its peak inside the coarse map's hot part (at least half its maximum).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from pe_triage_node.inference.networks import WindowEncoder


def gradcam_autograd(encoder: WindowEncoder, window: torch.Tensor) -> torch.Tensor:
    """Raw Grad-CAM (before ReLU) of one window (1, 3, 10, S, S) -> (T', H', W'), by backpropagation."""
    with torch.enable_grad():
        x = window.detach().float()
        a = encoder.block_output(x)
        a.retain_grad()
        logit = encoder.fc(encoder.avgpool(a).flatten(1))[0, 0]
        logit.backward()
        grad = a.grad
        if grad is None:  # pragma: no cover - retain_grad guarantees it
            raise RuntimeError("no gradient reached layer4")
        alpha = grad.mean(dim=(2, 3, 4), keepdim=True)  # (1, C, 1, 1, 1)
        cam = (alpha * a).sum(dim=1)[0]
    encoder.zero_grad(set_to_none=True)
    return cam.detach()


# Cell i of r3d_18's layer4 is centred on input voxel i * stride (every strided conv
# pads by half its kernel), not on the middle of a stride-wide block.
LAYER4_STRIDE = (8, 16, 16)


def upsample_cam(cam: torch.Tensor, size: tuple[int, int, int], stride: tuple[int, int, int] = LAYER4_STRIDE) -> tuple[torch.Tensor, float]:
    """ReLU, trilinear upsampling of a (T', H', W') map to the window ``size``, scaled to [0, 1].

    Input voxel p reads the map at cell coordinate p / stride (clamped to the
    last cell), which keeps the heat map where the network's receptive fields
    are; a plain ``interpolate`` would shift it by half a stride.
    Returns the map and its maximum before scaling (0 when nothing is positive).
    """
    axes = []
    for n_out, n_in, st in zip(size, cam.shape, stride):
        c = (torch.arange(n_out, dtype=torch.float32, device=cam.device) / st).clamp_(max=n_in - 1)
        axes.append(2 * c / max(n_in - 1, 1) - 1 if n_in > 1 else torch.zeros_like(c))
    gz, gy, gx = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack([gx, gy, gz], dim=-1)[None]  # grid_sample wants (x, y, z)
    up = F.grid_sample(cam[None, None].float(), grid, mode="bilinear", align_corners=True)[0, 0].clamp_(min=0)
    peak = float(up.max())
    return (up / peak if peak > 0 else up), peak


def peak_location(cam: torch.Tensor) -> tuple[int, int, int]:
    """(slice, row, column) of the strongest response of a (10, S, S) map."""
    idx = int(torch.argmax(cam))
    _, h, w = cam.shape
    return idx // (h * w), (idx // w) % h, idx % w


def evidence_peak(cam: torch.Tensor, region: torch.Tensor | None) -> tuple[int, int, int]:
    """:func:`peak_location` restricted to ``region`` (a (10, S, S) bool mask of where an embolus can lie);
    the whole map when the region is missing or empty. The marker never lands in the air around the patient."""
    if region is None or not bool(region.any()):
        return peak_location(cam)
    return peak_location(torch.where(region.to(cam.device), cam, torch.full_like(cam, -1.0)))


class _GuidedReLUFn(torch.autograd.Function):
    """ReLU whose backward passes only positive gradients through positive inputs (Springenberg et al. 2015)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad.clamp(min=0) * (x > 0).to(grad.dtype)


class _GuidedReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GuidedReLUFn.apply(x)  # type: ignore[no-any-return]


def guided_encoder(encoder: WindowEncoder) -> WindowEncoder:
    """A float32 copy of ``encoder`` whose ReLUs are guided (for :func:`guided_backprop`)."""
    guided = copy.deepcopy(encoder).float().eval()
    for mod in list(guided.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(mod, name, _GuidedReLU())
    for p in guided.parameters():
        p.requires_grad_(False)
    return guided


def guided_backprop(guided: WindowEncoder, windows: torch.Tensor) -> torch.Tensor:
    """Guided backpropagation of each window's logit to its input, windows (B, 3, 10, S, S) in one pass:
    (B, 10, S, S), >= 0, the largest positive gradient over the three channels (BatchNorm folded or in eval
    mode, so the windows do not mix)."""
    with torch.enable_grad():
        x = windows.detach().to(torch.float32, copy=True).requires_grad_(True)  # a copy: never an inference tensor
        logits = guided.fc(guided.avgpool(guided.block_output(x)).flatten(1))[:, 0]
        (grad,) = torch.autograd.grad(logits.sum(), x)
    return grad.clamp(min=0).amax(dim=1)


GUIDED_SUPPORT = 0.5  # the fine peak is sought where the coarse map is at least half its maximum


def guided_gradcam_peak(cam: torch.Tensor, saliency: torch.Tensor, region: torch.Tensor | None) -> tuple[int, int, int]:
    """The peak of Guided Grad-CAM (``cam`` (10, S, S) upsampled, in [0, 1], times ``saliency``) where ``cam`` is
    at least :data:`GUIDED_SUPPORT` of its maximum inside ``region`` (so the marker sits in the heat map's hot
    part); :func:`evidence_peak` of the map alone where the product is empty there."""
    inside = region.to(cam.device) if region is not None and bool(region.any()) else torch.ones_like(cam, dtype=torch.bool)
    top = float(cam[inside].max())
    support = inside & (cam >= GUIDED_SUPPORT * top)
    product = torch.where(support, cam * saliency.to(cam.device, cam.dtype), torch.zeros_like(cam))
    if top <= 0 or float(product.max()) <= 0:
        return evidence_peak(cam, region)
    return peak_location(torch.where(support, product, torch.full_like(cam, -1.0)))
