"""Step 4: phase 2 — TCN + attention heads on the phase-1 features, the paper's weighted loss.

Each study's (N, 512) features become a length-40 sequence with
:func:`pe_triage_node.inference.networks.fit_sequence` (as the engine does);
the window labels follow the same map (linear interpolation when N > 40, so
they may be fractional). Loss (MODEL.md): per study i, the nine study BCEs times
their challenge weights plus the window BCEs times 0.0736 x q_i (q_i = share of
positive slices), summed over the batch and divided by sum_i (N_i + 9).
``window_q_floor`` > 0 (default 0, the paper) lets negative studies' windows
(q_i = 0) teach the window head too: q_i is replaced by max(q_i, floor).
Adam 5e-4, x0.9 every 20 steps, batch 64, 200 epochs, keep the lowest validation loss.
Each epoch ``partial_coverage`` (0.3) of the training studies are cut to a random
contiguous run of their windows (:func:`epoch_sequences`), so short series and series
that cover only part of the chest are seen in training; validation is never cut.
Checkpoints: ``OUT/phase2_last.pt`` (resume), ``OUT/phase2_best.pt``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pe_triage_node.inference.labels import CHALLENGE_WEIGHTS, STUDY_LABELS, WINDOW_LABEL
from pe_triage_node.inference.networks import StudyModel, StudyModelSpec, fit_sequence, unfit_sequence
from training.augment import partial_coverage
from training.common import init_distributed, load_checkpoint, save_checkpoint, seed_everything, wrap_ddp, write_json

log = logging.getLogger(__name__)


@dataclass
class Phase2Config:
    """Phase-2 hyper-parameters (paper defaults)."""

    epochs: int = 200
    batch_size: int = 64
    lr: float = 5e-4
    lr_step: int = 20  # optimiser steps between decays
    lr_gamma: float = 0.9
    seed: int = 0
    padding: str = "symmetric"
    window_q_floor: float = 0.0
    dropout: float = 0.2  # the TCN's (MODEL.md)
    partial_coverage: float = 0.3  # share of training studies cut to a random run of their windows each epoch
    device: str = "auto"


@dataclass
class SequenceSet:
    """Fixed-length sequences of one split, ready for phase 2."""

    x: torch.Tensor  # (B, 40, 512)
    mask: torch.Tensor  # (B, 40) bool
    window_y: torch.Tensor  # (B, 40) in [0, 1]
    study_y: torch.Tensor  # (B, 9)
    q: torch.Tensor  # (B,)
    n_windows: list[int]
    window_labels: list[np.ndarray]  # grid labels per study (N,)
    phase1_probs: list[np.ndarray]
    features: list[np.ndarray]


def load_sequences(cache_dir: Path, phase1_dir: Path, split: str, length: int = 40) -> SequenceSet:
    """Features (``features_<split>.npz``) + cached labels -> a :class:`SequenceSet`."""
    from training.cache import load_cached

    studies, index = load_cached(cache_dir, split)
    npz = np.load(Path(phase1_dir) / f"features_{split}.npz")
    xs, ms, wys, sys_, qs, ns, wls, pps, fs = [], [], [], [], [], [], [], [], []
    for k, st in enumerate(studies):
        f = npz[f"f{k}"]
        wl = st.window_labels()
        if len(wl) != len(f):
            raise ValueError(f"study {k}: {len(f)} features but {len(wl)} windows (stale features?)")
        seq, mask = fit_sequence(torch.from_numpy(f), length)
        wseq, _ = fit_sequence(torch.from_numpy(wl)[:, None], length)
        xs.append(seq)
        ms.append(mask)
        wys.append(wseq[:, 0].clamp(0, 1))
        sys_.append(torch.tensor([float(st.entry["study_labels"][k2]) for k2 in STUDY_LABELS]))
        qs.append(float(st.entry["q"]))
        ns.append(len(f))
        wls.append(wl)
        pps.append(npz[f"p{k}"])
        fs.append(f)
    return SequenceSet(torch.stack(xs), torch.stack(ms), torch.stack(wys), torch.stack(sys_), torch.tensor(qs), ns, wls, pps, fs)


def epoch_sequences(data: SequenceSet, cfg: Phase2Config, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training sequences of one epoch: ``cfg.partial_coverage`` of the studies cut to a random
    contiguous run of their windows (:func:`training.augment.partial_coverage`: short series,
    series that cover part of the chest), refitted to the sequence length as the engine does."""
    if cfg.partial_coverage <= 0:
        return data.x, data.mask, data.window_y
    rng = np.random.default_rng([cfg.seed, epoch, 2])
    x, mask, wy = data.x.clone(), data.mask.clone(), data.window_y.clone()
    length = x.shape[1]
    for k, (f, wl) in enumerate(zip(data.features, data.window_labels)):
        if len(f) < 2 or rng.random() >= cfg.partial_coverage:
            continue
        a, b = partial_coverage(wl, rng)
        x[k], mask[k] = fit_sequence(torch.from_numpy(f[a:b]), length)
        wseq, _ = fit_sequence(torch.from_numpy(wl[a:b])[:, None], length)
        wy[k] = wseq[:, 0].clamp(0, 1)
    return x, mask, wy


def challenge_loss(
    window_logits: torch.Tensor,
    study_logits: torch.Tensor,
    mask: torch.Tensor,
    window_y: torch.Tensor,
    study_y: torch.Tensor,
    q: torch.Tensor,
    *,
    q_floor: float = 0.0,
    norm: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """The paper's weighted loss (see the module docstring) for one batch; ``norm`` overrides
    sum_i (N_i + 9) (a rank's share of a batch divides by the whole batch's)."""
    w_study = torch.tensor([CHALLENGE_WEIGHTS[k] for k in STUDY_LABELS], device=study_logits.device)
    study = (F.binary_cross_entropy_with_logits(study_logits, study_y, reduction="none") * w_study).sum()
    qq = torch.clamp(q, min=q_floor) if q_floor > 0 else q
    win = F.binary_cross_entropy_with_logits(window_logits, window_y, reduction="none") * mask.float()
    window = (win.sum(dim=1) * CHALLENGE_WEIGHTS[WINDOW_LABEL] * qq).sum()
    if norm is None:
        norm = (mask.float().sum(dim=1) + len(STUDY_LABELS)).sum()
    return (study + window) / norm


def _model(cfg: Phase2Config) -> StudyModel:
    return StudyModel(StudyModelSpec(padding=cfg.padding, dropout=cfg.dropout))  # type: ignore[arg-type]


@torch.no_grad()
def _val_loss(model: StudyModel, data: SequenceSet, cfg: Phase2Config, device: torch.device) -> float:
    model.eval()
    wl, sl, _ = model(data.x.to(device), data.mask.to(device))
    return float(challenge_loss(wl, sl, data.mask.to(device), data.window_y.to(device), data.study_y.to(device), data.q.to(device), q_floor=cfg.window_q_floor))


def train_phase2(cache_dir: Path, phase1_dir: Path, out_dir: Path, cfg: Phase2Config, *, show_progress: bool = True) -> dict[str, Any]:
    """Train phase 2 on the train features, keep the lowest validation loss; return the record."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    ctx, device = init_distributed(cfg.device)
    if ctx.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    train = load_sequences(cache_dir, phase1_dir, "train")
    val = load_sequences(cache_dir, phase1_dir, "val")
    model = _model(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    best, best_epoch, start, history = float("inf"), -1, 0, []
    ck = load_checkpoint(out_dir / "phase2_last.pt")
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start, best, best_epoch, history = int(ck["epoch"]) + 1, float(ck["best"]), int(ck["best_epoch"]), list(ck["history"])
    net = wrap_ddp(model, ctx, device)
    t0 = time.perf_counter()
    n = train.x.shape[0]
    bar = tqdm(range(start, cfg.epochs), desc="phase2", unit="epoch", disable=not (show_progress and ctx.main))
    for epoch in bar:
        torch.manual_seed(cfg.seed * 1000 + epoch)
        net.train()
        perm = torch.randperm(n)
        ex, em, ewy = epoch_sequences(train, cfg, epoch)
        # under torchrun a rank seeds its dropout apart (the masks differ from one process's; the expectation does not)
        torch.manual_seed(cfg.seed * 1000 + epoch + 7919 * ctx.rank)
        losses = []
        for a in range(0, n, cfg.batch_size):
            batch = perm[a : a + cfg.batch_size]
            norm = float((em[batch].float().sum(dim=1) + len(STUDY_LABELS)).sum())  # the whole batch's
            idx = batch[ctx.rank :: ctx.world]
            if len(idx) == 0:  # fewer studies than ranks in this batch: still join the gradient exchange
                idx = batch[:1]
                scale = 0.0
            else:
                scale = float(ctx.world)
            wl, sl, _ = net(ex[idx].to(device), em[idx].to(device))
            part = challenge_loss(wl, sl, em[idx].to(device), ewy[idx].to(device), train.study_y[idx].to(device), train.q[idx].to(device), q_floor=cfg.window_q_floor, norm=norm)
            loss = part * scale  # x world: DDP averages the gradients over the ranks
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(part.detach()) if scale else 0.0)  # summed over the ranks: the batch's loss
        train_loss = float(np.sum(ctx.gather([float(np.mean(losses))]))) if ctx.world > 1 else float(np.mean(losses))
        vl = _val_loss(model, val, cfg, device)
        history.append({"epoch": epoch + 1, "train_loss": round(train_loss, 5), "val_loss": round(vl, 5)})
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{vl:.4f}")
        if vl < best:
            best, best_epoch = vl, epoch + 1
            if ctx.main:
                save_checkpoint(out_dir / "phase2_best.pt", {"model": model.state_dict(), "epoch": epoch})
        if ctx.main and ((epoch + 1) % 10 == 0 or epoch + 1 == cfg.epochs):
            save_checkpoint(
                out_dir / "phase2_last.pt",
                {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch, "best": best, "best_epoch": best_epoch, "history": history},
            )
    record = {
        "config": asdict(cfg),
        "device": str(device),
        "processes": ctx.world,
        "train_studies": n,
        "val_studies": int(val.x.shape[0]),
        "best_epoch": best_epoch,
        "best_val_loss": round(best, 5),
        "epochs_run": len(history),
        "history_every_10": history[9::10],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if ctx.main:
        write_json(out_dir / "phase2.json", record)
    ctx.barrier()
    return record


def load_phase2(out_dir: Path, cfg: Phase2Config) -> StudyModel:
    """The best phase-2 model (``phase2_best.pt``) in eval mode on the CPU."""
    ck = load_checkpoint(Path(out_dir) / "phase2_best.pt")
    if ck is None:
        raise FileNotFoundError(f"{out_dir}/phase2_best.pt not found: train phase 2 first")
    model = _model(cfg)
    model.load_state_dict(ck["model"])
    return model.eval()


@torch.inference_mode()
def predict_split(model: StudyModel, data: SequenceSet) -> tuple[list[dict[str, float]], list[list[float]]]:
    """Study probabilities and per-window probabilities exactly as the engine computes them."""
    model.eval()
    studies, windows = [], []
    for k, f in enumerate(data.features):
        n = len(f)
        seq, mask = fit_sequence(torch.from_numpy(f), model.spec.sequence_length)
        wl, sl, _ = model(seq[None], mask[None])
        windows.append([float(v) for v in torch.sigmoid(unfit_sequence(wl[0], n))])
        studies.append({lab: float(torch.sigmoid(sl[0, i])) for i, lab in enumerate(STUDY_LABELS)})
    return studies, windows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.phase2", description="phase 2 (TCN + attention) training")
    ap.add_argument("cache_dir", type=Path)
    ap.add_argument("phase1_dir", type=Path, help="folder with features_train.npz / features_val.npz")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--padding", choices=("symmetric", "causal"), default="symmetric")
    ap.add_argument("--window-q-floor", type=float, default=0.0)
    ap.add_argument("--partial-coverage", type=float, default=0.3, help="share of studies cut to a random run of windows per epoch (0: never)")
    ap.add_argument("--dropout", type=float, default=0.2, help="the TCN's dropout (MODEL.md: 0.2)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    cfg = Phase2Config(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, padding=args.padding, window_q_floor=args.window_q_floor, partial_coverage=args.partial_coverage, dropout=args.dropout, device=args.device)
    record = train_phase2(args.cache_dir, args.phase1_dir, args.out_dir, cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
