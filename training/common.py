"""Shared bits of the training steps: device, precision, seeds, atomic writes."""

from __future__ import annotations

import json
import os
import random
from contextlib import AbstractContextManager, nullcontext
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
