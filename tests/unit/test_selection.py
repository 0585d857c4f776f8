"""Selection rules and slice geometry: pure functions, no database."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pydicom
import pytest

from pe_triage_node.config import SelectionSection
from pe_triage_node.dicom.selection import (
    SeriesCandidate,
    candidate_from_headers,
    check_series,
    is_soft_tissue_kernel,
    parse_multi_float,
    select_ctpa_series,
    slice_geometry,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
AXIAL = "1\\0\\0\\0\\1\\0"
REALDATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "realdata" / "lung-pet-ct-dx"


def ct(uid: str, **kw: object) -> SeriesCandidate:
    """A CT series that passes the default rules unless ``kw`` says otherwise."""
    base: dict[str, object] = dict(
        series_instance_uid=uid,
        study_instance_uid="1.2.3",
        series_number=int(uid.rsplit(".", 1)[-1]),
        modality="CT",
        sop_class_uid=CT,
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        convolution_kernel="B30f",
        slice_thickness=1.0,
        slice_spacing=1.0,
        slice_count=300,
        series_description="CTA CHEST PE",
    )
    base.update(kw)
    return SeriesCandidate(**base)  # type: ignore[arg-type]


RULES = SelectionSection(max_slice_thickness_mm=8.0)  # thick reconstructions take part here


# -- rules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"ignored": True, "sop_class_uid": DOSE_SR, "modality": "SR"}, "recorded as ignored"),
        ({"modality": "MR"}, "modality MR is not one of CT"),
        ({"sop_class_uid": DOSE_SR}, "X-Ray Radiation Dose SR Storage"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "ImageType lacks AXIAL"),
        ({"image_type": ("DERIVED", "SECONDARY", "AXIAL")}, "ImageType lacks ORIGINAL"),
        ({"slice_count": 2}, "only 2 slices, at least 30 required"),
        ({"slice_count": 2001}, "not a CTPA: 2001 slices, at most 2000 analysed"),
        ({"slice_thickness": 10.0, "slice_spacing": 10.0}, "not a CTPA: slice thickness 10 mm exceeds the maximum 8 mm"),
        ({"slice_thickness": 1.0, "slice_spacing": 10.0}, "slice spacing 10 mm (from ImagePositionPatient)"),
        ({"slice_thickness": None, "slice_spacing": None}, "slice thickness unknown"),
        ({"series_description": "Topogram 0.6 T20s"}, "matches the exclude pattern"),
        ({"series_description": "Lung 1.0 B70f"}, "matches the exclude pattern"),
    ],
)
def test_each_rule_gives_a_readable_reason(changes: dict[str, object], expected: str) -> None:
    reason = check_series(ct("1.2.3.4.5", **changes), RULES)
    assert reason is not None and expected in reason


def test_a_conforming_series_passes_and_thickness_edge_is_inclusive() -> None:
    assert check_series(ct("1.2.3.4.5"), RULES) is None
    assert check_series(ct("1.2.3.4.5", slice_thickness=8.0, slice_spacing=8.0, slice_count=30), RULES) is None


def test_by_default_only_thin_reconstructions_are_read() -> None:
    defaults = SelectionSection()
    assert check_series(ct("1.2.3.4.5", slice_thickness=3.0, slice_spacing=3.0), defaults) is None
    assert check_series(ct("1.2.3.4.5", slice_thickness=5.0, slice_spacing=5.0), defaults) == (
        "not a CTPA: slice thickness 5 mm exceeds the maximum 3 mm"
    )


def test_thickness_falls_back_to_either_source() -> None:
    assert ct("1.2.3.4.5", slice_thickness=None, slice_spacing=2.0).effective_thickness == 2.0
    assert ct("1.2.3.4.5", slice_thickness=3.0, slice_spacing=None).effective_thickness == 3.0
    assert ct("1.2.3.4.5", slice_thickness=3.0, slice_spacing=1.5).effective_thickness == 3.0


def test_optional_include_patterns_and_kernel_exclude() -> None:
    rules = SelectionSection(
        series_description_include=r"(?i)cta|angio",
        study_description_include=r"(?i)\bPE\b|pulmonary",
        protocol_name_include=r"(?i)ctpa",
        kernel_exclude=r"(?i)^B[5-9]\d",
    )
    good = ct("1.2.3.4.5", study_description="CT PE protocol", protocol_name="CTPA adult")
    assert check_series(good, rules) is None
    cases = {
        "series description": dataclasses.replace(good, series_description="Chest routine"),
        "study description": dataclasses.replace(good, study_description=None),
        "protocol name": dataclasses.replace(good, protocol_name="Abdomen"),
        "kernel 'B70f' matches": dataclasses.replace(good, convolution_kernel="B70f"),
    }
    for expected, cand in cases.items():
        reason = check_series(cand, rules)
        assert reason is not None and expected in reason, (expected, reason)


@pytest.mark.parametrize("kernel", ["B30f", "B40f", "I31f", "B", "C", "STANDARD", "SOFT", "FC13", "FC03"])
def test_soft_tissue_kernels(kernel: str) -> None:
    assert is_soft_tissue_kernel(kernel, RULES)


@pytest.mark.parametrize("kernel", ["B70f", "B60f", "L", "LUNG", "BONE", "FC51", "Br64", None, ""])
def test_sharp_or_unknown_kernels(kernel: str | None) -> None:
    assert not is_soft_tissue_kernel(kernel, RULES)


# -- one series per study ------------------------------------------------------


def test_thinnest_wins_then_kernel_then_slices_then_number() -> None:
    thin_sharp = ct("1.2.3.4.2", convolution_kernel="B70f", slice_thickness=1.0, slice_spacing=1.0)
    thick_soft = ct("1.2.3.4.3", convolution_kernel="B30f", slice_thickness=5.0, slice_spacing=5.0, slice_count=60)
    out = select_ctpa_series([thick_soft, thin_sharp], RULES)
    assert out.chosen == thin_sharp
    assert out.rejected["1.2.3.4.3"].startswith("thicker reconstruction (5 mm); series 2 (B70f, 1 mm, 300 slices)")

    thin_soft = ct("1.2.3.4.4", convolution_kernel="B30f")
    out = select_ctpa_series([thin_sharp, thick_soft, thin_soft], RULES)
    assert out.chosen == thin_soft
    assert out.rejected["1.2.3.4.2"] == (
        "kernel B70f is a sharp/lung kernel; series 4 (B30f, 1 mm, 300 slices) chosen instead"
    )

    fewer = ct("1.2.3.4.5", slice_count=250)
    out = select_ctpa_series([fewer, thin_soft], RULES)
    assert out.chosen == thin_soft
    assert out.rejected["1.2.3.4.5"].startswith("fewer slices (250)")

    twin = ct("1.2.3.4.9")
    out = select_ctpa_series([twin, thin_soft], RULES)
    assert out.chosen == thin_soft
    assert "higher series number" in out.rejected["1.2.3.4.9"]


def test_every_series_but_one_gets_a_reason_and_ineligible_never_chosen() -> None:
    cands = [
        ct("1.2.3.4.1", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), slice_count=2),
        ct("1.2.3.4.2", ignored=True, sop_class_uid=DOSE_SR, modality="SR", slice_count=1),
        ct("1.2.3.4.3", slice_thickness=0.6, slice_spacing=0.6, slice_count=20),  # thin but too short
        ct("1.2.3.4.4", slice_thickness=2.0, slice_spacing=2.0, slice_count=150),
    ]
    out = select_ctpa_series(cands, RULES)
    assert out.chosen is not None and out.chosen.series_instance_uid == "1.2.3.4.4"
    assert set(out.rejected) == {"1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3"}
    assert "ImageType lacks AXIAL" in out.rejected["1.2.3.4.1"]
    assert out.rejected["1.2.3.4.3"] == "not a CTPA: only 20 slices, at least 30 required"


def test_no_eligible_series_means_nothing_chosen() -> None:
    out = select_ctpa_series([ct("1.2.3.4.1", modality="PT")], RULES)
    assert out.chosen is None and "modality PT" in out.rejected["1.2.3.4.1"]


def test_thickness_ties_within_a_hundredth_of_a_millimetre() -> None:
    a = ct("1.2.3.4.1", convolution_kernel="B70f", slice_thickness=1.0, slice_spacing=0.999)
    b = ct("1.2.3.4.2", convolution_kernel="B30f", slice_thickness=1.0, slice_spacing=1.001)
    assert select_ctpa_series([a, b], RULES).chosen == b


# -- geometry ------------------------------------------------------------------


def _pos(zs: list[float]) -> list[str | None]:
    return [f"-100\\-100\\{z}" for z in zs]


def test_contiguous_and_gap() -> None:
    geo = slice_geometry(_pos([float(z) for z in range(10)])[::-1], [AXIAL] * 10)
    assert geo.median_spacing == pytest.approx(1.0) and geo.is_contiguous(1.5)
    zs = [0.0, 1.0, 2.0, 3.0, 6.0, 7.0, 8.0]
    geo = slice_geometry(_pos(zs), [AXIAL] * len(zs))
    assert not geo.is_contiguous(1.5)
    assert "gap of 3 mm after slice 4 of 7" in geo.describe_gap(1.5)
    assert geo.is_contiguous(3.5)


def test_oblique_orientation_projects_on_the_normal() -> None:
    # Rows along x, columns tilted in y/z by 45 degrees: normal (0, -0.707, 0.707).
    c = 2**-0.5
    iop = f"1\\0\\0\\0\\{c}\\{c}"
    positions = [f"0\\{-k * c}\\{k * c}" for k in range(5)]
    geo = slice_geometry(positions, [iop] * 5)
    assert geo.problem is None and geo.median_spacing == pytest.approx(1.0)


def test_unjudgeable_geometry() -> None:
    assert slice_geometry(_pos([0, 1]) + [None], [AXIAL] * 3).problem is not None
    assert slice_geometry(_pos([0, 1, 2]), [AXIAL, AXIAL, None]).problem is not None
    mixed = slice_geometry(_pos([0, 1, 2]), [AXIAL, AXIAL, "1\\0\\0\\0\\0\\-1"])
    assert mixed.problem == "instances have different orientations"
    dup = slice_geometry(_pos([0, 1, 1, 2]), [AXIAL] * 4)
    assert dup.problem is not None and "duplicate" in dup.problem and not dup.is_contiguous(1.5)
    assert dup.median_spacing == pytest.approx(1.0)
    one = slice_geometry([None], [None])
    assert one.problem is None and one.is_contiguous(1.5)


def test_parse_multi_float() -> None:
    assert parse_multi_float("1\\2\\3", 3) == (1.0, 2.0, 3.0)
    assert parse_multi_float("1\\2", 3) is None
    assert parse_multi_float("a\\b\\c", 3) is None
    assert parse_multi_float("1\\nan\\3", 3) is None


# -- real headers ---------------------------------------------------------------


def _realdata_studies() -> list[Path]:
    if not REALDATA.is_dir():
        pytest.skip(f"real series not available: {REALDATA.resolve()} is absent (only in the shared workspace)")
    return sorted(p for p in REALDATA.glob("*/*") if p.is_dir())


def test_real_studies_choose_exactly_one_soft_tissue_series() -> None:
    studies = _realdata_studies()
    assert len(studies) == 2
    outcomes = {}
    for study in studies:
        cands = []
        for series_dir in sorted(p for p in study.iterdir() if p.is_dir()):
            headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(series_dir.glob("*.dcm"))]
            cands.append(candidate_from_headers(headers))
        out = select_ctpa_series(cands, RULES)
        assert out.chosen is not None
        assert len(out.rejected) == len(cands) - 1
        outcomes[study.parent.name] = (out.chosen, next(iter(out.rejected.values())))

    philips, reason = outcomes["Lung_Dx-A0001"]
    assert (philips.convolution_kernel, philips.slice_count, philips.effective_thickness) == ("B", 64, 5.0)
    assert reason == "kernel L is a sharp/lung kernel; series 3 (B, 5 mm, 64 slices) chosen instead"

    siemens, reason = outcomes["Lung_Dx-A0002"]
    assert (siemens.convolution_kernel, siemens.slice_count, siemens.effective_thickness) == ("B40f", 30, 8.0)
    assert reason == "kernel B70f is a sharp/lung kernel; series 3 (B40f, 8 mm, 30 slices) chosen instead"
