"""Phase 1 and phase 2 under torchrun (DistributedDataParallel, gloo, two processes) take the steps one process takes.

A tiny phantom set (4 training studies with embolus masks, so the attention loss
is on; 32 x 32 windows) trains for two epochs in one process and in a two-process
gloo job; the losses, the validation AUROC, the weights and the predictions agree
to rounding. Phase 1 runs in float64 for this: at initialisation r3d_18's
gradients with BatchNorm lose about 3 % (relative) to fp32 rounding whatever the
split of the batch (measured against float64), so fp32 runs agree only loosely.
Phase 2 runs with dropout 0 (each rank draws its own dropout masks, so only the
expectation would agree otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from training.cache import cache_split, load_cached  # noqa: E402
from training.common import GlobalBatchNorm3d, load_checkpoint  # noqa: E402
from training.phase1 import Phase1Config, extract_features, load_phase1, predict_windows, train_phase1  # noqa: E402
from training.phase2 import Phase2Config, train_phase2  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pe_triage_node.synth.rspect import write_rspect_dataset

    root = tmp_path_factory.mktemp("ddp")
    write_rspect_dataset(root / "train", studies=4, seed=11, slices=(24, 30), mix={"positive": 0.75, "negative": 0.25})
    write_rspect_dataset(root / "val", studies=2, seed=12, slices=(24, 30), mix={"positive": 0.5, "negative": 0.5})
    for split in ("train", "val"):
        cache_split(root / split, root / "cache", split="train", name=split, input_size=32, show_progress=False)
    return root / "cache"


def _torchrun(module: str, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", module, *args]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), atol=atol, rtol=atol), k


def test_phase1_two_gloo_processes_match_one(cache: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = Phase1Config(epochs=2, batch_size=4, device="cpu", precision="fp32", eval_batch=8, dtype="float64")
    one = train_phase1(cache, tmp_path / "one", cfg, show_progress=False)
    assert one["attention_guidance"]["used"] and one["processes"] == 1
    _torchrun("training.phase1", str(cache), str(tmp_path / "two"), "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--precision", "fp32", "--dtype", "float64", "--no-features")
    two = json.loads((tmp_path / "two" / "phase1.json").read_text())
    assert two["processes"] == 2
    for h1, h2 in zip(one["history"], two["history"], strict=True):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-7)
        assert h2["train_attention_loss"] == pytest.approx(h1["train_attention_loss"], rel=1e-7)
        assert h2["val_window_auroc"] == h1["val_window_auroc"]
    a, b = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")
    assert a is not None and b is not None
    _same_weights(a["model"], b["model"], atol=1e-7)
    val, _ = load_cached(cache, "val")
    p1 = np.concatenate(predict_windows(load_phase1(tmp_path / "one"), val, torch.device("cpu"), precision="fp32")[0])
    p2 = np.concatenate(predict_windows(load_phase1(tmp_path / "two"), val, torch.device("cpu"), precision="fp32")[0])
    assert np.allclose(p1, p2, atol=1e-5)  # the models load into float32 for prediction


def test_phase2_two_gloo_processes_match_one(cache: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    p1dir = tmp_path / "p1"
    train_phase1(cache, p1dir, Phase1Config(epochs=1, batch_size=4, device="cpu", precision="fp32"), show_progress=False)
    extract_features(cache, p1dir, device="cpu", precision="fp32")
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
        for f in ("features_train.npz", "features_val.npz"):
            shutil.copy(p1dir / f, tmp_path / d / f)
    cfg = Phase2Config(epochs=3, batch_size=4, dropout=0.0, device="cpu")
    one = train_phase2(cache, tmp_path / "one", tmp_path / "one", cfg, show_progress=False)
    _torchrun("training.phase2", str(cache), str(tmp_path / "two"), str(tmp_path / "two"), "--epochs", "3", "--batch-size", "4", "--dropout", "0", "--device", "cpu")
    two = json.loads((tmp_path / "two" / "phase2.json").read_text())
    assert two["processes"] == 2 and two["best_epoch"] == one["best_epoch"]
    assert two["best_val_loss"] == pytest.approx(one["best_val_loss"], rel=1e-4)
    a, b = load_checkpoint(tmp_path / "one" / "phase2_best.pt"), load_checkpoint(tmp_path / "two" / "phase2_best.pt")
    assert a is not None and b is not None
    _same_weights(a["model"], b["model"], atol=1e-4)


def test_global_batchnorm_is_batchnorm_in_one_process() -> None:
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm3d(3).train()
    gbn = GlobalBatchNorm3d(3).train()
    gbn.load_state_dict(bn.state_dict())
    x = torch.randn(4, 3, 2, 5, 5) * 3 + 1
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ["MASTER_PORT"] = str(29400 + os.getpid() % 500)
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        assert torch.allclose(gbn(x), bn(x), atol=1e-5)
        assert torch.allclose(gbn.running_mean, bn.running_mean, atol=1e-6)
        assert torch.allclose(gbn.running_var, bn.running_var, atol=1e-5)
    finally:
        dist.destroy_process_group()
