"""Step 2: phase 1 — r3d_18 on 10-slice windows, BCE on the window label (+ the attention loss where
embolus masks exist); and step 3: feature extraction.

Attention-guided (seeds/001 section 2.1, :mod:`training.attention`): windows of studies
whose data set ships embolus masks (the phantoms) add ``attention_lambda`` (1) x
(1 - continuous Dice) between the Grad-CAM map of the positive logit on ``layer4``
and the mask on that grid (all zeros for negative windows); studies without masks
(the RSNA download) train with the BCE alone. ``phase1.json`` (and the weights'
manifest) records lambda and how many training studies had masks.

Defaults are the paper's (MODEL.md): Adam lr 4e-4, batch 16, 20 epochs, keep
the epoch with the best validation window AUROC. An epoch visits every window
of the training grid that holds a positive slice plus as many negative windows
drawn at random (``neg_ratio`` x; ``neg_position_match`` of them at the positives' levels
in the chest), each start shifted by up to ``jitter`` slices
(a window's label is recomputed from its slices); validation runs on the
inference grid. Mixed precision (bf16 autocast) on CUDA and on CPUs with
native bf16, as the engine serves. A checkpoint is written after each epoch
(``PHASE1_DIR/last.pt``: model, optimiser, epoch, best; ``best.pt``: the best
model) and training resumes from it. Per-epoch randomness comes from
``numpy.random.default_rng([seed, epoch])`` so a resumed run draws the same windows.

``python -m training.phase1 CACHE OUT [--epochs 20] ...`` trains (``torchrun --nproc_per_node N -m training.phase1 ...``
on several GPUs or machines: DistributedDataParallel, NCCL on CUDA, gloo on CPU);
``python -m training.phase1 CACHE OUT --features-only`` writes ``OUT/features_<split>.npz``
(the 512-d penultimate activation per grid window) from ``best.pt``.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pe_triage_node.evaluation import delong_auroc
from pe_triage_node.inference.networks import WindowEncoder
from pe_triage_node.inference.volume import WINDOW_SLICES
from training.attention import attention_losses
from training.augment import augment_window
from training.cache import CachedStudy, load_cached
from training.common import (
    DistContext,
    autocast_for,
    init_distributed,
    load_checkpoint,
    pick_device,
    save_checkpoint,
    seed_everything,
    sync_batchnorm,
    wrap_ddp,
    write_json,
)

log = logging.getLogger(__name__)


@dataclass
class Phase1Config:
    """Phase-1 hyper-parameters (paper defaults)."""

    epochs: int = 20
    batch_size: int = 16
    lr: float = 4e-4
    seed: int = 0
    neg_ratio: float = 1.0  # negative windows per positive window in an epoch
    # share of those negatives drawn at the positives' levels in the chest (relative window position),
    # the rest uniformly: with uniform negatives alone the network learns where emboli usually are
    # (the hila) instead of what they look like, and every study's hilar windows score alike
    neg_position_match: float = 0.0
    jitter: int = 3  # random shift of a window's start, slices
    max_minutes: float | None = None  # stop after the epoch that passes this wall time (recorded)
    eval_batch: int = 32
    attention_lambda: float = 1.0  # weight of the attention loss on windows of studies with masks (0: off)
    augment: bool = True  # the paper's random crop and +-15 degree rotation (training/augment.py)
    device: str = "auto"
    precision: str = "auto"
    dtype: str = "float32"  # of weights and windows; "float64" (with precision fp32) checks equivalences to rounding
    init_manifest: str | None = None  # start from this weights manifest's phase 1 (the paper starts from Kinetics-400)


def _epoch_windows(studies: list[CachedStudy], cfg: Phase1Config, epoch: int) -> list[tuple[int, int]]:
    """(study, start slice) pairs of one epoch: all positive grid windows + ``neg_ratio`` x as many negatives."""
    rng = np.random.default_rng([cfg.seed, epoch])
    pos: list[tuple[int, int]] = []
    neg: list[tuple[int, int]] = []
    n_windows: list[int] = []
    for i, st in enumerate(studies):
        labels = st.window_labels()
        n_windows.append(len(labels))
        for w, y in enumerate(labels):
            (pos if y > 0 else neg).append((i, w))
    n_neg = min(len(neg), max(1, int(round(cfg.neg_ratio * max(len(pos), 1)))))
    p = _negative_weights(n_windows, pos, neg, cfg.neg_position_match)
    picked = pos + [neg[j] for j in rng.choice(len(neg), size=n_neg, replace=False, p=p)] if neg else list(pos)
    out = []
    for i, w in picked:
        z = int(studies[i].slices.shape[0])
        start = w * WINDOW_SLICES + (int(rng.integers(-cfg.jitter, cfg.jitter + 1)) if cfg.jitter else 0)
        out.append((i, int(min(max(0, start), max(0, z - 1)))))
    order = rng.permutation(len(out))
    return [out[j] for j in order]


POSITION_BINS = 10


def _negative_weights(n_windows: list[int], pos: list[tuple[int, int]], neg: list[tuple[int, int]], match: float) -> np.ndarray | None:
    """Sampling probabilities of the negative windows (study, window): ``match`` of the mass spread so that
    the negatives' relative positions in their studies (of ``n_windows[study]`` windows) follow the
    positives' (:data:`POSITION_BINS` bins), the rest uniform; ``None`` (uniform) when ``match`` is 0 or
    there are no positives."""
    if match <= 0 or not pos:
        return None

    def position_bin(i: int, w: int) -> int:
        return min(POSITION_BINS - 1, int((w + 0.5) / n_windows[i] * POSITION_BINS))

    pos_hist = np.bincount([position_bin(i, w) for i, w in pos], minlength=POSITION_BINS).astype(np.float64)
    neg_bins = np.array([position_bin(i, w) for i, w in neg])
    neg_hist = np.bincount(neg_bins, minlength=POSITION_BINS).astype(np.float64)
    matched = (pos_hist / pos_hist.sum())[neg_bins] / neg_hist[neg_bins]  # sums to 1 over bins that hold negatives
    matched /= matched.sum()
    p = match * matched + (1.0 - match) / len(neg)
    return np.asarray(p / p.sum())


class TrainingForward(torch.nn.Module):
    """The training forward of a :class:`WindowEncoder` as a module (what DistributedDataParallel wraps).

    stem..layer3 run under the serving autocast, ``layer4`` and the head in fp32:
    on this project's CPU (torch 2.14, oneDNN) the bf16 weight gradient of
    ``layer4``'s small 3-D convolutions came out non-finite after a few steps;
    fp32 there keeps training stable at little cost (layer4 sees 1/8 of the
    resolution). Inference is unchanged (the engine's own autocast). Returns the
    logit (B,) and the Grad-CAM map of the logit on ``layer4`` (B, T', H', W'),
    differentiable (WindowEncoder.forward's closed form).
    """

    def __init__(self, encoder: WindowEncoder, device: torch.device, precision: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.run_device = device
        self.precision = precision

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.encoder
        with autocast_for(self.run_device, self.precision):
            a = m.layer3(m.layer2(m.layer1(m.stem(x))))
        a = m.layer4(a.float() if a.dtype in (torch.bfloat16, torch.float16) else a)
        logit = m.fc(m.avgpool(a).flatten(1))[:, 0]
        cam = torch.einsum("bcthw,c->bthw", a, m.fc.weight[0]) / (a.shape[2] * a.shape[3] * a.shape[4])
        return logit, cam


def initial_encoder(cfg: Phase1Config) -> WindowEncoder:
    """A fresh :class:`WindowEncoder`, or ``cfg.init_manifest``'s phase 1 (sha256-checked by the loader)."""
    if cfg.init_manifest is None:
        return WindowEncoder()
    from pe_triage_node.inference.weights import load_weights

    encoder = load_weights(Path(cfg.init_manifest)).phase1
    log.info("phase 1 starts from %s", cfg.init_manifest)
    return encoder


def _training_window(st: CachedStudy, start: int, cfg: Phase1Config, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A training window (3, 10, S, S) and its mask (10, S, S) or ``None``, augmented when ``cfg.augment``."""
    x, m = st.window(start), st.window_mask(start)
    if cfg.augment:
        x, m = augment_window(x, m, rng)
    return x, m


def _window_label(st: CachedStudy, start: int) -> float:
    return float(bool(st.slice_labels[start : start + WINDOW_SLICES].any()))


@torch.inference_mode()
def predict_windows(model: WindowEncoder, studies: list[CachedStudy], device: torch.device, *, batch: int = 32, precision: str = "auto") -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Phase-1 probabilities and 512-d features for every grid window of every study."""
    model.eval()
    probs, feats = [], []
    for st in studies:
        p, f = [], []
        for a in range(0, st.n_windows, batch):
            x = st.grid_windows(a, min(st.n_windows, a + batch)).to(device, next(model.parameters()).dtype)
            with autocast_for(device, precision):
                logit, feat, _ = model(x)
            p.append(torch.sigmoid(logit.float()).cpu())
            f.append(feat.float().cpu())
        probs.append(torch.cat(p).numpy())
        feats.append(torch.cat(f).numpy())
    return probs, feats


def train_phase1(cache_dir: Path, out_dir: Path, cfg: Phase1Config, *, show_progress: bool = True) -> dict[str, Any]:
    """Train phase 1 on ``cache_dir/train``, select on ``cache_dir/val``; return the training record.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank draws the same epoch and takes
    its share of each batch; DistributedDataParallel averages the gradients, batch
    statistics are the whole batch's (SyncBatchNorm on CUDA, :class:`~training.common.GlobalBatchNorm3d`
    on CPU) and each rank's loss is its samples' sum over the whole batch's size
    (times the world size, which DDP's averaging divides out), so the job takes the
    steps one process would. Validation is shared out by study; rank 0 writes.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    ctx, device = init_distributed(cfg.device)
    if ctx.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    train, tindex = load_cached(cache_dir, "train")
    val, _ = load_cached(cache_dir, "val")
    dtype = getattr(torch, cfg.dtype)
    model = initial_encoder(cfg).to(device, dtype)
    if ctx.world > 1:
        sync_batchnorm(model, device)  # before the optimiser: the converted layers hold new parameters
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history: list[dict[str, Any]] = []
    best_auc, best_epoch, start_epoch = -1.0, -1, 0
    elapsed_before = 0.0
    ck = load_checkpoint(out_dir / "last.pt")
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch, best_auc, best_epoch = int(ck["epoch"]) + 1, float(ck["best_auc"]), int(ck["best_epoch"])
        history = list(ck["history"])
        elapsed_before = float(ck.get("elapsed_s", 0.0))
        log.info("resuming phase 1 at epoch %d", start_epoch)
    net = wrap_ddp(TrainingForward(model, device, cfg.precision), ctx, device)
    t0 = time.perf_counter()
    val_y = np.concatenate([st.window_labels() for st in val])
    stopped_early = False
    for epoch in range(start_epoch, cfg.epochs):
        if ctx.any(cfg.max_minutes is not None and elapsed_before + time.perf_counter() - t0 > cfg.max_minutes * 60):
            stopped_early = True
            break
        # Each epoch re-seeds torch too, so a resumed run trains identically.
        torch.manual_seed(cfg.seed * 1000 + epoch)
        net.train()
        items = _epoch_windows(train, cfg, epoch)
        aug_rng = np.random.default_rng([cfg.seed, epoch, 1])
        losses: list[float] = []
        att_losses: list[tuple[float, int]] = []
        skipped = 0
        bar = tqdm(range(0, len(items), cfg.batch_size), desc=f"phase1 epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not (show_progress and ctx.main))
        for a in bar:
            chunk = items[a : a + cfg.batch_size]
            # every rank draws the whole batch's augmentation (same random stream), then keeps its share
            windows = [_training_window(train[i], s, cfg, aug_rng) for i, s in chunk]
            mine = ctx.shard(list(range(len(chunk))))
            x = torch.stack([windows[j][0] for j in mine]).to(device, dtype)
            y = torch.tensor([_window_label(train[chunk[j][0]], chunk[j][1]) for j in mine], device=device, dtype=dtype)
            logit, cam = net(x)
            per_sample = F.binary_cross_entropy_with_logits(logit.to(dtype), y, reduction="none")
            guided = [k for k, j in enumerate(mine) if windows[j][1] is not None]
            att_sum = torch.zeros((), device=device)
            if cfg.attention_lambda > 0 and guided:
                masks = torch.stack([windows[mine[k]][1] for k in guided]).to(device, dtype)  # type: ignore[misc]
                sel = torch.tensor(guided, device=device)
                att = attention_losses(cam[sel], masks, y[sel])
                att_sum = att.sum()
                att_losses.append((float(att_sum.detach()), len(guided)))
            # the batch's mean over all its samples; x world, which DDP's gradient averaging divides out
            loss = (per_sample.sum() + cfg.attention_lambda * att_sum) * (ctx.world / len(chunk))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not torch.isfinite(loss) or not all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None):
                skipped += 1  # a non-finite gradient: drop this step rather than poison the weights
                continue
            opt.step()
            # this rank's part of the batch's loss (the parts of all ranks add up to it)
            losses.append((float(per_sample.detach().sum()) + cfg.attention_lambda * float(att_sum.detach())) / len(chunk))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", skipped=skipped)
        mean_loss = _epoch_loss(ctx, losses)
        probs = ctx.gather(predict_windows(model, ctx.shard(val), device, batch=cfg.eval_batch, precision=cfg.precision)[0])
        auc, _ = delong_auroc(val_y, np.concatenate(probs)) if len(val_y) else (float("nan"), 0.0)
        auc = float(auc) if not np.isnan(auc) else 0.0
        study_auc = study_max_auroc(val, probs)
        score = selection_score(auc, study_auc)
        rec = {
            "epoch": epoch + 1,
            "train_loss": mean_loss,
            "train_attention_loss": _epoch_attention_loss(ctx, att_losses),
            "train_windows": len(items),
            "skipped_steps": skipped,
            "val_window_auroc": round(auc, 4),
            "val_study_max_auroc": None if study_auc is None else round(study_auc, 4),
            "val_selection_score": round(score, 4),
        }
        history.append(rec)
        log.info("phase1 %s", rec)
        if show_progress and ctx.main:
            print(f"phase1 epoch {epoch + 1}: loss {rec['train_loss']:.4f} val window AUROC {auc:.4f}, study (highest window) {rec['val_study_max_auroc']}", flush=True)
        if score > best_auc:
            best_auc, best_epoch = score, epoch + 1
            if ctx.main:
                save_checkpoint(out_dir / "best.pt", {"model": model.state_dict(), "epoch": epoch})
        if ctx.main:
            save_checkpoint(
                out_dir / "last.pt",
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "epoch": epoch,
                    "best_auc": best_auc,
                    "best_epoch": best_epoch,
                    "history": history,
                    "elapsed_s": elapsed_before + time.perf_counter() - t0,
                },
            )
        ctx.barrier()
    record = {
        "config": asdict(cfg),
        "device": str(device),
        "processes": ctx.world,
        "input_size": tindex["input_size"],
        "train_studies": len(train),
        "val_studies": len(val),
        "attention_guidance": {
            "loss": "BCE + lambda * (1 - continuous Dice(Grad-CAM of the positive logit on layer4, embolus mask on its grid)); training/attention.py",
            "lambda": cfg.attention_lambda,
            "train_studies_with_masks": sum(1 for st in train if st.mask is not None),
            "used": cfg.attention_lambda > 0 and any(st.mask is not None for st in train),
        },
        "augmentation": "random in-plane crop offset (up to (224-192)/224 of the field) with the window start's z shift, rotation up to 15 degrees (training/augment.py)" if cfg.augment else "none",
        "initialised_from": _init_record(cfg),
        "best_epoch": best_epoch,
        "selection": SELECTION_RULE,
        "best_val_selection_score": round(best_auc, 4),
        "best_val_window_auroc": history[best_epoch - 1]["val_window_auroc"] if best_epoch > 0 else None,
        "epochs_run": len(history),
        "stopped_by_time_limit": stopped_early,
        "history": history,
        "seconds": round(elapsed_before + time.perf_counter() - t0, 1),
    }
    if ctx.main:
        write_json(out_dir / "phase1.json", record)
    ctx.barrier()
    return record


SELECTION_RULE = (
    "best epoch by the mean of the validation window AUROC and the study AUROC of each study's highest window "
    "(PE-positive studies against the rest); window AUROC alone where validation has one class of studies"
)


def study_max_auroc(studies: list[CachedStudy], probs: list[np.ndarray]) -> float | None:
    """AUROC of each study's highest window probability for "any window positive"; ``None`` with one class.

    A network that scores windows by where emboli usually are (the hila) ranks windows
    well and studies not at all; this is the figure the worklist needs."""
    y = np.array([float(st.window_labels().any()) for st in studies])
    if len(y) == 0 or y.min() == y.max():
        return None
    auc, _ = delong_auroc(y, np.array([float(p.max()) if len(p) else 0.0 for p in probs]))
    return None if np.isnan(auc) else float(auc)


def selection_score(window_auc: float, study_auc: float | None) -> float:
    """What picks the best epoch: :data:`SELECTION_RULE`."""
    return window_auc if study_auc is None else 0.5 * (window_auc + study_auc)


def _init_record(cfg: Phase1Config) -> dict[str, Any] | None:
    """Which weights phase 1 started from: the manifest's model, version and phase-1 file sha256; ``None``: random."""
    if cfg.init_manifest is None:
        return None
    import json

    m = json.loads(Path(cfg.init_manifest).read_text(encoding="utf-8"))
    files = [f for f in m.get("files", []) if f.get("role") == "phase1"]
    return {
        "manifest": str(cfg.init_manifest),
        "model_name": m.get("model_name"),
        "model_version": m.get("model_version"),
        "phase1_sha256": files[0]["sha256"] if files else None,
    }


def _epoch_loss(ctx: DistContext, parts: list[float]) -> float | None:
    """Mean over the epoch's steps of each batch's loss (every rank's parts of a step added up)."""
    steps = np.sum(np.array(ctx.gather([parts]), dtype=np.float64), axis=0) if ctx.world > 1 else np.array(parts)
    return float(np.mean(steps)) if len(steps) else None


def _epoch_attention_loss(ctx: DistContext, sums: list[tuple[float, int]]) -> float | None:
    """Mean attention loss over the epoch's guided windows, all ranks together."""
    allv = [v for part in ctx.gather([sums]) for v in part] if ctx.world > 1 else sums
    n = sum(c for _, c in allv)
    return float(sum(v for v, _ in allv) / n) if n else None


def load_phase1(out_dir: Path) -> WindowEncoder:
    """The best phase-1 model of a run (``best.pt``), in eval mode on the CPU."""
    ck = load_checkpoint(Path(out_dir) / "best.pt")
    if ck is None:
        raise FileNotFoundError(f"{out_dir}/best.pt not found: train phase 1 first")
    model = WindowEncoder()
    model.load_state_dict(ck["model"])
    return model.eval()


def extract_features(cache_dir: Path, out_dir: Path, splits: tuple[str, ...] = ("train", "val"), *, device: str = "auto", precision: str = "auto", batch: int = 32) -> dict[str, Path]:
    """Write ``OUT/features_<split>.npz`` (per study: ``f<k>`` features (N, 512), ``p<k>`` phase-1 probabilities)."""
    dev = pick_device(device)
    model = load_phase1(out_dir).to(dev)
    paths = {}
    for split in splits:
        path = Path(out_dir) / f"features_{split}.npz"
        if path.is_file():
            paths[split] = path
            continue
        studies, _ = load_cached(cache_dir, split)
        probs, feats = predict_windows(model, studies, dev, batch=batch, precision=precision)
        arrays = {f"f{k}": f.astype(np.float32) for k, f in enumerate(feats)}
        arrays.update({f"p{k}": p.astype(np.float32) for k, p in enumerate(probs)})
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        tmp.replace(path)
        paths[split] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.phase1", description="phase 1 (r3d_18 windows) training and feature extraction")
    ap.add_argument("cache_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--neg-ratio", type=float, default=1.0)
    ap.add_argument("--neg-position-match", type=float, default=0.0,
                    help="share of the negative windows drawn at the positives' levels in the chest (0: uniform)")
    ap.add_argument("--attention-lambda", type=float, default=1.0, help="weight of the attention loss where masks exist (0: classification loss only)")
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--init", type=str, default=None, metavar="MANIFEST", help="start from this weights manifest's phase 1 (default: random)")
    ap.add_argument("--no-augment", action="store_true", help="no random crop/rotation")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto", help="auto: bf16 on CUDA and on CPUs with native bf16")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="float64 (with --precision fp32): checks, not training")
    ap.add_argument("--features-only", action="store_true", help="only extract features from best.pt")
    ap.add_argument("--no-features", action="store_true", help="train only")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    ctx = DistContext()
    if not args.features_only:
        cfg = Phase1Config(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, neg_ratio=args.neg_ratio, neg_position_match=args.neg_position_match, max_minutes=args.max_minutes,
            attention_lambda=args.attention_lambda, augment=not args.no_augment, init_manifest=args.init, device=args.device, precision=args.precision, dtype=args.dtype,
        )
        ctx, _ = init_distributed(args.device)  # torchrun: every rank trains, rank 0 extracts the features
        train_phase1(args.cache_dir, args.out_dir, cfg, show_progress=ctx.main)
    if ctx.main and not args.no_features:
        print(extract_features(args.cache_dir, args.out_dir, device=args.device, precision=args.precision))
    ctx.barrier()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
