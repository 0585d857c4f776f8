"""Shared bits of the training steps: device, precision, seeds, atomic writes."""

from __future__ import annotations

import json
import os
import random
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


def pick_device(name: str = "auto") -> torch.device:
    """CUDA when present (``auto``), else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str = "auto") -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA and on CPUs with native bf16 (as the engine serves), else nothing (fp32)."""
    from pe_triage_node.inference.engine import resolve_precision

    p = resolve_precision(precision, device)  # type: ignore[arg-type]
    if p == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)


def resolved_precision(device: torch.device, precision: str = "auto") -> str:
    from pe_triage_node.inference.engine import resolve_precision

    return resolve_precision(precision, device)  # type: ignore[arg-type]


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` atomically; the state holds only tensors and plain data (``weights_only`` loadable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (``weights_only=True``), or ``None`` when absent."""
    if not path.is_file():
        return None
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state


# -- distributed training (torchrun) -------------------------------------------------------


@dataclass(frozen=True)
class DistContext:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes checkpoints, records and progress."""
        return self.rank == 0

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's share of ``items`` (every ``world``-th, starting at ``rank``)."""
        return items[self.rank :: self.world]

    def gather(self, part: list[Any]) -> list[Any]:
        """The inverse of :meth:`shard`: every rank's part, back in the original order."""
        if self.world == 1:
            return part
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, part)
        n = sum(len(p) for p in parts)
        out: list[Any] = [None] * n
        for r, p in enumerate(parts):
            out[r :: self.world] = p
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (decisions that depend on a clock)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def init_distributed(device: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the ``torchrun`` job when ``WORLD_SIZE`` > 1 (NCCL on CUDA, gloo on CPU) and pick this rank's device."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if world <= 1:
        return DistContext(), dev
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size()), dev


_STATS_GROUP: list[Any] = []


def _statistics_group() -> Any:
    """A process group of its own for the batch statistics, so that their all-reduces (in the
    forward and, through autograd, in the backward) never pair up with DDP's gradient buckets."""
    import torch.distributed as dist

    if not _STATS_GROUP:
        _STATS_GROUP.append(dist.new_group(backend="gloo"))
    return _STATS_GROUP[0]


class GlobalBatchNorm3d(torch.nn.BatchNorm3d):
    """BatchNorm3d whose training statistics are those of the whole batch across a gloo (CPU) job.

    torch's :class:`~torch.nn.SyncBatchNorm` runs on CUDA only; this is its CPU
    counterpart: per-channel sums, sums of squares and counts are all-reduced with
    the differentiable ``torch.distributed.nn.functional.all_reduce`` (mean first, then the
    centred sums of squares: two passes, no cancellation), so each rank
    normalises with the global mean and variance (as one process with the whole
    batch would) and the running statistics stay identical on every rank.
    State-dict keys are those of BatchNorm3d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        group = _statistics_group()
        c = x.shape[1]
        xf = x if x.dtype == torch.float64 else x.float()
        dims = [0, 2, 3, 4]
        count = torch.tensor([x.numel() / c], dtype=xf.dtype, device=x.device)
        first = all_reduce(torch.cat([xf.sum(dims), count]), group=group)
        total = first[-1]
        mean = first[:c] / total
        centred = xf - mean.view(1, c, 1, 1, 1)
        var = all_reduce((centred * centred).sum(dims), group=group) / total  # two passes: no cancellation
        with torch.no_grad():
            self.num_batches_tracked += 1  # type: ignore[operator,assignment]
            m = float(self.momentum) if self.momentum is not None else 1.0 / float(self.num_batches_tracked)  # type: ignore[arg-type]
            self.running_mean.mul_(1 - m).add_(m * mean)  # type: ignore[union-attr]
            self.running_var.mul_(1 - m).add_(m * var * total / (total - 1).clamp(min=1))  # type: ignore[union-attr]
        shape = (1, c, 1, 1, 1)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Batch statistics over the whole job: torch's SyncBatchNorm on CUDA, :class:`GlobalBatchNorm3d` on CPU."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_children()):
        if isinstance(child, torch.nn.BatchNorm3d) and not isinstance(child, GlobalBatchNorm3d):
            bn = GlobalBatchNorm3d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            bn.to(child.weight.device, child.weight.dtype)
            bn.load_state_dict(child.state_dict())
            setattr(model, name, bn)
        else:
            sync_batchnorm(child, device)
    return model


def wrap_ddp(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """``model`` as DistributedDataParallel when the job has more than one process, else as it is."""
    if ctx.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
