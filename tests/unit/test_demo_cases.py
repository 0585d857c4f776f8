"""``pe-triage demo --case``: each case's phantom is what its labels say (rendered, not only drawn)."""

from __future__ import annotations

from pathlib import Path

import pytest

import pydicom

from pe_triage_node.services.demo import DEMO_CASES, DEMO_MAX_SLICE_MM, demo_phantom
from pe_triage_node.synth.phantom import render_phantom, sample_spec

EXPECTED = {
    "central": {"central_pe": 1},
    "left": {"leftsided_pe": 1, "rightsided_pe": 0, "central_pe": 0},
    "right": {"rightsided_pe": 1, "leftsided_pe": 0, "central_pe": 0},
    "negative": {"negative_exam_for_pe": 1, "central_pe": 0, "leftsided_pe": 0, "rightsided_pe": 0},
}


@pytest.mark.parametrize("case", sorted(DEMO_CASES))
def test_demo_case_phantom_has_the_case_labels(case: str, tmp_path: Path) -> None:
    series, study_uid, seed = demo_phantom(case, tmp_path, slices=40, seed=7)
    files = sorted(series.glob("*.dcm"))
    assert len(files) >= 40 and study_uid
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert float(ds.SliceThickness) <= DEMO_MAX_SLICE_MM  # the node's default selection takes it as a CTPA
    want = DEMO_CASES[case]
    spec = sample_spec(seed, size="small", slices=40, category=want.category, pe_type="acute" if want.sides else None, max_slice_spacing_mm=DEMO_MAX_SLICE_MM)  # type: ignore[arg-type]
    labels = render_phantom(spec).labels.as_dict()
    assert {k: labels[k] for k in EXPECTED[case]} == EXPECTED[case]


def test_demo_cli_offers_the_cases() -> None:
    import argparse

    from pe_triage_node.services.demo import add_demo_arguments

    p = argparse.ArgumentParser()
    add_demo_arguments(p)
    assert p.parse_args([]).case == "central"
    assert p.parse_args(["--case", "negative"]).case == "negative"
    with pytest.raises(SystemExit):
        p.parse_args(["--case", "elsewhere"])


def test_different_seeds_give_different_central_phantoms(tmp_path: Path) -> None:
    seeds = {demo_phantom("central", tmp_path / str(s), slices=40, seed=s)[2] for s in (1, 2, 3)}
    assert len(seeds) == 3
