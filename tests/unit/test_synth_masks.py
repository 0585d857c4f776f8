"""The phantom generator writes each study's embolus mask beside the RSPECT CSV, aligned with its labels and pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pe_triage_node.rspect import EmbolusMask, mask_path, read_embolus_mask, read_rspect, write_embolus_mask
from pe_triage_node.synth.rspect import write_rspect_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("masks")
    write_rspect_dataset(out, studies=4, seed=77, slices=40, mix={"positive": 0.75, "negative": 0.25})
    return out


def test_every_study_has_its_mask_aligned_with_the_csv(dataset: Path) -> None:
    studies = read_rspect(dataset)
    assert len(studies) == 4
    meta = json.loads((dataset / "phantoms.json").read_text())["records"]
    with_emboli = 0
    for st, rec in zip(studies, meta):
        assert st.mask_path == mask_path(dataset, "train", st.series_instance_uid) and st.mask_path.is_file()
        m = read_embolus_mask(st.mask_path)
        assert m.sop_instance_uids == list(st.slice_labels)  # one plane per CSV row, in the CSV's order
        assert m.positive_sops() == {u for u, v in st.slice_labels.items() if v}
        assert int(m.planes.max()) == rec["n_emboli"]  # one index per rendered embolus
        for k, e in enumerate(rec["emboli"], start=1):
            assert int((m.planes == k).sum()) == e["voxels"]
        with_emboli += bool(rec["n_emboli"])
    assert with_emboli >= 1  # the test needs a positive study to mean something


def test_mask_voxels_are_the_clot_in_the_dicom_pixels(dataset: Path) -> None:
    meta = json.loads((dataset / "phantoms.json").read_text())["records"]
    checked = 0
    for st, rec in zip(read_rspect(dataset), meta):
        if not rec["n_emboli"]:
            continue
        m = read_embolus_mask(st.mask_path)  # type: ignore[arg-type]
        hu = np.stack([pydicom.dcmread(st.series_dir / f"{u}.dcm").pixel_array for u in m.sop_instance_uids]).astype(np.float64)
        assert hu.shape == m.planes.shape  # the stored pixel grid
        clot = np.mean([e["hu"] for e in rec["emboli"]])
        blood = rec["pa_enhancement_hu"]
        at = float(hu[m.planes > 0].mean())
        assert abs(at - clot) < 0.5 * (blood - clot), (at, clot, blood)  # closer to clot than to contrast
        flipped = float(hu[np.flip(m.planes > 0, axis=2)].mean())  # a mirrored mask would not be
        assert abs(flipped - clot) > 0.5 * (blood - clot) or abs(flipped - at) > 50
        checked += 1
    assert checked >= 1


def test_mask_reorders_to_a_volume_and_refuses_mismatches(tmp_path: Path) -> None:
    planes = np.zeros((3, 4, 4), dtype=np.uint8)
    planes[1, 2, 2] = 1
    path = write_embolus_mask(tmp_path / "m.npz", planes, ["1.2.3", "1.2.4", "1.2.5"])
    m = read_embolus_mask(path)
    assert isinstance(m, EmbolusMask) and m.positive_sops() == {"1.2.4"}
    again = m.aligned(["1.2.5", "1.2.4", "1.2.9"])
    assert again[1, 2, 2] == 1 and again.sum() == 1
    with pytest.raises(ValueError):
        write_embolus_mask(tmp_path / "bad.npz", planes, ["1.2.3"])
