"""Step 1: preprocess every study once with the package's own preprocessing and cache it on disk.

For each study of an RSPECT-format folder (``<split>.csv`` + ``<split>/<study>/<series>/``)
the series is loaded with :func:`pe_triage_node.inference.volume.load_ct_volume`
and prepared with :func:`pe_triage_node.inference.preprocess.prepare_study` at
the trained input size (the engine serves through the same two calls, so
train and serve cannot drift). Cached per study, in ``CACHE/<split>/``:

* ``<k>.slices.npy`` — the prepared slices, HU, float16, (z, S, S) on the 1 mm grid
  (the three channels are made from them by :func:`~pe_triage_node.inference.preprocess.hu_to_channels`
  when a window is cut, exactly as :meth:`PreparedStudy.window_batch` does);
* ``<k>.labels.npy`` — ``pe_present_on_image`` per prepared slice (uint8), taken from
  the nearest source slice (:meth:`PreparedStudy.source_slice`);
* ``<k>.mask.npy`` — when the data set ships embolus masks (``<split>_masks/``, the
  phantoms do): the mask on the prepared slices (:func:`~pe_triage_node.inference.preprocess.prepare_mask`),
  bit-packed along x; the entry's ``mask`` is ``None`` for studies without one (the RSNA download);

and ``index.json`` with each study's UIDs, study labels, q_i (share of positive
source slices), window count and crop method. Studies already cached are skipped
(the step resumes). ``python -m training.cache DATA_DIR CACHE --input-size 64``.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pe_triage_node.rspect import read_embolus_mask, read_rspect
from pe_triage_node.inference.volume import WINDOW_SLICES
from training.common import write_json

log = logging.getLogger(__name__)

CACHE_FORMAT = "pe-triage-cache/2"


def cache_split(
    data_dir: Path,
    cache_dir: Path,
    *,
    split: str = "train",
    name: str | None = None,
    input_size: int = 64,
    lung_crop: str = "threshold",
    lungmask_weights: Path | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Cache every study of ``data_dir/<split>.csv`` into ``cache_dir/<name or split>/``; return the index."""
    from tqdm import tqdm

    from pe_triage_node.errors import InputRejected
    from pe_triage_node.inference.preprocess import LungmaskBox, find_lungmask_weights, prepare_mask, prepare_study
    from pe_triage_node.inference.volume import load_ct_volume

    out = Path(cache_dir) / (name or split)
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "index.json"
    old: dict[str, Any] = {}
    if index_path.is_file():
        import json

        prev = json.loads(index_path.read_text())
        if prev.get("input_size") == input_size and prev.get("lung_crop") == lung_crop and prev.get("data_dir") == str(data_dir):
            old = {e["series_instance_uid"]: e for e in prev["studies"]}
    lungmask = None
    if lung_crop == "lungmask":
        weights = find_lungmask_weights(lungmask_weights)
        if weights is None:
            raise FileNotFoundError("lung_crop 'lungmask' needs the R231 weights file (--lungmask-weights)")
        lungmask = LungmaskBox(weights, device=torch.device("cpu"))
    studies = read_rspect(Path(data_dir), split)
    entries: list[dict[str, Any]] = []
    rejected: list[dict[str, str]] = []
    for k, st in enumerate(tqdm(studies, desc=f"cache {split}", unit="study", disable=not show_progress)):
        done = old.get(st.series_instance_uid)
        has_mask = done is not None and ("mask" in done) and (done["mask"] is None) == (st.mask_path is None)
        if done is not None and has_mask and (out / done["slices"]).is_file() and (out / done["labels"]).is_file():
            entries.append(done)
            continue
        try:
            volume = load_ct_volume(st.series_dir)
        except InputRejected as exc:
            rejected.append({"series": st.series_instance_uid, "reason": str(exc)})
            continue
        with torch.inference_mode():
            prepared = prepare_study(volume, device=torch.device("cpu"), input_size=input_size, lungmask=lungmask)
        n_src = volume.shape[0]
        src = np.array([st.slice_labels.get(uid, 0) for uid in volume.sop_instance_uids], dtype=np.uint8)
        nz = int(prepared.slices.shape[0])
        nearest = [prepared.source_slice(z // WINDOW_SLICES, z % WINDOW_SLICES, n_src) for z in range(nz)]
        slice_labels = src[nearest]
        stem = f"{k:06d}"
        np.save(out / f"{stem}.slices.npy", prepared.slices.numpy().astype(np.float16))
        np.save(out / f"{stem}.labels.npy", slice_labels)
        mask_file = None
        if st.mask_path is not None:
            planes = read_embolus_mask(st.mask_path).aligned(volume.sop_instance_uids)
            mask_file = f"{stem}.mask.npy"
            np.save(out / mask_file, np.packbits(prepare_mask(planes, volume, prepared).numpy(), axis=-1))
        entries.append(
            {
                "study_instance_uid": st.study_instance_uid,
                "series_instance_uid": st.series_instance_uid,
                "slices": f"{stem}.slices.npy",
                "labels": f"{stem}.labels.npy",
                "n_slices": nz,
                "n_windows": max(1, math.ceil(nz / WINDOW_SLICES)),
                "n_source_slices": n_src,
                "q": float(src.mean()) if len(src) else 0.0,
                "study_labels": st.labels,
                "lung_crop_method": prepared.lung_crop_method,
                "mask": mask_file,
            }
        )
    index = {
        "format": CACHE_FORMAT,
        "data_dir": str(data_dir),
        "split": split,
        "input_size": input_size,
        "lung_crop": lung_crop,
        "studies": entries,
        "studies_with_masks": sum(1 for e in entries if e.get("mask")),
        "rejected": rejected,
    }
    write_json(index_path, index)
    return index


@dataclass
class CachedStudy:
    """One cached study in memory."""

    slices: torch.Tensor  # (z, S, S) float16 HU
    slice_labels: torch.Tensor  # (z,) uint8
    entry: dict[str, Any]
    mask: torch.Tensor | None = None  # (z, S, S) bool embolus voxels; None: the data set has no masks

    def window_mask(self, start: int) -> torch.Tensor | None:
        """The embolus mask of the 10 slices from ``start``, (10, S, S) float, zero-padded; ``None`` without masks."""
        if self.mask is None:
            return None
        m = self.mask[start : start + WINDOW_SLICES].float()
        if m.shape[0] < WINDOW_SLICES:
            m = torch.nn.functional.pad(m, (0, 0, 0, 0, 0, WINDOW_SLICES - m.shape[0]))
        return m

    @property
    def n_windows(self) -> int:
        return max(1, math.ceil(self.slices.shape[0] / WINDOW_SLICES))

    def window_labels(self) -> np.ndarray:
        """Grid window labels: positive when any of its prepared slices is."""
        lab = self.slice_labels.numpy().astype(bool)
        return np.array([lab[w * WINDOW_SLICES : (w + 1) * WINDOW_SLICES].any() for w in range(self.n_windows)], dtype=np.float32)

    def window(self, start: int) -> torch.Tensor:
        """The 10 slices from ``start`` as (3, 10, S, S) in [0, 1], zero-padded after scaling (as the engine)."""
        from pe_triage_node.inference.preprocess import hu_to_channels

        ch = hu_to_channels(self.slices[start : start + WINDOW_SLICES].float())
        if ch.shape[1] < WINDOW_SLICES:
            ch = torch.nn.functional.pad(ch, (0, 0, 0, 0, 0, WINDOW_SLICES - ch.shape[1]))
        return ch

    def grid_windows(self, start: int, stop: int) -> torch.Tensor:
        """Windows ``start..stop-1`` of the inference grid, (B, 3, 10, S, S), via :meth:`PreparedStudy.window_batch`."""
        from pe_triage_node.inference.preprocess import PreparedStudy

        s = int(self.slices.shape[-1])
        z = int(self.slices.shape[0])
        p = PreparedStudy(self.slices.float(), (0, z, 0, s, 0, s), (z, s, s), (z, s, s), "cached", s)
        return p.window_batch(start, stop)


def load_cached(cache_dir: Path, split: str) -> tuple[list[CachedStudy], dict[str, Any]]:
    """All cached studies of a split, in memory (float16 slices), and the index."""
    import json

    out = Path(cache_dir) / split
    index = json.loads((out / "index.json").read_text())
    studies = []
    for e in index["studies"]:
        slices = torch.from_numpy(np.load(out / e["slices"]))
        mask = None
        if e.get("mask"):
            side = int(slices.shape[-1])
            mask = torch.from_numpy(np.unpackbits(np.load(out / e["mask"]), axis=-1, count=side).astype(bool))
        studies.append(CachedStudy(slices, torch.from_numpy(np.load(out / e["labels"])), e, mask))
    return studies, index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.cache", description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", type=Path, help="RSPECT-format folder (<split>.csv + <split>/)")
    ap.add_argument("cache_dir", type=Path)
    ap.add_argument("--split", default="train")
    ap.add_argument("--input-size", type=int, default=192, help="in-plane size (192 paper inference; 64 CPU variant)")
    ap.add_argument("--lung-crop", choices=("threshold", "lungmask"), default="threshold")
    ap.add_argument("--lungmask-weights", type=Path, default=None)
    args = ap.parse_args(argv)
    idx = cache_split(args.data_dir, args.cache_dir, split=args.split, input_size=args.input_size, lung_crop=args.lung_crop, lungmask_weights=args.lungmask_weights)
    print(f"cached {len(idx['studies'])} studies ({len(idx['rejected'])} rejected) in {args.cache_dir / args.split}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
