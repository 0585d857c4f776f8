"""Choose the one CTPA series of a study: declarative rules, then a ranking.

Pure functions over :class:`SeriesCandidate` (plain series attributes), so they
unit-test without a database; :mod:`pe_triage_node.dicom.assembly` does the DB
glue (states, ``rejections`` rows, the inference job).

Rules (``[selection]`` in the configuration, :class:`SelectionSection`), checked
in this order; the first one a series fails is its rejection reason:

1. not marked ``ignored`` by the receiver (non-image SOP classes);
2. Modality (0008,0060) in ``modalities``;
3. SOP Class UID in ``sop_classes`` (CT Image Storage / Enhanced CT, PS3.4 B.5);
4. Image Type (0008,0008) contains every value of ``image_type_required``
   (PS3.3 C.7.6.1.1.2, e.g. ORIGINAL and AXIAL);
5. at least ``min_slices`` and at most ``max_slices`` instances;
6. slice thickness at most ``max_slice_thickness_mm`` -- see *thickness* below;
7. the optional include/exclude regular expressions (``re.search``) on
   Series Description, Study Description, Protocol Name and Convolution Kernel.
   An include pattern fails when the attribute is absent.

*Thickness*: the effective thickness of a reconstruction is the larger of the
Slice Thickness attribute (0018,0050) and the median spacing of the slice
positions along the slice normal (Image Position/Orientation (Patient),
PS3.3 C.7.6.2). A 1 mm slice every 5 mm resolves no better in z than a 5 mm
slice, and a 5 mm slice every 2.5 mm is still 5 mm thick. Where one of the two
is missing the other is used; where both are missing the series is rejected.

One series per study among those that pass (:func:`select_ctpa_series`):
the thinnest effective thickness (to 0.01 mm), then a soft-tissue kernel
(``soft_tissue_kernel``) over sharp/lung kernels, then more slices, then the
lowest Series Number, then the Series Instance UID (so the choice is stable).
Every other series gets a reason a person can read.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.multival import MultiValue
from pydicom.uid import UID

from pe_triage_node.config import SelectionSection
from pe_triage_node.patterns import search

# Two slices closer than this along the normal are the same position (mm).
DUPLICATE_POSITION_MM = 0.01
# Orientation cosines that differ by more than this are a different orientation.
ORIENTATION_TOLERANCE = 1e-3
THICKNESS_TOLERANCE_MM = 1e-3


# -- geometry ---------------------------------------------------------------


def parse_multi_float(value: str | None, count: int) -> tuple[float, ...] | None:
    """Parse a backslash-separated DS value ("x\\\\y\\\\z") into ``count`` floats, or None."""
    if value is None:
        return None
    parts = str(value).replace("[", "").replace("]", "").replace(",", "\\").split("\\")
    try:
        numbers = tuple(float(p) for p in parts if p.strip() != "")
    except ValueError:
        return None
    if len(numbers) != count or not all(math.isfinite(n) for n in numbers):
        return None
    return numbers


@dataclass(frozen=True)
class SliceGeometry:
    """Where the slices of a series lie along their normal (PS3.3 C.7.6.2.1.1).

    ``distances`` are the sorted projections of Image Position (Patient) onto
    the slice normal (row cosines x column cosines of Image Orientation).
    ``problem`` says why the slices cannot be judged contiguous (None when
    they can); ``median_spacing`` ignores duplicate positions.
    """

    count: int
    distances: tuple[float, ...] = ()
    median_spacing: float | None = None
    max_gap: float | None = None
    max_gap_after: int | None = None  # index (in sorted order) of the slice before the largest gap
    problem: str | None = None

    def is_contiguous(self, factor: float) -> bool:
        """No gap larger than ``factor`` x the median spacing, and nothing unjudgeable."""
        if self.problem is not None:
            return False
        if self.count <= 2 or self.median_spacing is None or self.max_gap is None:
            return True
        return self.max_gap <= factor * self.median_spacing + 1e-6

    def describe_gap(self, factor: float) -> str:
        """Why the series is not contiguous, in words (empty when it is)."""
        if self.problem is not None:
            return self.problem
        if self.is_contiguous(factor) or self.median_spacing is None or self.max_gap is None:
            return ""
        return (
            f"gap of {self.max_gap:.3g} mm after slice {(self.max_gap_after or 0) + 1} of {self.count} "
            f"exceeds {factor:g} x the median spacing {self.median_spacing:.3g} mm"
        )


def slice_geometry(
    positions: Sequence[str | None], orientations: Sequence[str | None]
) -> SliceGeometry:
    """Geometry of a series from its instances' IPP and IOP values ("a\\\\b\\\\c").

    A single instance (including one multi-frame Enhanced CT object) is
    trivially contiguous. Missing or unparsable values, mixed orientations and
    duplicate positions make the series unjudgeable (``problem`` set).
    """
    n = len(positions)
    if n <= 1:
        return SliceGeometry(count=n)
    iops = [parse_multi_float(o, 6) for o in orientations]
    ipps = [parse_multi_float(p, 3) for p in positions]
    if any(p is None for p in ipps):
        return SliceGeometry(count=n, problem="ImagePositionPatient missing on some instances")
    first = iops[0]
    if first is None or any(o is None for o in iops):
        return SliceGeometry(count=n, problem="ImageOrientationPatient missing on some instances")
    for o in iops[1:]:
        if o is not None and max(abs(a - b) for a, b in zip(o, first)) > ORIENTATION_TOLERANCE:
            return SliceGeometry(count=n, problem="instances have different orientations")
    rx, ry, rz, cx, cy, cz = first
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    d = sorted(p[0] * normal[0] + p[1] * normal[1] + p[2] * normal[2] for p in ipps if p is not None)
    diffs = [b - a for a, b in zip(d, d[1:])]
    distinct = [x for x in diffs if x > DUPLICATE_POSITION_MM]
    median = statistics.median(distinct) if distinct else None
    gap_at = max(range(len(diffs)), key=diffs.__getitem__)
    problem = None
    if len(distinct) != len(diffs):
        problem = f"{len(diffs) - len(distinct)} duplicate slice position(s)"
    return SliceGeometry(
        count=n,
        distances=tuple(d),
        median_spacing=median,
        max_gap=diffs[gap_at],
        max_gap_after=gap_at,
        problem=problem,
    )


# -- candidates and verdicts ------------------------------------------------


@dataclass(frozen=True)
class SeriesCandidate:
    """The attributes of one series that selection reads (no PHI needed)."""

    series_instance_uid: str
    study_instance_uid: str = ""
    series_number: int | None = None
    modality: str | None = None
    sop_class_uid: str | None = None
    image_type: tuple[str, ...] = ()
    convolution_kernel: str | None = None
    slice_thickness: float | None = None  # Slice Thickness (0018,0050)
    slice_spacing: float | None = None  # median spacing from positions
    slice_count: int = 0
    series_description: str | None = None
    study_description: str | None = None
    protocol_name: str | None = None
    ignored: bool = False  # the receiver recorded it as a non-image SOP class

    @property
    def effective_thickness(self) -> float | None:
        """max(SliceThickness, median position spacing); either alone when the other is missing."""
        values = [v for v in (self.slice_thickness, self.slice_spacing) if v is not None and v > 0]
        return max(values) if values else None

    def label(self) -> str:
        """'series 3 (B40f, 8 mm, 30 slices)' -- used in reasons."""
        name = f"series {self.series_number}" if self.series_number is not None else (
            f"series {self.series_instance_uid}"
        )
        thick = self.effective_thickness
        parts = [
            self.convolution_kernel or "no kernel",
            f"{thick:g} mm" if thick is not None else "thickness unknown",
            f"{self.slice_count} slices",
        ]
        return f"{name} ({', '.join(parts)})"


@dataclass(frozen=True)
class StudySelection:
    """The outcome for one study: at most one chosen series, a reason for every other."""

    chosen: SeriesCandidate | None
    rejected: dict[str, str] = field(default_factory=dict)  # series UID -> reason


def split_values(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """A multi-valued CS attribute as a tuple of upper-cased values."""
    if value is None:
        return ()
    items = value.split("\\") if isinstance(value, str) else list(value)
    return tuple(str(v).strip().upper() for v in items if str(v).strip())


def _search(pattern: str, value: str | None) -> bool:
    return value is not None and search(pattern, value)


def is_soft_tissue_kernel(kernel: str | None, rules: SelectionSection) -> bool:
    """Whether any value of Convolution Kernel (0018,1210) matches ``soft_tissue_kernel``."""
    if not kernel:
        return False
    return any(_search(rules.soft_tissue_kernel, k.strip()) for k in kernel.split("\\"))


def _sop_name(uid: str) -> str:
    name = UID(uid).name
    return f"{uid} ({name})" if name and name != uid else uid


def check_series(c: SeriesCandidate, rules: SelectionSection) -> str | None:
    """The reason ``c`` cannot be the study's CTPA series, or None when it passes every rule."""
    if c.ignored:
        sop = _sop_name(c.sop_class_uid) if c.sop_class_uid else "unknown SOP class"
        return f"not an image series the node analyses: {sop}, recorded as ignored on receipt"
    reason = _failed_rule(c, rules)
    return None if reason is None else f"not a CTPA: {reason}"


def _failed_rule(c: SeriesCandidate, rules: SelectionSection) -> str | None:
    modalities = [m.upper() for m in rules.modalities]
    if (c.modality or "").upper() not in modalities:
        return f"modality {c.modality or '(none)'} is not one of {', '.join(modalities)}"
    if c.sop_class_uid not in rules.sop_classes:
        sop = _sop_name(c.sop_class_uid) if c.sop_class_uid else "(none)"
        return f"SOP class {sop} is not one of the selected image SOP classes"
    have = set(c.image_type)
    missing = [v for v in rules.image_type_required if v.upper() not in have]
    if missing:
        shown = "\\".join(c.image_type) or "(empty)"
        return f"ImageType lacks {'/'.join(missing)} (it is {shown})"
    if c.slice_count < rules.min_slices:
        noun = "slice" if c.slice_count == 1 else "slices"
        return f"only {c.slice_count} {noun}, at least {rules.min_slices} required"
    if c.slice_count > rules.max_slices:
        return f"{c.slice_count} slices, at most {rules.max_slices} analysed"
    thick = c.effective_thickness
    if thick is None:
        return "slice thickness unknown: no SliceThickness and no usable slice positions"
    if thick > rules.max_slice_thickness_mm + THICKNESS_TOLERANCE_MM:
        if c.slice_spacing is not None and (c.slice_thickness is None or c.slice_spacing > c.slice_thickness):
            what = f"slice spacing {c.slice_spacing:g} mm (from ImagePositionPatient)"
        else:
            what = f"slice thickness {thick:g} mm"
        return f"{what} exceeds the maximum {rules.max_slice_thickness_mm:g} mm"
    checks: list[tuple[str | None, bool, str | None, str]] = [
        (rules.series_description_include, True, c.series_description, "series description"),
        (rules.series_description_exclude, False, c.series_description, "series description"),
        (rules.study_description_include, True, c.study_description, "study description"),
        (rules.protocol_name_include, True, c.protocol_name, "protocol name"),
        (rules.kernel_exclude, False, c.convolution_kernel, "kernel"),
    ]
    for pattern, include, value, what in checks:
        if pattern is None:
            continue
        hit = _search(pattern, value)
        if include and not hit:
            shown = f"{value!r}" if value else "(absent)"
            return f"{what} {shown} does not match the include pattern {pattern!r}"
        if not include and hit:
            return f"{what} {value!r} matches the exclude pattern {pattern!r}"
    return None


def _rank_key(c: SeriesCandidate, rules: SelectionSection) -> tuple[Any, ...]:
    thick = c.effective_thickness
    return (
        round(thick, 2) if thick is not None else math.inf,
        0 if is_soft_tissue_kernel(c.convolution_kernel, rules) else 1,
        -c.slice_count,
        c.series_number if c.series_number is not None else math.inf,
        c.series_instance_uid,
    )


def _lost_because(loser: SeriesCandidate, winner: SeriesCandidate, rules: SelectionSection) -> str:
    lk, wk = _rank_key(loser, rules), _rank_key(winner, rules)
    chosen = f"{winner.label()} chosen instead"
    if lk[0] != wk[0]:
        return f"thicker reconstruction ({loser.effective_thickness:g} mm); {chosen}"
    if lk[1] != wk[1]:
        kernel = loser.convolution_kernel
        if kernel:
            return f"kernel {kernel} is a sharp/lung kernel; {chosen}"
        return f"no ConvolutionKernel, so not known to be soft-tissue; {chosen}"
    if lk[2] != wk[2]:
        return f"fewer slices ({loser.slice_count}); {chosen}"
    return f"equivalent reconstruction with a higher series number; {chosen}"


def select_ctpa_series(
    candidates: Sequence[SeriesCandidate], rules: SelectionSection
) -> StudySelection:
    """Apply the rules to every series of one study and choose at most one.

    Returns the chosen series (None when none passes) and, for every other
    series, a reason a person can read.
    """
    rejected: dict[str, str] = {}
    eligible: list[SeriesCandidate] = []
    for c in candidates:
        reason = check_series(c, rules)
        if reason is None:
            eligible.append(c)
        else:
            rejected[c.series_instance_uid] = reason
    if not eligible:
        return StudySelection(chosen=None, rejected=rejected)
    ranked = sorted(eligible, key=lambda c: _rank_key(c, rules))
    winner = ranked[0]
    for loser in ranked[1:]:
        rejected[loser.series_instance_uid] = _lost_because(loser, winner, rules)
    return StudySelection(chosen=winner, rejected=rejected)


def candidate_from_headers(datasets: Sequence[Any], *, ignored: bool = False) -> SeriesCandidate:
    """A :class:`SeriesCandidate` from the pydicom headers of one series' instances.

    Reads the first dataset's series attributes and every dataset's position
    and orientation (for the spacing). Used by tests and tools that work on
    files rather than the database.
    """
    if not datasets:
        raise ValueError("a series needs at least one dataset")
    ds = datasets[0]

    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        if isinstance(value, (list, tuple, MultiValue)):
            return "\\".join(str(v) for v in value)
        return str(value)

    def ds_text(d: Any, keyword: str) -> str | None:
        value = d.get(keyword)
        if value is None or value == "":
            return None
        return "\\".join(str(v) for v in value) if not isinstance(value, str) else value

    geometry = slice_geometry(
        [ds_text(d, "ImagePositionPatient") for d in datasets],
        [ds_text(d, "ImageOrientationPatient") for d in datasets],
    )
    thickness = ds.get("SliceThickness")
    number = ds.get("SeriesNumber")
    return SeriesCandidate(
        series_instance_uid=str(ds.SeriesInstanceUID),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        series_number=int(number) if number not in (None, "") else None,
        modality=text("Modality"),
        sop_class_uid=text("SOPClassUID"),
        image_type=split_values(text("ImageType")),
        convolution_kernel=text("ConvolutionKernel"),
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
        slice_spacing=geometry.median_spacing,
        slice_count=len(datasets),
        series_description=text("SeriesDescription"),
        study_description=text("StudyDescription"),
        protocol_name=text("ProtocolName"),
        ignored=ignored,
    )
