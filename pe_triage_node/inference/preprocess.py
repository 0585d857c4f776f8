"""Preprocessing exactly as MODEL.md: 1 mm isotropic, lung box crop, 10-slice windows, three HU channels.

Order per study (all tensor work in torch on the inference device):

1. HU volume (from :mod:`.volume`) resampled to 1 x 1 x 1 mm (trilinear, cell-centred).
2. Lung mask -> 3-D bounding box -> crop. Two documented methods:
   ``lungmask`` (U-Net R231, the paper's choice; weights from a local file) run on
   slices every ``LUNGMASK_STRIDE_MM`` mm (a box needs no more; the U-Net costs
   about 1.5 s per slice on 2 CPU cores), or ``threshold``: on a 4 mm grid, air
   (mean of the cell < -400 HU) connected components that do not touch the in-plane border of the
   field of view (outside air does), keeping those of at least 20 % of the
   largest one and at least 5 mL (both lungs, the trachea; not bowel gas);
   the box grows by one grid cell on every side to cover partial-volume edges.
   If neither finds lungs the whole field is kept and the method says so.
   The same masks give the evidence region (:meth:`ChestMasks.evidence_region`: the
   lungs, the mediastinum between them, 8 mm around; never the air around the
   patient) and each slice's lung share, with which the engine keeps its Grad-CAM
   secondary captures on lung slices and their markers inside the patient.
3. Slices resized in HU to ``input_size`` x ``input_size`` (bilinear, antialiased:
   shrinking a 512² field to 64² averages the pixels each output pixel covers, so
   noise is not aliased and an embolus smaller than the output pixel darkens it
   by its partial volume instead of vanishing or filling it by where it falls).
4. Windows of 10 slices along z (the last zero-padded after channel scaling).
5. Channels lung (-600, 1500), PE (100, 700), mediastinal (40, 400): clipped to
   their fixed bounds and scaled to [0, 1] (no per-slice min-max).

Windows are produced batch by batch (:meth:`PreparedStudy.window_batch`) so a
600-slice study never holds all its windows at once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from pe_triage_node.inference.volume import WINDOW_SLICES, CTVolume

log = logging.getLogger(__name__)

TARGET_SPACING_MM = 1.0
DEFAULT_INPUT_SIZE = 192
# (lower, upper) HU bounds of the three channels: lung, PE, mediastinal window.
HU_WINDOWS: tuple[tuple[float, float], ...] = ((-1350.0, 150.0), (-250.0, 450.0), (-160.0, 240.0))
LUNGMASK_STRIDE_MM = 5.0
_THRESH_GRID = 4  # mm per voxel of the threshold method's grid
_AIR_HU = -400.0
_MIN_LUNG_ML = 5.0
_MIN_SHARE_OF_LARGEST = 0.2
_REGION_MARGIN_CELLS = 2  # 8 mm around the lungs and the mediastinum between them
LUNGMASK_R231_FILE = "unet_r231-d5d2fc3d.pth"

LungCropChoice = Literal["auto", "lungmask", "threshold"]
Box = tuple[int, int, int, int, int, int]  # z0, z1, y0, y1, x0, x1 (half-open), 1 mm grid


def resample_isotropic(hu: torch.Tensor, spacing: tuple[float, float, float], target: float = TARGET_SPACING_MM) -> torch.Tensor:
    """Trilinear resampling of a (z, y, x) volume to ``target`` mm voxels (cell-centred grid)."""
    size = [max(1, round(n * s / target)) for n, s in zip(hu.shape, spacing)]
    out = F.interpolate(hu[None, None].float(), size=size, mode="trilinear", align_corners=False)
    return out[0, 0]


def resize_slices(crop: torch.Tensor, size: int) -> torch.Tensor:
    """(z, y, x) -> (z, size, size): bilinear, antialiased when shrinking (step 3 of the module docstring)."""
    return F.interpolate(crop[None].float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def hu_to_channels(hu: torch.Tensor) -> torch.Tensor:
    """(..., ) HU -> (3, ...) channels in [0, 1] with MODEL.md's fixed bounds."""
    return torch.stack([((hu - lo) / (hi - lo)).clamp_(0.0, 1.0) for lo, hi in HU_WINDOWS])


@dataclass
class ChestMasks:
    """Where the lungs and the outside air are, on the threshold method's 4 mm grid (z, y, x) of a 1 mm volume.

    ``lungs``: the kept air components (both lungs, trachea), or the U-Net's lung
    labels when lungmask ran; ``outside``: air connected to the in-plane border
    of the field of view (the air around the patient).
    """

    lungs: np.ndarray  # bool
    outside: np.ndarray  # bool
    grid_mm: int = _THRESH_GRID

    def box(self, shape: tuple[int, int, int]) -> Box | None:
        """Bounding box of the lungs in the 1 mm grid, one cell of margin on every side; ``None`` without lungs."""
        if not self.lungs.any():
            return None
        g = self.grid_mm
        zz, yy, xx = np.nonzero(self.lungs)
        z, y, x = shape
        return (
            max(0, int(zz.min()) - 1) * g, min(z, (int(zz.max()) + 2) * g),
            max(0, int(yy.min()) - 1) * g, min(y, (int(yy.max()) + 2) * g),
            max(0, int(xx.min()) - 1) * g, min(x, (int(xx.max()) + 2) * g),
        )

    def evidence_region(self, margin_cells: int = _REGION_MARGIN_CELLS) -> np.ndarray:
        """Where a pulmonary embolus can lie: per slice the lungs and everything between them
        (row by row, the span from the first to the last lung cell: mediastinum, heart, hila),
        grown in-plane by ``margin_cells``, never the outside air. Empty on slices without lungs."""
        from scipy import ndimage

        lungs = self.lungs
        first = np.maximum.accumulate(lungs, axis=2)
        last = np.maximum.accumulate(lungs[:, :, ::-1], axis=2)[:, :, ::-1]
        region = first & last
        if margin_cells > 0:
            diamond = ndimage.iterate_structure(ndimage.generate_binary_structure(2, 1), margin_cells)
            region = ndimage.binary_dilation(region, structure=diamond[None])  # in-plane only
        return region & ~self.outside


def threshold_chest_masks(vol: torch.Tensor) -> ChestMasks:
    """Lungs and outside air by HU threshold on a 4 mm grid (see the module docstring for the method)."""
    from scipy import ndimage

    g = _THRESH_GRID
    pooled = F.avg_pool3d(vol[None, None].float(), kernel_size=g, stride=g, ceil_mode=True)[0, 0]
    air = (pooled < _AIR_HU).cpu().numpy()
    labels, n = ndimage.label(air)
    empty = np.zeros(air.shape, dtype=bool)
    if n == 0:
        return ChestMasks(empty, empty.copy())
    border = np.unique(np.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    border = border[border > 0]
    outside = np.isin(labels, border)
    sizes = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64)
    sizes[0] = 0
    sizes[border] = 0
    if sizes.max() <= 0:
        return ChestMasks(empty, outside)
    keep_min = max(_MIN_SHARE_OF_LARGEST * sizes.max(), _MIN_LUNG_ML * 1000.0 / g**3)
    keep = np.flatnonzero(sizes >= keep_min)
    return ChestMasks(np.isin(labels, keep), outside)


def threshold_lung_box(vol: torch.Tensor) -> Box | None:
    """Bounding box of the lungs by HU threshold on a 4 mm grid; ``None`` when none is found.

    ``vol`` is the 1 mm HU volume (z, y, x). See the module docstring for the method.
    """
    return threshold_chest_masks(vol).box(tuple(int(v) for v in vol.shape))  # type: ignore[arg-type]


def find_lungmask_weights(configured: Path | None) -> Path | None:
    """The R231 weights file: the configured path, else torch hub's cache (where lungmask downloads it)."""
    if configured is not None:
        return configured if configured.is_file() else None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / LUNGMASK_R231_FILE
    return cached if cached.is_file() else None


class LungmaskBox:
    """Lung bounding box from lungmask's U-Net (R231 or compatible), weights loaded once from a local file."""

    def __init__(self, weights: Path, *, device: torch.device, batch_size: int = 8) -> None:
        from lungmask.mask import LMInferer

        from pe_triage_node.errors import WeightsError

        try:
            # lungmask calls torch.load(path) itself: torch >= 2.6 defaults to weights_only=True.
            self.inferer = LMInferer(modelpath=str(weights), force_cpu=device.type != "cuda", batch_size=batch_size, tqdm_disable=True)
        except (RuntimeError, OSError, KeyError, ValueError) as exc:
            raise WeightsError(f"lungmask weights {weights.name} cannot be loaded: {exc}") from exc
        self.weights = weights

    def segment(self, vol: torch.Tensor, stride_mm: float = LUNGMASK_STRIDE_MM) -> tuple[np.ndarray, np.ndarray]:
        """The U-Net's lung labels (z', y, x) on every ``stride_mm``-th 1 mm slice, and those slices' indices."""
        stride = max(1, round(stride_mm / TARGET_SPACING_MM))
        idx = np.arange(0, vol.shape[0], stride)
        sub = vol[idx].float().cpu().numpy()
        return idx, np.asarray(self.inferer.apply(sub)) > 0  # (z', y, x), 0 background

    @staticmethod
    def box_of(idx: np.ndarray, mask: np.ndarray, n_slices: int, stride_mm: float = LUNGMASK_STRIDE_MM) -> Box | None:
        """Box of :meth:`segment`'s labels in the 1 mm grid; ``None`` if empty."""
        if not mask.any():
            return None
        stride = max(1, round(stride_mm / TARGET_SPACING_MM))
        zz, yy, xx = np.nonzero(mask)
        return (
            max(0, int(idx[zz.min()]) - stride + 1), min(n_slices, int(idx[zz.max()]) + stride),
            int(yy.min()), int(yy.max()) + 1, int(xx.min()), int(xx.max()) + 1,
        )

    @staticmethod
    def lungs_on_grid(idx: np.ndarray, mask: np.ndarray, grid_shape: tuple[int, int, int], g: int = _THRESH_GRID) -> np.ndarray:
        """:meth:`segment`'s labels on the threshold method's 4 mm grid (nearest labelled slice, any lung in a cell)."""
        gz, gy, gx = grid_shape
        centres = (np.arange(gz) + 0.5) * g - 0.5
        near = np.abs(centres[:, None] - idx[None, :]).argmin(axis=1)
        m = torch.from_numpy(mask[near].astype(np.float32))[None]  # (1, gz, y, x)
        pooled = F.max_pool2d(m, kernel_size=g, stride=g, ceil_mode=True)[0].numpy() > 0
        return pooled[:, :gy, :gx]

    def __call__(self, vol: torch.Tensor, stride_mm: float = LUNGMASK_STRIDE_MM) -> Box | None:
        """Box of the U-Net's lung labels on every ``stride_mm``-th 1 mm slice; ``None`` if empty."""
        idx, mask = self.segment(vol, stride_mm)
        return self.box_of(idx, mask, int(vol.shape[0]), stride_mm)


@dataclass
class PreparedStudy:
    """A study after resampling, crop and in-plane resize, ready to cut into windows.

    ``slices`` is (z, S, S) HU on the inference device; ``box`` the crop in the
    1 mm grid of shape ``resampled_shape``; ``source_shape`` the loaded volume's.
    """

    slices: torch.Tensor
    box: Box
    resampled_shape: tuple[int, int, int]
    source_shape: tuple[int, int, int]
    lung_crop_method: str
    input_size: int
    # (z, S, S) bool on the prepared slices: where an embolus can lie (ChestMasks.evidence_region);
    # lung_share: per prepared slice, the share of its pixels that are lung. None when not computed.
    region: torch.Tensor | None = None
    lung_share: np.ndarray | None = None

    @property
    def n_windows(self) -> int:
        return max(1, math.ceil(self.slices.shape[0] / WINDOW_SLICES))

    def window_batch(self, start: int, stop: int, *, channels_last: bool = False) -> torch.Tensor:
        """Windows ``start..stop-1`` as (B, 3, 10, S, S) float32 in [0, 1], the last zero-padded."""
        z0, z1 = start * WINDOW_SLICES, min(stop * WINDOW_SLICES, self.slices.shape[0])
        ch = hu_to_channels(self.slices[z0:z1])  # (3, n, S, S)
        need = (stop - start) * WINDOW_SLICES
        if ch.shape[1] < need:
            ch = F.pad(ch, (0, 0, 0, 0, 0, need - ch.shape[1]))  # zeros after scaling
        s = self.input_size
        batch = ch.view(3, stop - start, WINDOW_SLICES, s, s).permute(1, 0, 2, 3, 4)
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        return batch.contiguous(memory_format=fmt)

    def window_source_slices(self, window: int, n_source: int) -> tuple[int, int]:
        """First and last source-slice index (z order) covered by a window's real (unpadded) slices."""
        a = window * WINDOW_SLICES
        b = min(a + WINDOW_SLICES, self.slices.shape[0]) - 1
        return self.source_slice(window, 0, n_source), self.source_slice(window, b - a, n_source)

    def source_slice(self, window: int, slice_in_window: int, n_source: int) -> int:
        """Index in the loaded (z-sorted) series of the slice nearest to a window slice."""
        k = min(window * WINDOW_SLICES + slice_in_window, self.slices.shape[0] - 1) + self.box[0]
        src = (k + 0.5) * n_source / self.resampled_shape[0] - 0.5
        return int(min(n_source - 1, max(0, round(src))))

    def window_region(self, window: int) -> torch.Tensor | None:
        """:attr:`region` of one window as (10, S, S), padded slices empty; ``None`` when not computed."""
        if self.region is None:
            return None
        part = self.region[window * WINDOW_SLICES : (window + 1) * WINDOW_SLICES]
        if part.shape[0] < WINDOW_SLICES:
            part = F.pad(part, (0, 0, 0, 0, 0, WINDOW_SLICES - part.shape[0]))
        return part

    def window_lung_share(self) -> np.ndarray | None:
        """Mean lung share of each window's real slices; ``None`` when not computed."""
        if self.lung_share is None:
            return None
        return np.array([float(self.lung_share[w * WINDOW_SLICES : (w + 1) * WINDOW_SLICES].mean()) for w in range(self.n_windows)])

    def source_pixel(self, v: float, u: float) -> tuple[float, float]:
        """(row, column) in the canonical source grid of window pixel (v, u)."""
        _, y0, y1, x0, x1 = self.box[0], *self.box[2:]
        s = self.input_size
        ry = y0 + (v + 0.5) * (y1 - y0) / s - 0.5
        rx = x0 + (u + 0.5) * (x1 - x0) / s - 0.5
        row = (ry + 0.5) * self.source_shape[1] / self.resampled_shape[1] - 0.5
        col = (rx + 0.5) * self.source_shape[2] / self.resampled_shape[2] - 0.5
        return float(row), float(col)


def prepare_study(
    volume: CTVolume,
    *,
    device: torch.device,
    input_size: int = DEFAULT_INPUT_SIZE,
    lungmask: LungmaskBox | None = None,
) -> PreparedStudy:
    """Resample, crop to the lungs and resize one loaded volume (MODEL.md steps 3-7 for inference)."""
    hu = torch.from_numpy(volume.hu).to(device)
    vol = resample_isotropic(hu, volume.spacing)
    del hu
    z, y, x = (int(v) for v in vol.shape)
    masks = threshold_chest_masks(vol)
    box: Box | None
    if lungmask is not None:
        idx, labels = lungmask.segment(vol)
        box, method = lungmask.box_of(idx, labels, z), "lungmask"
        masks = ChestMasks(LungmaskBox.lungs_on_grid(idx, labels, masks.lungs.shape), masks.outside)
    else:
        box, method = masks.box((z, y, x)), "threshold"
    if box is None or box[1] - box[0] < 1:
        log.warning("no lungs found by %s: keeping the whole field of view", method)
        box, method = (0, z, 0, y, 0, x), f"{method}: no lungs found, whole field"
    z0, z1, y0, y1, x0, x1 = box
    crop = vol[z0:z1, y0:y1, x0:x1]
    slices = resize_slices(crop, input_size)
    region, lung_share = _on_prepared_grid(masks, box, input_size)
    return PreparedStudy(
        slices=slices.contiguous(),
        box=box,
        resampled_shape=(z, y, x),
        source_shape=volume.shape,
        lung_crop_method=method,
        input_size=input_size,
        region=torch.from_numpy(region).to(slices.device),
        lung_share=lung_share,
    )


def prepare_mask(planes: np.ndarray, volume: CTVolume, prepared: PreparedStudy) -> torch.Tensor:
    """A voxel mask of ``volume`` (its slice order, each plane in its stored pixel grid) on the prepared
    slices (z, S, S), bool: the same resampling, crop and resize as the HU, any coverage counts
    (a slightly larger mask, as the attention-guided paper downsamples its masks)."""
    m = np.asarray(planes > 0, dtype=np.float32)
    if volume.flipped_y:
        m = m[:, ::-1, :]
    if volume.flipped_x:
        m = m[:, :, ::-1]
    vol = resample_isotropic(torch.from_numpy(np.ascontiguousarray(m)), volume.spacing)
    z0, z1, y0, y1, x0, x1 = prepared.box
    crop = vol[z0:z1, y0:y1, x0:x1]
    s = prepared.input_size
    return resize_slices(crop, s) > 1e-3


def _on_prepared_grid(masks: ChestMasks, box: Box, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The evidence region (z, S, S) and the lung share per slice, sampled (nearest cell) on the prepared slices."""
    z0, z1, y0, y1, x0, x1 = box
    g = masks.grid_mm
    gz, gy, gx = masks.lungs.shape
    zi = np.minimum(np.arange(z0, z1) // g, gz - 1)
    yi = np.minimum(np.floor(y0 + (np.arange(size) + 0.5) * (y1 - y0) / size).astype(int) // g, gy - 1)
    xi = np.minimum(np.floor(x0 + (np.arange(size) + 0.5) * (x1 - x0) / size).astype(int) // g, gx - 1)

    def on_prepared(cells: np.ndarray) -> np.ndarray:  # = cells[np.ix_(zi, yi, xi)], axis by axis: 3-4 x faster
        return cells[zi][:, yi][:, :, xi]

    return on_prepared(masks.evidence_region()), on_prepared(masks.lungs).mean(axis=(1, 2))


def describe_box(p: PreparedStudy) -> dict[str, Any]:
    """The crop as plain data (mm in the 1 mm grid) for the study result."""
    z0, z1, y0, y1, x0, x1 = p.box
    return {"z": [z0, z1], "y": [y0, y1], "x": [x0, x1], "resampled_shape": list(p.resampled_shape)}
