"""Phase 1's epoch of windows: negatives drawn at the positives' levels in the chest when asked."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.phase1 import POSITION_BINS, Phase1Config, _epoch_windows
from pe_triage_node.inference.volume import WINDOW_SLICES


@dataclass
class _Study:
    labels: np.ndarray

    def window_labels(self) -> np.ndarray:
        return self.labels

    @property
    def slices(self) -> np.ndarray:
        return np.zeros((len(self.labels) * WINDOW_SLICES, 1, 1), np.float16)


def _studies() -> list[_Study]:
    """20 windows a study; emboli only in windows 10-12 (the hila) of half the studies."""
    out = []
    for k in range(40):
        y = np.zeros(20)
        if k % 2 == 0:
            y[10:13] = 1
        out.append(_Study(y))
    return out


def _negative_bins(match: float) -> np.ndarray:
    studies = _studies()
    cfg = Phase1Config(seed=3, jitter=0, neg_position_match=match)
    picked = _epoch_windows(studies, cfg, epoch=0)
    neg = [(i, s // WINDOW_SLICES) for i, s in picked if studies[i].labels[s // WINDOW_SLICES] == 0]
    assert len(neg) == 60  # as many negatives as positives (neg_ratio 1)
    return np.bincount([int((w + 0.5) / 20 * POSITION_BINS) for _i, w in neg], minlength=POSITION_BINS)


def test_uniform_negatives_by_default_mostly_away_from_the_positives_level() -> None:
    bins = _negative_bins(0.0)
    assert bins[5:7].sum() < 25  # 10 % of the negative windows lie in those two bins


def test_matched_negatives_at_the_positives_level() -> None:
    bins = _negative_bins(1.0)
    assert bins[5:7].sum() == 60  # windows 10-12 fall in bins 5 and 6: every negative is drawn there
    mixed = _negative_bins(0.5)
    assert 30 <= mixed[5:7].sum() < 60


def test_epoch_selection_rewards_separating_studies() -> None:
    """A network that scores the hila high in every study ranks windows, not studies: the selection sees it."""
    from training.phase1 import selection_score, study_max_auroc

    studies = _studies()
    by_position = [np.where(np.arange(20) // 1 == 11, 0.9, 0.1) for _ in studies]  # every study's hila alike
    by_clot = [np.where(st.labels > 0, 0.9, 0.1) for st in studies]
    assert study_max_auroc(studies, by_position) == 0.5  # type: ignore[arg-type]
    assert study_max_auroc(studies, by_clot) == 1.0  # type: ignore[arg-type]
    assert selection_score(0.8, 0.5) < selection_score(0.75, 1.0)
    assert selection_score(0.8, None) == 0.8
    assert study_max_auroc(studies[:1], by_clot[:1]) is None  # type: ignore[arg-type]
