"""Training's pure parts: the challenge loss, the attention loss, augmentation, phase 2's sequences (the recipe end to end is in tests/integration/test_training_recipe.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pe_triage_node.inference.labels import (
    CHALLENGE_WEIGHTS,
    STUDY_LABELS,
    WINDOW_LABEL,
)

# training/ is a top-level folder of the repository, not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from training.attention import attention_loss, continuous_dice_loss, mask_to_cells  # noqa: E402
from training.phase2 import challenge_loss  # noqa: E402


def test_challenge_loss_hand_case() -> None:
    # All logits 0 -> every BCE is ln 2. One study, 2 of 3 steps valid, q = 0.5:
    # (ln2 * sum of the nine study weights + 2 * ln2 * 0.0736 * 0.5) / (2 + 9)
    mask = torch.tensor([[True, True, False]])
    loss = challenge_loss(torch.zeros(1, 3), torch.zeros(1, 9), mask, torch.tensor([[1.0, 0.0, 1.0]]), torch.zeros(1, 9), torch.tensor([0.5]))
    expected = math.log(2) * (sum(CHALLENGE_WEIGHTS[k] for k in STUDY_LABELS) + 2 * CHALLENGE_WEIGHTS[WINDOW_LABEL] * 0.5) / 11
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # A floor on q makes negative studies' windows count.
    zero_q = challenge_loss(torch.zeros(1, 3), torch.zeros(1, 9), mask, torch.zeros(1, 3), torch.zeros(1, 9), torch.tensor([0.0]), q_floor=0.1)
    assert float(zero_q) > math.log(2) * sum(CHALLENGE_WEIGHTS[k] for k in STUDY_LABELS) / 11


def _embolus_window() -> tuple[torch.Tensor, torch.Tensor]:
    """A (1, 10, 64, 64) window mask with an embolus, and its cells on r3d_18's layer-4 grid (2 x 4 x 4)."""
    mask = torch.zeros(1, 10, 64, 64)
    mask[0, 6:9, 18:22, 34:40] = 1.0  # voxels near cell (1, 1, 2)
    return mask, mask_to_cells(mask, (2, 4, 4))


def test_mask_reaches_the_cells_whose_centres_are_nearest() -> None:
    mask, cells = _embolus_window()
    assert cells.shape == (1, 2, 4, 4)
    assert torch.nonzero(cells[0]).tolist() == [[1, 1, 2]]
    assert mask_to_cells(torch.zeros(2, 10, 64, 64), (2, 4, 4)).sum() == 0


def test_attention_loss_is_zero_for_a_perfect_map_and_positive_otherwise() -> None:
    mask, cells = _embolus_window()
    one = torch.ones(1)
    perfect = 3.0 * cells  # any positive scale: the map is max-normalised on positive windows
    assert float(attention_loss(perfect, mask, one)) == pytest.approx(0.0, abs=1e-6)
    elsewhere = torch.roll(perfect, shifts=2, dims=3)
    assert float(attention_loss(elsewhere, mask, one)) > 0.5
    spread = perfect + 0.5  # right place, but also everywhere else
    assert 0.0 < float(attention_loss(spread, mask, one)) < float(attention_loss(elsewhere, mask, one))
    negative = torch.zeros(1)  # a negative window: its mask is all zeros whatever was drawn
    assert float(attention_loss(torch.zeros(1, 2, 4, 4), mask, negative)) == pytest.approx(0.0, abs=1e-6)
    cam = perfect.clone().requires_grad_(True)
    loss = attention_loss(cam, mask, negative)
    assert loss.item() > 0
    loss.backward()
    assert cam.grad is not None and float(cam.grad.abs().sum()) > 0  # asks the map to fade


def test_continuous_dice_matches_the_definition_on_a_hand_case() -> None:
    a = torch.tensor([[0.5, 1.0, 0.0, 0.25]])
    m = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    # sum(a m) = 1.5, sum(a sign m) = 1.5 -> c = 1; cDC = (2 * 1.5 + eps) / (1.75 + 2 + eps)
    assert float(continuous_dice_loss(a, m, eps=0.0)) == pytest.approx(1 - 3.0 / 3.75)
    assert float(continuous_dice_loss(a, m, eps=1.0)) == pytest.approx(1 - 4.0 / 4.75)


def test_augmentation_moves_window_and_mask_together() -> None:
    from training.augment import augment_window

    x = torch.zeros(3, 10, 64, 64)
    mask = torch.zeros(10, 64, 64)
    x[:, 3:6, 10:18, 40:50] = 1.0  # a bright lesion off-centre
    mask[3:6, 10:18, 40:50] = 1.0
    same, same_mask = augment_window(x, mask, np.random.default_rng(0), max_rotation_deg=0.0, max_shift=0.0)
    assert torch.allclose(same, x, atol=1e-5) and same_mask is not None and torch.equal(same_mask, mask)
    moved = 0
    for seed in range(8):
        xa, ma = augment_window(x, mask, np.random.default_rng(seed))
        assert xa.shape == x.shape and ma is not None and ma.shape == mask.shape
        assert float(xa[0][ma > 0].mean()) > 0.6  # the mask still lies on the lesion
        assert float(ma.sum()) > 0.5 * float(mask.sum())
        moved += int(not torch.equal(ma, mask))
    assert moved >= 6
    xa, none = augment_window(x, None, np.random.default_rng(1))
    assert none is None


def test_partial_coverage_keeps_a_positive_window_and_a_minimum_run() -> None:
    from training.augment import partial_coverage

    labels = np.zeros(30, dtype=np.float32)
    labels[[4, 25]] = 1
    rng = np.random.default_rng(0)
    lengths = set()
    for _ in range(200):
        a, b = partial_coverage(labels, rng)
        assert 0 <= a < b <= 30 and b - a >= 9
        assert labels[a:b].any()
        lengths.add(b - a)
    assert min(lengths) < 15 and max(lengths) == 30
    a, b = partial_coverage(np.zeros(2, dtype=np.float32), rng)
    assert (a, b) == (0, 2)


def test_epoch_sequences_cut_some_studies_and_pad_them() -> None:
    from pe_triage_node.inference.networks import fit_sequence
    from training.phase2 import Phase2Config, SequenceSet, epoch_sequences

    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((n, 8)).astype(np.float32) for n in (12, 50, 30)]
    wls = [np.zeros(len(f), dtype=np.float32) for f in feats]
    wls[1][20:24] = 1
    fitted = [fit_sequence(torch.from_numpy(f), 40) for f in feats]
    data = SequenceSet(
        torch.stack([s for s, _ in fitted]), torch.stack([m for _, m in fitted]), torch.zeros(3, 40), torch.zeros(3, 9), torch.zeros(3), [len(f) for f in feats], wls, [w.copy() for w in wls], feats
    )
    x, mask, wy = epoch_sequences(data, Phase2Config(partial_coverage=0.0), 0)
    assert x is data.x
    x, mask, wy = epoch_sequences(data, Phase2Config(partial_coverage=1.0, seed=3), 0)
    assert x.shape == data.x.shape and (mask.sum(dim=1) <= data.mask.sum(dim=1)).all()
    assert (mask.sum(dim=1) < data.mask.sum(dim=1)).any()  # some study is shorter now (padded with a mask)
    assert float(wy[1].max()) > 0  # the positive study kept a positive window


def test_demo_recipe_phantoms_follow_the_slices_asked_for(tmp_path: Path) -> None:
    import json

    from training.demo_recipe import make_phantoms, parse_slices

    assert parse_slices("90-300") == (90, 300) and parse_slices("64") == 64
    out = make_phantoms(tmp_path, "val", 1, 5, slices=40)
    assert json.loads((out / "phantoms.json").read_text())["slices"] == 40
    first = (out / "phantoms.json").stat().st_mtime_ns
    assert make_phantoms(tmp_path, "val", 1, 5, slices=40) == out
    assert (out / "phantoms.json").stat().st_mtime_ns == first  # reused
    make_phantoms(tmp_path, "val", 1, 5, slices=(200, 220))  # other slices: written again
    meta = json.loads((out / "phantoms.json").read_text())
    assert meta["slices"] == [200, 220] and meta["records"][0]["shape_zyx"][0] >= 200
