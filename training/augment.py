"""Training-time augmentation (the paper's, MODEL.md preprocessing step 7), after the windows are cut at the serving size.

Phase 1 — :func:`augment_window`: the paper resizes slices to 224 x 224 and takes a
random 10 x 192 x 192 crop, rotated by up to 15 degrees. Here the cache already
holds the serving size S, so the crop is a random in-plane offset of up to
(224 - 192) / 224 of the field per axis (the scale stays the serving scale, where
the paper's crop would zoom by 224/192 against its own inference), together with
the window start's random shift along z (``Phase1Config.jitter``: the third
dimension of the crop), and a rotation in-plane drawn from +-15 degrees; the
embolus mask follows the same transform. Outside the field is 0 after channel
scaling (what the engine pads with).

Phase 2 — :func:`partial_coverage`: series that cover only part of the chest and
short sequences (fewer than 40 windows, zero-padded with a mask) are drawn by
keeping a random contiguous run of a study's windows; a positive study keeps at
least one positive window, so its labels stay true of what is seen.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

PAPER_RESIZE, PAPER_CROP = 224, 192
MAX_ROTATION_DEG = 15.0
MAX_SHIFT = (PAPER_RESIZE - PAPER_CROP) / PAPER_RESIZE / 2  # of the field, each way


def augment_window(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    rng: np.random.Generator,
    *,
    max_rotation_deg: float = MAX_ROTATION_DEG,
    max_shift: float = MAX_SHIFT,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One window (3, 10, S, S) and its mask (10, S, S) or ``None``: the same random rotation and in-plane crop offset."""
    theta = math.radians(float(rng.uniform(-max_rotation_deg, max_rotation_deg)))
    tx, ty = (float(v) for v in rng.uniform(-2 * max_shift, 2 * max_shift, size=2))  # affine_grid spans [-1, 1]
    c, s = math.cos(theta), math.sin(theta)
    mat = torch.tensor([[c, -s, tx], [s, c, ty]], dtype=torch.float32)[None]
    _, t, h, w = x.shape
    grid = F.affine_grid(mat.expand(t, 2, 3), [t, 1, h, w], align_corners=False)
    img = F.grid_sample(x.permute(1, 0, 2, 3).float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out_mask = None
    if mask is not None:
        m = F.grid_sample(mask[:, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
        out_mask = (m > 0.25).float()
    return img.permute(1, 0, 2, 3).contiguous(), out_mask


def partial_coverage(window_labels: np.ndarray, rng: np.random.Generator, *, min_share: float = 0.3, min_windows: int = 3) -> tuple[int, int]:
    """A random contiguous run [a, b) of a study's N windows, at least ``min_share`` of them (and ``min_windows``),
    holding a positive window when the study has one."""
    n = len(window_labels)
    k = int(rng.integers(min(n, max(min_windows, math.ceil(min_share * n))), n + 1))
    pos = np.flatnonzero(window_labels > 0)
    if len(pos):
        p = int(rng.choice(pos))  # a positive window the run must keep
        a = int(rng.integers(max(0, p - k + 1), min(p, n - k) + 1))
    else:
        a = int(rng.integers(0, n - k + 1))
    return a, a + k
