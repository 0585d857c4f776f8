"""The training recipe end to end on a tiny configuration (tiny phantoms, 32 x 32 windows, 1 epoch each phase):
phantoms, cache with masks, attention-guided phase 1, phase 2, thresholds, held-out evaluation, the node's engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pe_triage_node.inference.labels import STUDY_LABELS, WINDOW_LABEL

# training/ is a top-level folder of the repository, not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


@pytest.mark.slow
def test_pipeline_end_to_end_tiny(tmp_path: Path) -> None:
    from pe_triage_node.inference.engine import InferenceEngine
    from pe_triage_node.inference.weights import load_weights
    from training.cache import load_cached
    from training.demo_recipe import run_demo
    from training.phase1 import Phase1Config, train_phase1

    out = tmp_path / "model"
    res = run_demo(
        out,
        tmp_path / "work",
        studies={"train": 3, "val": 2, "test": 2},
        input_size=32,
        phase1_epochs=1,
        phase1_max_minutes=None,
        phase2_epochs=1,
        slices=(24, 30),
        device="cpu",
        show_progress=False,
    )
    manifest = json.loads(Path(res["manifest"]).read_text())
    assert manifest["input_size"] == 32
    assert "NOT FOR CLINICAL USE" in manifest["intended_use"]
    assert manifest["training"]["seeds"]["test"] not in (manifest["training"]["seeds"]["train"], manifest["training"]["seeds"]["val"])
    assert set(manifest["metrics"]) == {"heldout", "validation"}
    assert set(manifest["metrics"]["heldout"]["metrics"]) == {WINDOW_LABEL, *STUDY_LABELS}
    assert all(0 < t < 1 for t in manifest["thresholds"].values())
    assert (out / "evaluation" / "heldout_report.json").is_file()

    # The cache's window labels come from the per-slice labels.
    cached, index = load_cached(tmp_path / "work" / "cache", "train")
    assert index["input_size"] == 32 and len(cached) == 3
    for c in cached:
        assert c.slices.dtype == torch.float16 and c.slices.shape[1:] == (32, 32)
        assert bool(c.window_labels().any()) == (c.entry["q"] > 0)
        # the phantoms' embolus masks travel with the cache, on the prepared grid, where the labels are
        assert c.mask is not None and c.mask.shape == c.slices.shape
        with_clot = c.mask.flatten(1).any(dim=1)
        assert bool(with_clot.any()) == bool(c.slice_labels.any())
        if with_clot.any():  # mask slices are labelled slices (the resampled mask may spill one slice over)
            assert float(c.slice_labels.bool()[with_clot].float().mean()) >= 0.5
    assert index["studies_with_masks"] == 3
    p1 = manifest["training"]["phase1"]["attention_guidance"]
    assert p1["used"] and p1["lambda"] == 1.0 and p1["train_studies_with_masks"] == 3

    # Resuming a finished phase 1 trains nothing more.
    again = train_phase1(tmp_path / "work" / "cache", tmp_path / "work" / "run", Phase1Config(epochs=1, device="cpu"), show_progress=False)
    assert again["epochs_run"] == 1

    # The node's engine accepts the weights and serves at the trained input size.
    model = InferenceEngine(load_weights(Path(res["manifest"])), device="cpu", lung_crop="threshold")
    test_dir = tmp_path / "work" / "phantoms" / "test" / "train"
    series = next(p for p in test_dir.glob("*/*") if p.is_dir())
    result = model.analyse(series)
    assert result.geometry["input_size"] == 32
    assert set(result.probabilities) == set(STUDY_LABELS)
    assert np.isfinite(result.window_probabilities).all()


def test_phase1_can_start_from_earlier_weights() -> None:
    from pe_triage_node.inference.weights import default_manifest_path, load_weights
    from training.phase1 import Phase1Config, _init_record, initial_encoder

    manifest = default_manifest_path()
    shipped = load_weights(manifest).phase1.state_dict()
    started = initial_encoder(Phase1Config(init_manifest=str(manifest))).state_dict()
    assert all(torch.equal(shipped[k], started[k]) for k in shipped)
    fresh = initial_encoder(Phase1Config()).state_dict()
    assert not torch.equal(fresh["fc.weight"], shipped["fc.weight"])
    rec = _init_record(Phase1Config(init_manifest=str(manifest)))
    assert rec is not None and rec["phase1_sha256"] and rec["model_version"]
    assert _init_record(Phase1Config()) is None
