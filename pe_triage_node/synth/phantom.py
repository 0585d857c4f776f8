"""Synthetic CT pulmonary angiogram (CTPA) phantoms with planted pulmonary emboli.

A phantom is drawn in two steps, both deterministic for a seed:

* :func:`sample_spec` draws a :class:`PhantomSpec`: patient size (small to
  large), scanner geometry (field of view, pixel spacing, slice spacing and
  thickness, slice count; some series cut the body at the sides or cover part
  of the chest only), contrast timing (pulmonary trunk 200-650 HU; poor timing
  for indeterminate studies), kernel family and noise level and texture, the
  heart (RV and LV diameters, hence the RV/LV ratio), the pulmonary arterial
  and venous trees and the emboli (occlusive, non-occlusive, saddle, tails into
  daughter branches, chronic wall-adherent, webs); mimics (nodes beside the
  arteries, mixing artefacts in the lower-lobe arteries and in the trunk).
* :func:`render_phantom` paints the HU volume with pure numpy/scipy, blends
  the emboli into the enhanced arteries as filling defects and derives the
  labels (:class:`StudyLabels`, per-slice ``pe_present_on_image``) from the
  embolus voxels that were actually rendered.

Coordinates are patient LPS in millimetres (x towards the patient's left,
y posterior, z towards the head; PS3.3 C.7.6.2.1.1), with z = 0 at the
bifurcation of the pulmonary trunk. Volumes are indexed (z, y, x) with
slice 0 the most inferior, as :func:`~pe_triage_node.synth.ct_series.write_ct_series`
expects. Label names are the RSNA STR challenge names, verbatim.

The phantoms are for training and testing the software only: they are not
a model of any patient and carry no diagnostic meaning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from pe_triage_node.inference.labels import PE_SPECIFIC, STUDY_LABELS, WINDOW_LABEL

Size = Literal["small", "full"]
Category = Literal["negative", "positive", "indeterminate"]
PEType = Literal["acute", "chronic", "acute_and_chronic"]
Side = Literal["central", "right", "left"]

SLICE_LABEL = WINDOW_LABEL
# Vessel orders: 0 pulmonary trunk, 1 main (right/left) PA, 2 lobar, 3 segmental, >=4 subsegmental.
ORDER_NAMES = {0: "trunk", 1: "main", 2: "lobar", 3: "segmental"}
SUBSEGMENTAL_ORDER = 4

# Study mix of the generator (RSPECT has ~32% positives; more here so that
# the rarer labels are learnable from a few hundred phantoms).
DEFAULT_MIX: dict[str, float] = {"negative": 0.42, "positive": 0.48, "indeterminate": 0.10}


# --------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class StudyLabels:
    """The nine study-level labels of the RSNA STR PE challenge (0 or 1 each)."""

    negative_exam_for_pe: int = 0
    indeterminate: int = 0
    chronic_pe: int = 0
    acute_and_chronic_pe: int = 0
    central_pe: int = 0
    leftsided_pe: int = 0
    rightsided_pe: int = 0
    rv_lv_ratio_gte_1: int = 0
    rv_lv_ratio_lt_1: int = 0

    def as_dict(self) -> dict[str, int]:
        """Labels by RSNA name, in :data:`STUDY_LABELS` order."""
        return {name: int(getattr(self, name)) for name in STUDY_LABELS}

    def violations(self, pe_positive: bool) -> list[str]:
        """Challenge consistency rules (``check_consistency``) this label set breaks.

        ``pe_positive`` is whether any slice carries ``pe_present_on_image``.
        Returns the rule ids (1a…2b) that fail; empty when consistent.
        """
        v = self.as_dict()
        bad: list[str] = []
        if pe_positive:
            if v["rv_lv_ratio_gte_1"] + v["rv_lv_ratio_lt_1"] != 1:
                bad.append("1a")
            if v["central_pe"] + v["rightsided_pe"] + v["leftsided_pe"] < 1:
                bad.append("1b")
            if v["chronic_pe"] and v["acute_and_chronic_pe"]:
                bad.append("1c")
            if v["negative_exam_for_pe"] or v["indeterminate"]:
                bad.append("1d")
        else:
            if v["negative_exam_for_pe"] + v["indeterminate"] != 1:
                bad.append("2a")
            if any(v[k] for k in PE_SPECIFIC):
                bad.append("2b")
        return bad


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class VesselSegment:
    """One straight, tapering tube of a vessel tree (a capsule from p0 to p1, mm)."""

    p0: tuple[float, float, float]
    p1: tuple[float, float, float]
    r0: float
    r1: float
    side: Side
    order: int
    parent: int = -1

    @property
    def length(self) -> float:
        """Centre-line length in mm."""
        return float(np.linalg.norm(np.subtract(self.p1, self.p0)))

    def point(self, t: float) -> np.ndarray:
        """Centre-line point at fraction ``t`` (0 at p0, 1 at p1)."""
        return np.asarray(self.p0) + t * (np.asarray(self.p1) - np.asarray(self.p0))

    def radius(self, t: float) -> float:
        """Lumen radius at fraction ``t``."""
        return self.r0 + (self.r1 - self.r0) * t


@dataclass(frozen=True)
class Embolus:
    """A filling defect in one arterial segment, from fraction t0 to t1 of its length.

    ``shape``: ``central`` (acute, surrounded by a rim of contrast, "polo mint"),
    ``occlusive`` (acute, fills the lumen), ``eccentric`` (chronic, wall-adherent
    crescent) or ``web`` (chronic, a thin band across the lumen).
    """

    segment: int
    kind: Literal["acute", "chronic"]
    shape: Literal["central", "occlusive", "eccentric", "web"]
    t0: float
    t1: float
    radius_fraction: float
    direction: tuple[float, float, float]
    hu: float
    side: Side
    order: int
    group: int

    @property
    def subsegmental(self) -> bool:
        """Whether the embolus lies in a subsegmental (or smaller) artery."""
        return self.order >= SUBSEGMENTAL_ORDER

    @property
    def level(self) -> str:
        """Arterial level in words: trunk, main, lobar, segmental, subsegmental."""
        return ORDER_NAMES.get(self.order, "subsegmental")


@dataclass(frozen=True)
class Anatomy:
    """Patient-specific anatomy and tissue values (mm, HU)."""

    scale: float
    body_a: float
    body_b: float
    body_power: float
    fat_mm: float
    muscle_mm: float
    cavity_a: float
    cavity_b: float
    cavity_cy: float
    lung_cx: float
    lung_a: float
    lung_b: float
    lung_widest_z: float
    apex_z: float
    dome_right_z: float
    dome_left_z: float
    dome_depth: float
    spine_y: float
    spine_r: float
    vertebra_mm: float
    trachea_y: float
    carina_z: float
    heart_c: tuple[float, float, float]
    heart_theta: float
    lv_diameter: float
    rv_diameter: float
    hu_fat: float
    hu_muscle: float
    hu_lung: float
    hu_lung_gradient: float
    hu_bone: float
    hu_marrow: float
    hu_liver: float
    hu_myocardium: float
    hu_right_blood: float
    hu_left_blood: float
    hu_svc: float

    @property
    def rv_lv_ratio(self) -> float:
        """Ratio of the RV to the LV short-axis cavity diameter."""
        return self.rv_diameter / self.lv_diameter


@dataclass(frozen=True)
class PhantomSpec:
    """Everything needed to render one synthetic CTPA study, drawn from one seed."""

    seed: int
    size: Size
    category: Category
    pe_type: PEType | None
    indeterminate_reasons: tuple[str, ...]
    shape: tuple[int, int, int]
    pixel_spacing: float
    slice_spacing: float
    slice_thickness: float
    origin: tuple[float, float, float]
    kernel: str
    kvp: int
    noise_sd: float
    psf_sigma_mm: float
    anatomy: Anatomy
    arteries: tuple[VesselSegment, ...]
    veins: tuple[VesselSegment, ...]
    bronchi: tuple[VesselSegment, ...]
    nodes: tuple[tuple[float, float, float, float], ...]
    emboli: tuple[Embolus, ...]
    motion_slices: tuple[int, int] | None = None
    flow_artifact: bool = False
    noise_corr_mm: float = 0.0  # noise texture: correlation length of the noise (iterative reconstructions are blotchy)
    trunk_mixing: bool = False  # unopacified blood layering in the pulmonary trunk (a mimic, never clot density)
    partial_coverage: str = ""  # "", "fov" (the body cut at the sides) or "z" (part of the chest only)

    @property
    def rv_lv_ratio(self) -> float:
        """RV/LV short-axis diameter ratio of the drawn heart."""
        return self.anatomy.rv_lv_ratio

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel-centre coordinates (mm) along z, y and x."""
        nz, ny, nx = self.shape
        ox, oy, oz = self.origin
        xs = ox + self.pixel_spacing * np.arange(nx, dtype=np.float32)
        ys = oy + self.pixel_spacing * np.arange(ny, dtype=np.float32)
        zs = oz + self.slice_spacing * np.arange(nz, dtype=np.float32)
        return zs, ys, xs

    def summary(self) -> dict[str, Any]:
        """A small JSON-able description (no vessel trees) for ``phantoms.json``."""
        an = self.anatomy
        return {
            "seed": self.seed,
            "size": self.size,
            "category": self.category,
            "pe_type": self.pe_type,
            "indeterminate_reasons": list(self.indeterminate_reasons),
            "shape_zyx": list(self.shape),
            "pixel_spacing_mm": round(self.pixel_spacing, 4),
            "slice_spacing_mm": round(self.slice_spacing, 4),
            "slice_thickness_mm": round(self.slice_thickness, 4),
            "kernel": self.kernel,
            "kvp": self.kvp,
            "noise_sd_hu": round(self.noise_sd, 1),
            "patient_scale": round(an.scale, 3),
            "pa_enhancement_hu": round(an.hu_right_blood, 1),
            "aorta_enhancement_hu": round(an.hu_left_blood, 1),
            "rv_diameter_mm": round(an.rv_diameter, 1),
            "lv_diameter_mm": round(an.lv_diameter, 1),
            "rv_lv_ratio": round(an.rv_lv_ratio, 3),
            "motion_slices": list(self.motion_slices) if self.motion_slices else None,
            "flow_artifact": self.flow_artifact,
            "noise_corr_mm": round(self.noise_corr_mm, 2),
            "trunk_mixing": self.trunk_mixing,
            "partial_coverage": self.partial_coverage or None,
            "n_arterial_segments": len(self.arteries),
        }


@dataclass
class Phantom:
    """A rendered study: HU volume, labels, and (optionally) the masks behind them."""

    spec: PhantomSpec
    volume_hu: np.ndarray  # int16 (z, y, x)
    pe_present_on_image: np.ndarray  # bool (z,)
    labels: StudyLabels
    emboli: tuple[Embolus, ...]  # the emboli that rendered (>= 1 voxel)
    embolus_voxels: tuple[int, ...]  # voxels per rendered embolus
    embolus_slices: tuple[tuple[int, int], ...]  # first/last slice per rendered embolus
    embolus_index: np.ndarray | None = None  # uint8 (z, y, x): 1 + index into ``emboli``; 0 none
    artery_mask: np.ndarray | None = None  # bool (z, y, x): enhanced pulmonary-arterial lumen
    clean_hu: np.ndarray | None = None  # float32, before blur, motion and noise

    @property
    def pe_positive(self) -> bool:
        """Whether any slice contains embolus voxels."""
        return bool(self.pe_present_on_image.any())

    def emboli_records(self) -> list[dict[str, Any]]:
        """The rendered emboli as JSON-able records (``phantoms.json``)."""
        out: list[dict[str, Any]] = []
        art = self.spec.arteries
        for e, n, (s0, s1) in zip(self.emboli, self.embolus_voxels, self.embolus_slices):
            seg = art[e.segment]
            c = seg.point(0.5 * (e.t0 + e.t1))
            rec = asdict(e)
            rec.update(
                level=e.level,
                subsegmental=e.subsegmental,
                vessel_radius_mm=round(seg.radius(0.5 * (e.t0 + e.t1)), 2),
                length_mm=round((e.t1 - e.t0) * seg.length, 1),
                centre_mm=[round(float(v), 1) for v in c],
                voxels=n,
                slices=[s0, s1],
            )
            rec["direction"] = [round(float(v), 3) for v in e.direction]
            for k in ("t0", "t1", "radius_fraction", "hu"):
                rec[k] = round(float(rec[k]), 3)
            out.append(rec)
        return out


# --------------------------------------------------------------------------- sampling


def study_seed(seed: int, index: int) -> int:
    """The seed of study ``index`` of a data set generated with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0])


def _parse_slices(slices: int | tuple[int, int] | None, size: Size) -> tuple[int, int]:
    if slices is None:
        return (64, 96) if size == "small" else (200, 400)
    if isinstance(slices, int):
        return slices, slices
    return int(slices[0]), int(slices[1])


def _pt(v: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """A 3-vector as a plain tuple of floats (frozen dataclass fields)."""
    return (float(v[0]), float(v[1]), float(v[2]))


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def _perpendicular(rng: np.random.Generator, d: np.ndarray) -> np.ndarray:
    """A random unit vector perpendicular to ``d``."""
    a = np.array([1.0, 0.0, 0.0]) if abs(d[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = _unit(np.cross(d, a))
    e2 = np.cross(d, e1)
    phi = rng.uniform(0, 2 * math.pi)
    return e1 * math.cos(phi) + e2 * math.sin(phi)


def _sample_anatomy(rng: np.random.Generator, category: Category, rv_ratio: float) -> Anatomy:
    s = float(rng.uniform(0.78, 1.25))  # small to large patients
    fat = float(rng.uniform(4, 45)) * s
    body_a = float(rng.uniform(150, 172)) * s + fat
    body_b = body_a * float(rng.uniform(0.64, 0.74))
    muscle = float(rng.uniform(8, 16)) * s
    t_ant = fat * 0.7 + muscle + 6 * s
    t_post = fat + float(rng.uniform(46, 54)) * s
    t_lat = fat + muscle + 10 * s
    cavity_a = body_a - t_lat
    cavity_b = body_b - 0.5 * (t_ant + t_post)
    cavity_cy = 0.5 * (t_ant - t_post)
    spine_r = float(rng.uniform(15, 19)) * s
    lv_d = float(rng.uniform(38, 50)) * s * rv_ratio ** (-0.3)
    if category == "indeterminate" and rng.random() < 0.5:
        right = float(rng.uniform(110, 170))  # poor bolus timing: a QA-contrast indeterminate study
    else:
        right = float(rng.uniform(200, 650))  # trunk enhancement from poor to dense bolus timing
    left = 40 + (right - 40) * float(rng.uniform(0.35, 0.75))
    return Anatomy(
        scale=s,
        body_a=body_a,
        body_b=body_b,
        body_power=float(rng.uniform(2.0, 2.6)),
        fat_mm=fat,
        muscle_mm=muscle,
        cavity_a=cavity_a,
        cavity_b=cavity_b,
        cavity_cy=cavity_cy,
        lung_cx=0.48 * cavity_a,
        lung_a=0.56 * cavity_a,
        lung_b=1.05 * cavity_b,
        lung_widest_z=float(rng.uniform(10, 30)) * s,
        apex_z=float(rng.uniform(95, 115)) * s,
        dome_right_z=float(rng.uniform(-118, -100)) * s,
        dome_left_z=0.0,  # set below relative to the right dome
        dome_depth=float(rng.uniform(35, 50)) * s,
        spine_y=cavity_cy + cavity_b - 0.4 * spine_r,
        spine_r=spine_r,
        vertebra_mm=float(rng.uniform(23, 28)) * s,
        trachea_y=0.0,  # set below from the spine
        carina_z=float(rng.uniform(10, 20)) * s,
        heart_c=(float(rng.uniform(16, 28)) * s, float(rng.uniform(-40, -30)) * s, float(rng.uniform(-78, -68)) * s),
        heart_theta=math.radians(float(rng.uniform(32, 50))),
        lv_diameter=lv_d,
        rv_diameter=lv_d * rv_ratio,
        hu_fat=float(rng.uniform(-115, -80)),
        hu_muscle=float(rng.uniform(40, 60)),
        hu_lung=float(rng.uniform(-880, -820)),
        hu_lung_gradient=float(rng.uniform(40, 120)),
        hu_bone=float(rng.uniform(450, 800)),
        hu_marrow=float(rng.uniform(180, 280)),
        hu_liver=float(rng.uniform(55, 80)),
        hu_myocardium=float(rng.uniform(70, 120)),
        hu_right_blood=right,
        hu_left_blood=left,
        hu_svc=min(2000.0, right * float(rng.uniform(1.2, 2.6))),
    )


def _finish_anatomy(an: Anatomy, rng: np.random.Generator) -> Anatomy:
    d = asdict(an)
    d["dome_left_z"] = an.dome_right_z - float(rng.uniform(8, 22)) * an.scale
    d["trachea_y"] = an.spine_y - an.spine_r - 24 * an.scale
    d["heart_c"] = tuple(an.heart_c)
    return Anatomy(**d)


# ---- shape functions shared by the painter and the vessel-tree growth ----


def _lung_taper(an: Anatomy, z: np.ndarray) -> np.ndarray:
    """In-plane scale of the lungs at height z: 1 below the widest level, 0 at the apex."""
    u = np.clip((z - an.lung_widest_z) / (an.apex_z - an.lung_widest_z), 0.0, 1.0)
    return np.sqrt(np.clip(1.0 - u * u, 0.0, 1.0))


def _dome_z(an: Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height of the diaphragm under (x, y): domes centred in each hemithorax."""
    right = x < 0
    top = np.where(right, an.dome_right_z, an.dome_left_z)
    cx = np.where(right, -an.lung_cx, an.lung_cx)
    rho2 = ((x - cx) / an.lung_a) ** 2 + ((y - an.cavity_cy + 10 * an.scale) / an.lung_b) ** 2
    return top - an.dome_depth * np.clip(rho2, 0.0, 1.6)


def _mediastinum_w(an: Anatomy, z: np.ndarray) -> np.ndarray:
    """Height factor of the mediastinal half-width (mm): widest at the hila."""
    s = an.scale
    return s * (9 + 26 * np.exp(-(((z + 5 * s) / (40 * s)) ** 2)))


def _mediastinum_f(an: Anatomy, y: np.ndarray) -> np.ndarray:
    """Antero-posterior factor of the mediastinal half-width: narrow behind the sternum."""
    front = an.cavity_cy - an.cavity_b
    return 0.3 + 0.7 * np.clip((y - front) / (50 * an.scale), 0.0, 1.0)


def _mediastinum_halfwidth(an: Anatomy, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Half-width of the mediastinal band between the lungs (wider at the hila, narrow in front)."""
    return _mediastinum_w(an, z) * _mediastinum_f(an, y)


def _inside_lung(an: Anatomy, p: np.ndarray, margin: float = 3.0) -> np.ndarray:
    """Whether points (N, 3) lie in lung parenchyma, ``margin`` mm from its edges (approximately)."""
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    g = np.maximum(_lung_taper(an, z), 1e-3)
    side = np.where(x < 0, -1.0, 1.0)
    lung = ((x - side * an.lung_cx) / (an.lung_a * g - margin)) ** 2 + (
        (y - an.cavity_cy) / (an.lung_b * g - margin)
    ) ** 2 <= 1
    cav = (x / (an.cavity_a - margin)) ** 2 + ((y - an.cavity_cy) / (an.cavity_b - margin)) ** 2 <= 1
    med = np.abs(x - 5 * an.scale) < _mediastinum_halfwidth(an, y, z) + margin
    above = z > _dome_z(an, x, y) + margin
    below_apex = z < an.apex_z - margin
    # the heart sits in the left-anterior lower chest
    hx, hy, hz = an.heart_c
    heart = ((x - hx) / 70) ** 2 + ((y - hy) / 60) ** 2 + ((z - hz) / 62) ** 2 <= 1
    return lung & cav & ~med & above & below_apex & ~heart


def _grow_tree(
    rng: np.random.Generator,
    an: Anatomy,
    segs: list[VesselSegment],
    start: np.ndarray,
    direction: np.ndarray,
    radius: float,
    order: int,
    side: Side,
    parent: int,
    r_min: float,
    hilum: np.ndarray,
) -> None:
    """Grow a branching tree from ``start`` (iterative).

    Each segment ends in a continuation (radius × ~0.8, small angle) and one
    or two side branches (radius × ~0.6, wide angle), roughly Murray's law;
    a child that would leave the lung tries other directions, then is dropped.
    """
    stack: list[tuple[np.ndarray, np.ndarray, float, int, int]] = [(start, _unit(direction), radius, order, parent)]
    while stack:
        p0, d, r, o, par = stack.pop()
        placed = False
        for attempt in range(3):
            dd = d if attempt == 0 else _unit(d + 0.6 * _perpendicular(rng, d))
            length = float(np.clip(r * rng.uniform(5, 9), 5.0, 38.0 * an.scale))
            p1 = p0 + dd * length
            if bool(_inside_lung(an, p1[None, :], margin=0.5 * r + 1.0)[0]):
                placed = True
                d = dd
                break
        if not placed:
            continue
        r1 = r * 0.95
        o = o if o < 3 else (3 if r >= 2.3 * an.scale else SUBSEGMENTAL_ORDER)
        segs.append(VesselSegment(_pt(p0), _pt(p1), float(r), float(r1), side, o, par))
        me = len(segs) - 1
        outward = _unit(p1 - hilum)
        children = [(float(rng.uniform(8, 25)), float(rng.uniform(0.76, 0.86)))]
        children.append((float(rng.uniform(35, 70)), float(rng.uniform(0.55, 0.7))))
        if rng.random() < 0.6:
            children.append((float(rng.uniform(35, 70)), float(rng.uniform(0.5, 0.65))))
        for ang_deg, ratio in children:
            cr = r1 * ratio
            if cr < r_min:
                continue
            ang = math.radians(ang_deg)
            cd = d * math.cos(ang) + _perpendicular(rng, d) * math.sin(ang)
            cd = _unit(0.8 * cd + 0.2 * outward)
            # the continuation keeps the order of its parent beyond the segmental level
            stack.append((p1, cd, cr, o + 1, me))


def _fill_lungs(
    rng: np.random.Generator, an: Anatomy, segs: list[VesselSegment], n_seeds: int, r_min: float
) -> None:
    """Send extra branches from the nearest sizeable vessel towards random lung points (even coverage)."""
    lo = np.array([-an.cavity_a, an.cavity_cy - an.cavity_b, an.dome_left_z - an.dome_depth])
    hi = np.array([an.cavity_a, an.cavity_cy + an.cavity_b, an.apex_z])
    cand = rng.uniform(lo, hi, size=(n_seeds * 8, 3))
    targets = cand[_inside_lung(an, cand, margin=4.0)][:n_seeds]
    big = [i for i, sg in enumerate(segs) if sg.r1 >= 1.6 * an.scale and sg.order >= 2]
    if not big or len(targets) == 0:
        return
    ends = np.array([segs[i].p1 for i in big])
    mids = np.array([segs[i].point(0.5) for i in big])
    for tgt in targets:
        d_end = np.linalg.norm(ends - tgt, axis=1)
        d_mid = np.linalg.norm(mids - tgt, axis=1)
        j = int(np.argmin(np.minimum(d_end, d_mid)))
        i = big[j]
        start = ends[j] if d_end[j] <= d_mid[j] else mids[j]
        if np.linalg.norm(tgt - start) < 8.0:
            continue
        sg = segs[i]
        r = min(sg.r1 * float(rng.uniform(0.6, 0.8)), 3.2 * an.scale)
        if r < r_min:
            continue
        # a gently tapering chain towards the target, then a tree from there
        n_piece = max(1, int(np.ceil(np.linalg.norm(tgt - start) / 22.0)))
        pts = [start + (tgt - start) * (k / n_piece) for k in range(n_piece + 1)]
        for k in range(1, n_piece):
            pts[k] = pts[k] + rng.normal(0.0, 2.0, 3)
        if not bool(_inside_lung(an, np.array(pts[1:]), margin=r).all()):
            continue
        parent = i
        for k in range(n_piece):
            r1 = r * 0.93
            segs.append(VesselSegment(_pt(pts[k]), _pt(pts[k + 1]), float(r), float(r1), sg.side, 3 if r >= 2.3 * an.scale else SUBSEGMENTAL_ORDER, parent))
            parent = len(segs) - 1
            r = r1
        _grow_tree(rng, an, segs, pts[-1], pts[-1] - pts[-2], r * 0.8, 4, sg.side, parent, r_min, start)


def _build_vessels(
    rng: np.random.Generator, an: Anatomy, r_min: float
) -> tuple[list[VesselSegment], list[VesselSegment], list[VesselSegment]]:
    """Pulmonary arteries (trunk → main → lobar → segmental → …), veins and central bronchi."""
    s = an.scale
    sx = an.cavity_a / 130.0
    sy = an.cavity_b / 85.0

    def P(x: float, y: float, z: float, j: float = 3.0) -> np.ndarray:
        return np.array([x * sx, y * sy, z * s]) + rng.uniform(-j, j, 3) * s

    strain = max(an.rv_lv_ratio - 1.0, 0.0)
    r_trunk = float(rng.uniform(12.5, 14.5)) * s * (1 + 0.35 * strain)
    r_main = float(rng.uniform(9.5, 11.5)) * s * (1 + 0.25 * strain)
    arteries: list[VesselSegment] = []

    def add(p0: np.ndarray, p1: np.ndarray, r0: float, r1: float, side: Side, order: int, parent: int) -> int:
        arteries.append(VesselSegment(_pt(p0), _pt(p1), r0, r1, side, order, parent))
        return len(arteries) - 1

    hx, hy, hz = an.heart_c
    rvot = np.array([hx + 6 * s, hy - 24 * s, hz + 32 * s])
    bif = P(18, -12, 0, 1.5)
    bif[2] = 0.0
    t = add(rvot, bif, r_trunk, r_trunk * 0.95, "central", 0, -1)
    # right PA passes behind the ascending aorta and the SVC to the right hilum
    r_mid = P(-14, 10, -3)
    r_hil = P(-55, 12, -8)
    rp = add(bif, r_mid, r_main, r_main * 0.97, "right", 1, t)
    rh = add(r_mid, r_hil, r_main * 0.97, r_main * 0.85, "right", 1, rp)
    # left PA arches over the left main bronchus
    l_mid = P(40, 18, 9)
    l_hil = P(56, 34, 0)
    lp = add(bif, l_mid, r_main * 0.95, r_main * 0.9, "left", 1, t)
    lh = add(l_mid, l_hil, r_main * 0.9, r_main * 0.8, "left", 1, lp)
    # lobar arteries: (start, end, radius, parent)
    lobar: list[tuple[np.ndarray, np.ndarray, float, Side, int]] = [
        (r_hil, P(-72, 0, 42), 6.0, "right", rh),  # right upper lobe (truncus anterior)
        (r_hil, P(-68, 14, -40), 7.0, "right", rh),  # interlobar / right lower lobe
        (P(-62, 10, -28), P(-84, -42, -55), 4.6, "right", rh),  # right middle lobe
        (l_hil, P(68, -8, 45), 6.0, "left", lh),  # left upper lobe
        (l_hil, P(74, 36, -42), 6.8, "left", lh),  # left lower lobe
        (P(60, 25, -12), P(84, -34, -52), 4.4, "left", lh),  # lingula
    ]
    lobar_ids: list[int] = []
    for p0, p1, r, side, par in lobar:
        r = r * s * float(rng.uniform(0.9, 1.1))
        lobar_ids.append(add(p0, p1, r, r * 0.85, side, 2, par))
    for i in lobar_ids:
        seg = arteries[i]
        d = _unit(np.subtract(seg.p1, seg.p0))
        hil = np.asarray(seg.p0)
        for tt in (0.3, 0.5, 0.7, 0.85, 1.0):
            start = seg.point(tt)
            n_here = 3 if tt == 1.0 else 1
            for _ in range(n_here):
                ang = math.radians(float(rng.uniform(20, 60))) if tt < 1.0 else math.radians(float(rng.uniform(5, 40)))
                cd = d * math.cos(ang) + _perpendicular(rng, d) * math.sin(ang)
                _grow_tree(rng, an, arteries, start, cd, seg.radius(tt) * 0.72, 3, seg.side, i, r_min, hil)

    _fill_lungs(rng, an, arteries, 110, r_min)

    # pulmonary veins: four into the left atrium, then trees
    la = np.array([hx - 2 * s, hy + 40 * s, hz + 28 * s])
    veins: list[VesselSegment] = []
    for side, target, direc in (
        ("right", P(-52, 8, -22), (-0.5, -0.2, 0.8)),
        ("right", P(-52, 30, -58), (-0.5, 0.3, -0.8)),
        ("left", P(54, 14, -16), (0.5, -0.3, 0.8)),
        ("left", P(54, 36, -56), (0.5, 0.3, -0.8)),
    ):
        rv = float(rng.uniform(6, 7.5)) * s
        veins.append(VesselSegment(_pt(la), _pt(target), rv, rv * 0.9, side, 1, -1))  # type: ignore[arg-type]
        me = len(veins) - 1
        for _ in range(2):
            d = _unit(np.asarray(direc) + rng.uniform(-0.4, 0.4, 3))
            _grow_tree(rng, an, veins, target, d, rv * 0.7, 2, side, me, r_min * 1.1, target)  # type: ignore[arg-type]

    _fill_lungs(rng, an, veins, 80, r_min * 1.1)

    # trachea and main / lobar bronchi
    ty = an.trachea_y
    cz = an.carina_z
    rt = float(rng.uniform(8, 10)) * s
    bronchi = [
        VesselSegment((0.0, ty, cz), (0.0, ty - 6 * s, an.apex_z + 80), rt, rt, "central", 0),
        VesselSegment((0.0, ty, cz), (-32 * sx, ty + 6 * s, cz - 22 * s), rt * 0.8, rt * 0.75, "right", 1),
        VesselSegment((0.0, ty, cz), (38 * sx, ty + 10 * s, cz - 38 * s), rt * 0.72, rt * 0.68, "left", 1),
        VesselSegment((-32 * sx, ty + 6 * s, cz - 22 * s), (-60 * sx, ty + 2 * s, cz + 10 * s), 5 * s, 4.5 * s, "right", 2),
        VesselSegment((-32 * sx, ty + 6 * s, cz - 22 * s), (-50 * sx, ty + 14 * s, cz - 75 * s), 6 * s, 5 * s, "right", 2),
        VesselSegment((38 * sx, ty + 10 * s, cz - 38 * s), (62 * sx, ty - 10 * s, cz + 0 * s), 5 * s, 4.5 * s, "left", 2),
        VesselSegment((38 * sx, ty + 10 * s, cz - 38 * s), (58 * sx, ty + 16 * s, cz - 85 * s), 5.5 * s, 4.5 * s, "left", 2),
    ]
    return arteries, veins, bronchi


def _sample_emboli(
    rng: np.random.Generator,
    arteries: Sequence[VesselSegment],
    pe_type: PEType,
    hard: bool,
    min_radius: float,
    *,
    tails: np.random.Generator | None = None,
) -> list[Embolus]:
    """Plant emboli of the study's type; ``hard`` studies get subsegmental emboli only.

    With ``tails`` (a generator of its own), an acute clot of a main or lobar artery often
    trails into a daughter branch (a tail along the branch, same group).

    Only arteries of lumen radius >= ``min_radius`` carry emboli, so that a
    defect covers at least a voxel on the study's grid.
    """
    by_level: dict[str, list[int]] = {"trunk": [], "main": [], "lobar": [], "segmental": [], "subsegmental": []}
    for i, seg in enumerate(arteries):
        if seg.order >= SUBSEGMENTAL_ORDER and seg.radius(0.5) < min_radius:
            continue  # too small to carry a visible defect
        by_level[ORDER_NAMES.get(seg.order, "subsegmental")].append(i)
    n = 1 + int(min(rng.poisson(1.6), 5))
    if pe_type == "acute_and_chronic":
        n = max(n, 2)
    kinds: list[Literal["acute", "chronic"]]
    if pe_type == "acute":
        kinds = ["acute"] * n
    elif pe_type == "chronic":
        kinds = ["chronic"] * n
    else:
        extra: list[Literal["acute", "chronic"]] = ["acute" if rng.random() < 0.5 else "chronic" for _ in range(n - 2)]
        kinds = ["acute", "chronic", *extra]
    levels = ["trunk", "main", "lobar", "segmental", "subsegmental"]
    p_acute = np.array([0.10, 0.18, 0.24, 0.28, 0.20])
    p_chronic = np.array([0.0, 0.30, 0.32, 0.28, 0.10])
    emboli: list[Embolus] = []
    group = 0
    for kind in kinds:
        if hard:
            level = "subsegmental"
        else:
            p = p_acute if kind == "acute" else p_chronic
            level = levels[int(rng.choice(len(levels), p=p / p.sum()))]
        cands = by_level[level] or by_level["segmental"]
        i = int(rng.choice(cands))
        seg = arteries[i]
        d = _unit(np.subtract(seg.p1, seg.p0))
        perp = _perpendicular(rng, d)
        r_mid = seg.radius(0.5)
        if kind == "acute":
            occl_p = 0.15 if seg.order <= 1 else 0.55
            shape: Literal["central", "occlusive", "eccentric", "web"] = "occlusive" if rng.random() < occl_p else "central"
            frac = 1.1 if shape == "occlusive" else float(rng.uniform(0.45, 0.8))
            length = r_mid * float(rng.uniform(3, 9))
            hu = float(rng.uniform(30, 65))
        else:
            shape = "web" if (rng.random() < 0.3 and seg.order >= 1) else "eccentric"
            frac = float(rng.uniform(0.35, 0.6)) if shape == "eccentric" else float(rng.uniform(0.12, 0.2))
            length = r_mid * float(rng.uniform(2.5, 7)) if shape == "eccentric" else r_mid * float(rng.uniform(1.5, 3))
            hu = float(rng.uniform(20, 55))
        length = max(length, 3.0)
        tl = min(length / max(seg.length, 1e-3), 0.85)
        tc = float(rng.uniform(0.08 + tl / 2, 0.92 - tl / 2)) if tl < 0.84 else 0.5
        emboli.append(
            Embolus(i, kind, shape, tc - tl / 2, tc + tl / 2, frac, _pt(perp), hu, seg.side, seg.order, group)
        )
        # an acute embolus of the trunk's end often straddles the bifurcation (saddle)
        if kind == "acute" and seg.order == 0 and rng.random() < 0.5:
            emboli[-1] = Embolus(i, kind, "central", 0.7, 1.0, frac, emboli[-1].direction, hu, "central", 0, group)
            for j, a in enumerate(arteries):
                if a.order == 1 and a.parent == i:
                    emboli.append(Embolus(j, kind, "central", 0.0, 0.3, frac * 0.9, emboli[-1].direction, hu, a.side, 1, group))
        if tails is not None and kind == "acute" and seg.order in (1, 2) and tails.random() < 0.4:
            daughters = [j for j, a in enumerate(arteries) if a.parent == i and a.radius(0.5) >= min_radius]
            if daughters:
                j = int(daughters[int(tails.integers(len(daughters)))])
                a = arteries[j]
                emboli.append(Embolus(j, kind, "central", 0.0, float(tails.uniform(0.3, 0.75)), min(frac, 0.8) * 0.85, _pt(perp), hu, a.side, a.order, group))
        group += 1
    return emboli


def sample_spec(
    seed: int,
    *,
    size: Size = "small",
    slices: int | tuple[int, int] | None = None,
    category: Category | None = None,
    pe_type: PEType | None = None,
    mix: dict[str, float] | None = None,
    max_slice_spacing_mm: float | None = None,
) -> PhantomSpec:
    """Draw a complete study description from ``np.random.default_rng(seed)``.

    ``max_slice_spacing_mm`` (small studies): more slices than ``slices`` asks for when
    needed to keep the spacing (and thickness) at most this (a node refuses thick
    reconstructions as CTPA, 3 mm by default).

    ``size`` "small": 128² pixels, 64–96 slices of 2.5–4.5 mm (CPU training,
    tests); "full": 512², 200–400 slices of 0.6–1.5 mm spacing (thickness up
    to 3 mm). ``slices`` fixes the slice count (or its range). ``category`` and
    ``pe_type`` force the study type; otherwise drawn from ``mix``.
    """
    if size not in ("small", "full"):
        raise ValueError(f"size must be 'small' or 'full', got {size!r}")
    rng = np.random.default_rng(seed)
    mix = mix or DEFAULT_MIX
    if category is None:
        names = list(mix)
        p = np.array([mix[k] for k in names], dtype=float)
        category = names[int(rng.choice(len(names), p=p / p.sum()))]  # type: ignore[assignment]
    if category not in ("negative", "positive", "indeterminate"):
        raise ValueError(f"unknown category {category!r}")
    if category == "positive":
        if pe_type is None:
            u = rng.random()
            pe_type = "acute" if u < 0.6 else ("chronic" if u < 0.8 else "acute_and_chronic")
        gte = rng.random() < 0.42
    else:
        pe_type = None
        gte = rng.random() < 0.06  # RV dilatation without PE (labels stay 0)
    ratio = float(rng.uniform(1.08, 1.6)) if gte else float(rng.uniform(0.6, 0.92))
    an = _finish_anatomy(_sample_anatomy(rng, category, ratio), rng)

    reasons: tuple[str, ...] = ()
    if category == "indeterminate":
        if an.hu_right_blood < 200:
            reasons = ("qa_contrast",) + (("qa_motion",) if rng.random() < 0.3 else ())
        else:
            reasons = ("qa_motion",)

    # Variety drawn from a stream of its own (the draws above and below are those of earlier versions):
    # partial coverage, kernel families and noise texture, mixing artefacts, clot tails.
    more = np.random.default_rng([seed, 7])
    u_cover = float(more.random())
    coverage = "fov" if u_cover < 0.12 else ("z" if u_cover < 0.22 else "")

    # scanner geometry
    n_lo, n_hi = _parse_slices(slices, size)
    top, bottom = an.apex_z + 12 * an.scale, an.dome_left_z - an.dome_depth - 12 * an.scale
    span = top - bottom
    # small studies crop the field of view to the body (more pixels on the chest)
    fov_factor = rng.uniform(1.02, 1.08) if size == "small" else rng.uniform(1.04, 1.2)
    if coverage == "fov":
        fov_factor = float(more.uniform(0.8, 0.97))  # a reconstruction that cuts the body at the sides
    fov = float(np.clip(2 * an.body_a * fov_factor, 300, 480))
    z_shift = 0.0
    if coverage == "z":  # a series that covers part of the chest only
        keep = float(more.uniform(0.5, 0.85))
        z_shift = float(more.uniform(-0.5, 0.5)) * (1 - keep) * span
        span *= keep
    if size == "small":
        nxy = 128
        n = int(rng.integers(n_lo, n_hi + 1))
        if max_slice_spacing_mm is not None and span / n > max_slice_spacing_mm:
            n = int(math.ceil(span / max_slice_spacing_mm))
        dz = float(np.clip(span / n, 2.0, 5.0))
        thick = dz
    else:
        nxy = 512
        dz = float(rng.choice([0.625, 0.8, 1.0, 1.25, 1.5]))
        n = int(np.clip(round(span / dz), n_lo, n_hi))
        if slices is not None and n_lo == n_hi:
            dz = float(np.clip(span / n, 0.5, 3.0))
        thick = float(min(3.0, dz * float(rng.choice([1.0, 1.0, 1.25, 1.5, 2.0]))))
        thick = max(thick, 0.6)
    ps = fov / nxy
    z_mid = 0.5 * (top + bottom) + z_shift
    z0 = z_mid - 0.5 * (n - 1) * dz + float(rng.uniform(-8, 8))
    cx = float(rng.uniform(-3, 3) if size == "small" else rng.uniform(-10, 10))
    cy = float(rng.uniform(-5, 25))  # the table sits behind the patient: body a bit anterior of centre
    origin = (cx - (nxy - 1) * ps / 2, cy - (nxy - 1) * ps / 2, z0)

    kernel, kvp, noise, psf = _sample_scanner(rng)
    if category == "indeterminate":
        noise *= 1.3
    family = float(more.random())
    if family < 0.2:  # a sharp (lung/bone) kernel: crisp and noisy
        kernel, psf, noise = kernel + "-sharp", psf * 0.55, noise * float(more.uniform(1.6, 2.6))
    elif family < 0.4:  # a soft kernel or iterative reconstruction: smooth, blotchy noise
        kernel, psf, noise = kernel + "-soft", psf * float(more.uniform(1.4, 2.0)), noise * float(more.uniform(0.45, 0.8))
    noise_corr = float(more.uniform(0.4, 1.2)) if family >= 0.2 and more.random() < 0.5 else 0.0

    r_min = 0.5 if size == "full" else 0.9
    arteries, veins, bronchi = _build_vessels(rng, an, r_min)
    hard = False
    emboli: list[Embolus] = []
    if category == "positive" and pe_type is not None:
        hard = rng.random() < 0.15
        emboli = _sample_emboli(rng, arteries, pe_type, hard, max(0.9, 0.6 * ps), tails=more)

    # hilar / mediastinal lymph nodes: soft-tissue blobs next to the arteries (mimics)
    nodes = []
    for _ in range(int(rng.integers(1, 5))):
        seg = arteries[int(rng.choice([i for i, a in enumerate(arteries) if a.order <= 2]))]
        c = seg.point(float(rng.uniform(0.2, 0.9))) + _perpendicular(rng, _unit(np.subtract(seg.p1, seg.p0))) * (
            seg.radius(0.5) + 5
        )
        nodes.append((float(c[0]), float(c[1]), float(c[2]), float(rng.uniform(3, 7))))

    motion = None
    if "qa_motion" in reasons:
        k0 = int(rng.integers(0, max(1, n // 3)))
        motion = (k0, min(n - 1, k0 + int(n * rng.uniform(0.3, 0.6))))
    flow = bool(rng.random() < 0.2)
    mixing = bool(more.random() < (0.25 if category != "positive" else 0.1))

    return PhantomSpec(
        seed=seed,
        size=size,
        category=category,
        pe_type=pe_type,
        indeterminate_reasons=reasons,
        shape=(n, nxy, nxy),
        pixel_spacing=ps,
        slice_spacing=dz,
        slice_thickness=thick,
        origin=origin,
        kernel=kernel,
        kvp=kvp,
        noise_sd=noise,
        psf_sigma_mm=psf,
        anatomy=an,
        arteries=tuple(arteries),
        veins=tuple(veins),
        bronchi=tuple(bronchi),
        nodes=tuple(nodes),
        emboli=tuple(emboli),
        motion_slices=motion,
        flow_artifact=flow,
        noise_corr_mm=noise_corr,
        trunk_mixing=mixing,
        partial_coverage=coverage,
    )


def _sample_scanner(rng: np.random.Generator) -> tuple[str, int, float, float]:
    """Kernel, kVp, image noise SD (HU) and in-plane blur (mm) of a plausible CTPA reconstruction."""
    kernels = [("B30f", 0.55), ("B31f", 0.5), ("Br36d", 0.45), ("STANDARD", 0.5), ("FC08", 0.6), ("I30f", 0.5)]
    name, psf = kernels[int(rng.integers(len(kernels)))]
    kvp = int(rng.choice([80, 100, 100, 120]))
    noise = float(rng.uniform(10, 28)) * (1.2 if kvp == 80 else 1.0)
    return name, kvp, noise, psf


# --------------------------------------------------------------------------- rendering


class _Canvas:
    """The float32 HU volume being painted, with its voxel coordinates."""

    def __init__(self, spec: PhantomSpec) -> None:
        self.spec = spec
        self.zs, self.ys, self.xs = spec.axes()
        self.vol = np.full(spec.shape, -1000.0, dtype=np.float32)
        self.h = float(spec.pixel_spacing)

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index box of the voxels whose centres lie within [lo, hi] (x, y, z mm)."""
        out = []
        for axis, a, b in ((self.zs, lo[2], hi[2]), (self.ys, lo[1], hi[1]), (self.xs, lo[0], hi[0])):
            i0 = int(np.searchsorted(axis, a, side="left"))
            i1 = int(np.searchsorted(axis, b, side="right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return out[0], out[1], out[2]

    def grids(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable coordinate grids (z, y, x) of a box."""
        return (
            self.zs[sl[0]][:, None, None],
            self.ys[sl[1]][None, :, None],
            self.xs[sl[2]][None, None, :],
        )

    def capsule(
        self, p0: Sequence[float] | np.ndarray, p1: Sequence[float] | np.ndarray, r0: float, r1: float, pad: float = 1.5
    ) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray, np.ndarray] | None:
        """Anti-aliased coverage (0…1) of a tapering capsule within its box, the axial fraction t and the radial offset."""
        a = np.asarray(p0, dtype=np.float64)
        b = np.asarray(p1, dtype=np.float64)
        rmax = max(r0, r1) + pad * self.h
        sl = self.box(np.minimum(a, b) - rmax, np.maximum(a, b) + rmax)
        if sl is None:
            return None
        Z, Y, X = self.grids(sl)
        d = (b - a).astype(np.float32)
        L2 = float(d @ d) or 1e-6
        X = X - np.float32(a[0])
        Y = Y - np.float32(a[1])
        Z = Z - np.float32(a[2])
        t = np.clip((X * d[0] + Y * d[1] + Z * d[2]) / np.float32(L2), 0.0, 1.0)
        qx = X - t * d[0]
        qy = Y - t * d[1]
        qz = Z - t * d[2]
        dist = np.sqrt(qx * qx + qy * qy + qz * qz)
        r = np.float32(r0) + np.float32(r1 - r0) * t
        cov = np.clip((r - dist) / np.float32(self.h) + 0.5, 0.0, 1.0)
        return sl, cov, t, dist

    def paint_capsule(
        self, seg: VesselSegment, hu: float, extra_r: float = 0.0, only_below: float | None = None
    ) -> None:
        """Blend a vessel segment of uniform HU into the volume (only over voxels below ``only_below`` HU if given)."""
        res = self.capsule(seg.p0, seg.p1, seg.r0 + extra_r, seg.r1 + extra_r)
        if res is None:
            return
        sl, cov, _, _ = res
        sub = self.vol[sl]
        if only_below is not None:
            cov = np.where(sub < only_below, cov, np.float32(0.0))
        sub += (np.float32(hu) - sub) * cov

    def paint_ellipsoid(
        self, c: Sequence[float], semi: Sequence[float], theta: float, hu: float | np.ndarray
    ) -> None:
        """Blend an ellipsoid with semi-axes (u, v, z), its u axis at angle ``theta`` in the axial plane."""
        a, b, cz = semi
        rmax = max(a, b) + 2 * self.h
        lo = np.array([c[0] - rmax, c[1] - rmax, c[2] - cz - self.h])
        hi = np.array([c[0] + rmax, c[1] + rmax, c[2] + cz + self.h])
        sl = self.box(lo, hi)
        if sl is None:
            return
        Z, Y, X = self.grids(sl)
        ct, st = math.cos(theta), -math.sin(theta)  # u = (cos θ, −sin θ): towards left-anterior
        dx = X - np.float32(c[0])
        dy = Y - np.float32(c[1])
        u = dx * ct + dy * st
        v = -dx * st + dy * ct
        q = np.sqrt((u / a) ** 2 + (v / b) ** 2 + ((Z - np.float32(c[2])) / cz) ** 2)
        cov = np.clip((1.0 - q) * np.float32(min(a, b)) / np.float32(self.h) + 0.5, 0.0, 1.0)
        sub = self.vol[sl]
        sub += (np.asarray(hu, dtype=np.float32) - sub) * cov


def _paint_body(cv: _Canvas, an: Anatomy) -> None:
    """Body outline, subcutaneous fat, chest-wall muscle, ribs, lungs, mediastinal fat, upper abdomen."""
    s = an.scale
    zs, ys, xs = cv.zs, cv.ys, cv.xs
    Y2, X2 = np.meshgrid(ys, xs, indexing="ij")
    p = an.body_power

    def superellipse(a: float, b: float, cy: float) -> np.ndarray:
        return np.abs(X2 / a) ** p + np.abs((Y2 - cy) / b) ** p <= 1

    body = superellipse(an.body_a, an.body_b, 0.0)
    muscle = superellipse(an.body_a - an.fat_mm, an.body_b - an.fat_mm * 0.8, 0.0)
    cavity = (X2 / an.cavity_a) ** 2 + ((Y2 - an.cavity_cy) / an.cavity_b) ** 2 <= 1
    ring = ((X2 / (an.cavity_a + 7 * s)) ** 2 + ((Y2 - an.cavity_cy) / (an.cavity_b + 7 * s)) ** 2 <= 1) & ~cavity
    # table under the patient
    table = (np.abs(Y2 - (an.body_b + 12)) < 3) & (np.abs(X2) < 0.9 * an.body_a + 30)
    cv.vol[:, table] = 150.0
    cv.vol[:, body] = an.hu_fat
    cv.vol[:, muscle] = an.hu_muscle
    # paraspinal muscles and breast/pectoral bulk are part of the muscle layer; ribs in the ring
    phi = np.arctan2(X2[ring], (Y2[ring] - an.cavity_cy))  # 0 at the back, ±π in front
    aphi = np.abs(phi)
    rib_spacing = 24.0 * s
    zz = zs[:, None] + (95.0 * s) * (aphi[None, :] / math.pi)
    rib = (np.mod(zz, rib_spacing) < 0.36 * rib_spacing) & (aphi[None, :] < 0.82 * math.pi) & (zs[:, None] < an.apex_z + 20)
    ring_vals = np.where(rib, np.float32(an.hu_marrow + 150), np.float32(an.hu_muscle))
    cv.vol[:, ring] = ring_vals
    cv.vol[:, cavity] = an.hu_fat + 10

    # lungs and upper abdomen, a few slices at a time
    lung_grad = (an.hu_lung + an.hu_lung_gradient * (Y2 - an.cavity_cy) / an.cavity_b).astype(np.float32)
    dome = _dome_z(an, X2, Y2).astype(np.float32)
    right_side = X2 < 20 * s
    med_c = 5 * s
    # lung ellipses compared with the squared taper, mediastinum as |x - c| / f(y) against w(z)
    ell = np.minimum(
        ((X2 + an.lung_cx) / an.lung_a) ** 2 + ((Y2 - an.cavity_cy) / an.lung_b) ** 2,
        ((X2 - an.lung_cx) / an.lung_a) ** 2 + ((Y2 - an.cavity_cy) / an.lung_b) ** 2,
    )
    ell[~cavity] = np.inf
    med = (np.abs(X2 - med_c) / _mediastinum_f(an, Y2)).astype(np.float32)
    g2 = (_lung_taper(an, zs) ** 2).astype(np.float32)
    wz = _mediastinum_w(an, zs).astype(np.float32)
    liver = cavity & right_side
    spleen = cavity & ~right_side
    for k in range(len(zs)):
        above = dome < zs[k]
        sl = cv.vol[k]
        lung = (ell <= g2[k]) & (med >= wz[k]) & above
        sl[lung] = lung_grad[lung]
        sl[liver & ~above] = an.hu_liver
        sl[spleen & ~above] = an.hu_muscle - 5
    # gastric air under the left dome
    cv.paint_ellipsoid((55 * s, -15 * s, an.dome_left_z - 30 * s), (28 * s, 20 * s, 12 * s), 0.0, -950.0)


def _paint_spine(cv: _Canvas, an: Anatomy) -> None:
    """Vertebral bodies with discs, spinal canal, posterior elements, sternum."""
    s = an.scale
    Y2, X2 = np.meshgrid(cv.ys, cv.xs, indexing="ij")
    ys = an.spine_y
    rr = np.hypot(X2, Y2 - ys)
    body = rr <= an.spine_r
    cortex = body & (rr > an.spine_r - 2.0)
    canal_y = ys + an.spine_r + 8 * s
    rc = np.hypot(X2, Y2 - canal_y)
    canal = rc <= 7.5 * s
    arch = (rc <= 13 * s) & ~canal & (Y2 > canal_y - 4 * s)
    spinous = ((X2 / (4.5 * s)) ** 2 + ((Y2 - canal_y - 18 * s) / (11 * s)) ** 2) <= 1
    transverse = (np.abs(Y2 - canal_y + 2 * s) < 4 * s) & (np.abs(X2) < 26 * s) & (np.abs(X2) > 8 * s)
    disc_z = np.mod(cv.zs, an.vertebra_mm) < 0.22 * an.vertebra_mm
    paraspinal = (((np.abs(X2) - 26 * s) / (20 * s)) ** 2 + ((Y2 - canal_y - 14 * s) / (24 * s)) ** 2 <= 1) & (
        cv.vol[0] > -500
    )
    cv.vol[:, paraspinal & ~body] = an.hu_muscle
    marrow = np.where(disc_z, np.float32(90.0), np.float32(an.hu_marrow))
    cv.vol[:, body & ~cortex] = marrow[:, None]
    cv.vol[:, cortex] = np.where(disc_z, np.float32(90.0), np.float32(an.hu_bone))[:, None]
    post = (arch | spinous | transverse) & ~canal
    cv.vol[:, post] = np.where(disc_z, np.float32(an.hu_muscle), np.float32(an.hu_bone * 0.8))[:, None]
    cv.vol[:, canal] = 25.0
    # sternum
    sy = an.cavity_cy - an.cavity_b - 5 * s
    stern = ((X2 / (14 * s)) ** 2 + ((Y2 - sy) / (6 * s)) ** 2) <= 1
    zmask = (cv.zs > an.dome_right_z + 5) & (cv.zs < an.apex_z - 25 * s)
    sub = cv.vol[zmask]
    sub[:, stern] = an.hu_marrow + 80
    cv.vol[zmask] = sub


def _paint_mediastinum(cv: _Canvas, spec: PhantomSpec) -> None:
    """Heart chambers, great vessels, airways and lymph nodes (arteries come later)."""
    an = spec.anatomy
    s = an.scale
    hx, hy, hz = an.heart_c
    th = an.heart_theta
    u = np.array([math.cos(th), -math.sin(th)])
    v = np.array([math.sin(th), math.cos(th)])  # towards left-posterior
    sep = 8.0 * s
    lv_c = np.array([hx, hy]) + v * (an.lv_diameter / 2 + sep / 2) - u * 4 * s
    rv_c = np.array([hx, hy]) - v * (an.rv_diameter / 2 + sep / 2) + u * 2 * s
    ra_c = np.array([hx, hy]) - u * 42 * s - v * 24 * s
    la_c = np.array([hx, hy]) - u * 34 * s + v * 30 * s
    lv_len, rv_len, zr = 42 * s, 40 * s, 34 * s
    chambers = [
        # centre (x, y, z), semi (u, v, z), wall, blood HU
        ((la_c[0], la_c[1], hz + 26 * s), (24 * s, 19 * s, 22 * s), 2.5 * s, an.hu_left_blood),
        ((ra_c[0], ra_c[1], hz + 14 * s), (24 * s, 21 * s, 26 * s), 2.5 * s, an.hu_right_blood),
        ((lv_c[0], lv_c[1], hz), (lv_len, an.lv_diameter / 2, zr), 10 * s, an.hu_left_blood),
        ((rv_c[0], rv_c[1], hz + 2 * s), (rv_len, an.rv_diameter / 2, zr * 0.95), 4 * s, an.hu_right_blood),
    ]
    for c, semi, wall, _ in chambers:  # epicardial fat
        cv.paint_ellipsoid(c, (semi[0] + wall + 5 * s, semi[1] + wall + 5 * s, semi[2] + wall + 4 * s), th, an.hu_fat)
    for c, semi, wall, _ in chambers:  # myocardium
        cv.paint_ellipsoid(c, (semi[0] + wall, semi[1] + wall, semi[2] + wall), th, an.hu_myocardium)
    for c, semi, _, hu in chambers:
        cv.paint_ellipsoid(c, semi, th, hu)

    top = an.apex_z + 80
    # mediastinal fat band around the central structures
    zs, ys, xs = cv.zs, cv.ys, cv.xs
    Y2, X2 = np.meshgrid(ys, xs, indexing="ij")
    front = an.cavity_cy - an.cavity_b
    med = (np.abs(X2 - 5 * s) / _mediastinum_f(an, Y2)).astype(np.float32)
    med[(Y2 <= front + 2) | (Y2 >= an.spine_y)] = np.inf
    wz = _mediastinum_w(an, zs).astype(np.float32) - 2
    dome = _dome_z(an, X2, Y2).astype(np.float32)
    fat = np.float32(an.hu_fat + 15)
    for k in range(len(zs)):
        sl = cv.vol[k]
        band = (med < wz[k]) & (dome < zs[k]) & (sl < -300)
        sl[band] = fat

    def tube(p0: tuple[float, float, float], p1: tuple[float, float, float], r: float, hu: float) -> None:
        seg = VesselSegment(p0, p1, r, r, "central", 0)
        cv.paint_capsule(seg, an.hu_fat + 10, extra_r=4 * s, only_below=-300)  # mediastinal fat around it
        cv.paint_capsule(seg, hu)

    # esophagus: collapsed, a little air
    ex, ey = 8 * s, an.spine_y - an.spine_r - 9 * s
    tube((ex, ey, an.dome_left_z - 20), (ex - 6 * s, ey, top), 7 * s, an.hu_muscle - 10)
    tube((ex, ey, an.dome_left_z - 20), (ex - 6 * s, ey, top), 2 * s, -900)
    # aorta: ascending, arch, descending
    ra = 13.5 * s
    asc0 = (hx - 22 * s, hy + 12 * s, hz + 20 * s)
    asc1 = (-12 * s, -18 * s, 32 * s)
    arch1 = (2 * s, 2 * s, 48 * s)
    arch2 = (30 * s, 42 * s, 38 * s)
    desc0 = (26 * s, an.spine_y - an.spine_r - 2 * s, 25 * s)
    desc1 = (18 * s, an.spine_y - an.spine_r - 4 * s, an.dome_left_z - 60 * s)
    for a, b in ((asc0, asc1), (asc1, arch1), (arch1, arch2), (arch2, desc0), (desc0, desc1)):
        tube(a, b, ra, an.hu_left_blood)
    # supra-aortic arteries and brachiocephalic veins / SVC
    for a, b in (
        ((-2 * s, 0.0, 48 * s), (-22 * s, -10 * s, top)),
        ((10 * s, 10 * s, 48 * s), (14 * s, 0.0, top)),
        ((24 * s, 30 * s, 44 * s), (36 * s, 20 * s, top)),
    ):
        tube(a, b, 5.5 * s, an.hu_left_blood)
    svc_top = (-34 * s, -18 * s, 55 * s)
    tube((ra_c[0], ra_c[1], hz + 30 * s), svc_top, 10 * s, an.hu_svc)
    tube(svc_top, (-40 * s, -22 * s, top), 8 * s, an.hu_svc)
    tube(svc_top, (30 * s, -34 * s, top), 6.5 * s, an.hu_svc * 0.8)
    # airways: walls then lumen
    for airway in spec.bronchi:
        cv.paint_capsule(airway, an.hu_muscle - 30, extra_r=1.8 * s)
    for airway in spec.bronchi:
        cv.paint_capsule(airway, -990.0)
    # lymph nodes
    for x, y, z, r in spec.nodes:
        cv.paint_ellipsoid((x, y, z), (r, r * 0.8, r), 0.0, an.hu_muscle - 10)


def _paint_arteries(cv: _Canvas, spec: PhantomSpec, keep_mask: bool) -> np.ndarray | None:
    """Contrast-filled pulmonary arteries (trunk to subsegmental); returns the lumen mask if asked."""
    an = spec.anatomy
    mask = np.zeros(spec.shape, dtype=bool) if keep_mask else None
    for seg in spec.arteries:
        res = cv.capsule(seg.p0, seg.p1, seg.r0, seg.r1)
        if res is None:
            continue
        sl, cov, t, _ = res
        hu: np.ndarray | np.float32 = np.float32(an.hu_right_blood)
        if spec.flow_artifact and seg.order == 2 and seg.p1[2] < seg.p0[2]:
            # mixing of unopacified IVC blood: lower-lobe arteries less dense, never down to clot HU
            hu = np.float32(40) + np.float32(an.hu_right_blood - 40) * (np.float32(0.72) + np.float32(0.28) * (1 - t))
        elif spec.trunk_mixing and seg.order == 0:
            # unopacified blood layering in the proximal trunk: a smooth, partial drop, never to clot HU
            drop = np.float32(0.35) * np.clip(np.float32(1.0) - t / np.float32(0.6), 0.0, 1.0)
            hu = np.float32(max(an.hu_right_blood * 0.65, 150.0)) + np.float32(an.hu_right_blood - max(an.hu_right_blood * 0.65, 150.0)) * (1 - drop / np.float32(0.35))
        sub = cv.vol[sl]
        sub += (hu - sub) * cov
        if mask is not None:
            mask[sl] |= cov >= 0.5
    return mask


def _paint_emboli(
    cv: _Canvas, spec: PhantomSpec
) -> tuple[np.ndarray, list[tuple[tuple[slice, slice, slice], np.ndarray | None]]]:
    """Blend each embolus into its artery.

    Returns the uint8 embolus index volume (1 + index; 0 none) and, per
    embolus, its box and the mask of the voxels it owns (None if off-grid).
    """
    index = np.zeros(spec.shape, dtype=np.uint8)
    empty = (slice(0, 0), slice(0, 0), slice(0, 0))
    boxes: list[tuple[tuple[slice, slice, slice], np.ndarray | None]] = [(empty, None) for _ in spec.emboli]
    for k, e in enumerate(spec.emboli):
        seg = spec.arteries[e.segment]
        a = seg.point(e.t0)
        b = seg.point(e.t1)
        ra, rb = seg.radius(e.t0), seg.radius(e.t1)
        vessel = cv.capsule(a, b, ra, rb)
        if vessel is None:
            continue
        sl, vcov, vt, vdist = vessel
        # restrict to the cylinder between t0 and t1 (soft, so the ends are rounded by the clot)
        if e.shape in ("central", "occlusive"):
            dcap = cv.capsule(a, b, ra * e.radius_fraction, rb * e.radius_fraction, pad=1.5 + max(ra, rb) / cv.h)
            if dcap is None:
                continue
            _, dcov, _, _ = dcap
        elif e.shape == "eccentric":
            off = np.asarray(e.direction) * (0.5 * (ra + rb)) * (1.0 - 0.55 * e.radius_fraction)
            dcap = cv.capsule(a + off, b + off, ra * e.radius_fraction, rb * e.radius_fraction, pad=1.5 + max(ra, rb) / cv.h)
            if dcap is None:
                continue
            _, dcov, _, _ = dcap
        else:  # web: a thin band through the axis, across the lumen
            Z, Y, X = cv.grids(sl)
            n = np.asarray(e.direction, dtype=np.float32)
            sdist = np.abs((X - a[0]) * n[0] + (Y - a[1]) * n[1] + (Z - a[2]) * n[2])
            w = max(0.5 * e.radius_fraction * (ra + rb), 0.6)
            dcov = np.clip((w - sdist) / np.float32(cv.h) + 0.5, 0.0, 1.0)
        if dcov.shape != vcov.shape:
            dcov = _align(dcov, dcap[0] if e.shape != "web" else sl, sl)  # type: ignore[index]
        cov = np.minimum(dcov, vcov)
        sub = cv.vol[sl]
        sub += (np.float32(e.hu) - sub) * cov
        isub = index[sl]
        own = (cov >= 0.5) & (isub == 0)
        isub[own] = k + 1
        boxes[k] = (sl, own)
    return index, boxes


def _align(arr: np.ndarray, src: tuple[slice, slice, slice], dst: tuple[slice, slice, slice]) -> np.ndarray:
    """Crop/pad ``arr`` (defined on box ``src``) onto box ``dst`` (zeros outside ``src``)."""
    out = np.zeros(tuple(d.stop - d.start for d in dst), dtype=arr.dtype)
    inter = []
    for s_, d_ in zip(src, dst):
        lo, hi = max(s_.start, d_.start), min(s_.stop, d_.stop)
        if hi <= lo:
            return out
        inter.append((lo, hi))
    o = tuple(slice(lo - d_.start, hi - d_.start) for (lo, hi), d_ in zip(inter, dst))
    i = tuple(slice(lo - s_.start, hi - s_.start) for (lo, hi), s_ in zip(inter, src))
    out[o] = arr[i]
    return out


def _degrade(vol: np.ndarray, spec: PhantomSpec, rng: np.random.Generator) -> None:
    """Respiratory motion, scanner blur (in-plane PSF and slice profile) and correlated noise, in place."""
    if spec.motion_slices is not None:
        k0, k1 = spec.motion_slices
        shift = max(1, int(round(rng.uniform(4, 9) / spec.pixel_spacing)))
        for k in range(k0, k1 + 1):
            w = float(rng.uniform(0.3, 0.5))
            ghost = np.roll(vol[k], shift if k % 2 else -shift, axis=0)
            vol[k] = (1 - w) * vol[k] + w * ghost
        # misregistered slabs: sudden jumps along y
        for k in range(k0, k1 + 1, max(2, (k1 - k0) // 4)):
            vol[k : k + 2] = np.roll(vol[k : k + 2], int(rng.integers(-shift, shift + 1)), axis=1)
    sigma_px = spec.psf_sigma_mm / spec.pixel_spacing
    noise = rng.standard_normal(vol.shape, dtype=np.float32)
    corr_px = spec.noise_corr_mm / spec.pixel_spacing
    if corr_px > 0.3:  # noise texture: correlated in-plane, back to unit SD (a 2-D Gaussian divides it by 2 sqrt(pi) sigma)
        ndimage.gaussian_filter(noise, (0, corr_px, corr_px), output=noise, truncate=2.5)
        noise *= np.float32(2.0 * math.sqrt(math.pi) * corr_px)
    else:
        corr_px = 0.0
    noise_gain = 1.0
    if sigma_px > 0.3:  # keep the SD after the scanner blur below: white noise loses 2 sqrt(pi) sigma, correlated less
        noise_gain = math.sqrt(corr_px**2 + sigma_px**2) / corr_px if corr_px else 2.0 * math.sqrt(math.pi) * sigma_px
    noise *= np.float32(spec.noise_sd * noise_gain)
    vol += noise
    del noise
    if sigma_px > 0.3:
        ndimage.gaussian_filter1d(vol, sigma_px, axis=1, output=vol, truncate=3.0)
        ndimage.gaussian_filter1d(vol, sigma_px, axis=2, output=vol, truncate=3.0)
    extra = spec.slice_thickness**2 - spec.slice_spacing**2
    if extra > 0.04:
        sz = math.sqrt(extra) / 2.355 / spec.slice_spacing
        if sz > 0.25:
            ndimage.gaussian_filter1d(vol, sz, axis=0, output=vol, truncate=2.5)


def _labels_for(spec: PhantomSpec, emboli: Sequence[Embolus], positive: bool) -> StudyLabels:
    """Study labels from the rendered emboli, following the challenge's consistency rules."""
    if not positive:
        if spec.category == "indeterminate":
            return StudyLabels(indeterminate=1)
        return StudyLabels(negative_exam_for_pe=1)
    kinds = {e.kind for e in emboli}
    sides = {e.side for e in emboli}
    gte = spec.rv_lv_ratio >= 1.0
    return StudyLabels(
        chronic_pe=int(kinds == {"chronic"}),
        acute_and_chronic_pe=int(kinds == {"acute", "chronic"}),
        central_pe=int("central" in sides),
        leftsided_pe=int("left" in sides),
        rightsided_pe=int("right" in sides),
        rv_lv_ratio_gte_1=int(gte),
        rv_lv_ratio_lt_1=int(not gte),
    )


def render_phantom(spec: PhantomSpec, *, keep_masks: bool = False, keep_clean: bool = False) -> Phantom:
    """Paint the study described by ``spec``; labels follow the emboli that rendered.

    An embolus voxel is one at least half covered by the defect (and inside
    the lumen); an embolus with no such voxel (too small for the grid) is
    dropped and the labels are derived from the others (a study whose emboli
    all vanish becomes a negative exam). ``keep_masks`` keeps the embolus index
    and arterial lumen volumes; ``keep_clean`` the HU volume before motion,
    blur and noise.
    """
    rng = np.random.default_rng([spec.seed, 1])
    cv = _Canvas(spec)
    an = spec.anatomy
    _paint_body(cv, an)
    for seg in spec.veins:
        cv.paint_capsule(seg, an.hu_left_blood * 0.95)
    _paint_mediastinum(cv, spec)
    for seg in spec.arteries:
        if seg.order <= 1:
            cv.paint_capsule(seg, an.hu_fat + 10, extra_r=4 * an.scale, only_below=-300)
    artery_mask = _paint_arteries(cv, spec, keep_masks)
    _paint_spine(cv, an)
    index, boxes = _paint_emboli(cv, spec)

    nz = spec.shape[0]
    per_slice = np.zeros(nz, dtype=bool)
    kept: list[int] = []
    counts: list[int] = []
    slices: list[tuple[int, int]] = []
    for k, (sl, m) in enumerate(boxes):
        n = int(m.sum()) if m is not None else 0
        if n == 0 or m is None:
            continue
        zz = np.nonzero(m.any(axis=(1, 2)))[0] + sl[0].start
        per_slice[zz] = True
        kept.append(k)
        counts.append(n)
        slices.append((int(zz[0]), int(zz[-1])))
    if len(kept) != len(spec.emboli):
        remap = np.zeros(len(spec.emboli) + 1, dtype=np.uint8)
        for new, k in enumerate(kept):
            remap[k + 1] = new + 1
        index = remap[index]
    emboli = tuple(spec.emboli[k] for k in kept)
    labels = _labels_for(spec, emboli, bool(per_slice.any()))

    clean = cv.vol.copy() if keep_clean else None
    _degrade(cv.vol, spec, rng)
    np.rint(cv.vol, out=cv.vol)
    np.clip(cv.vol, -1024, 3071, out=cv.vol)
    volume = cv.vol.astype(np.int16)
    del cv
    return Phantom(
        spec=spec,
        volume_hu=volume,
        pe_present_on_image=per_slice,
        labels=labels,
        emboli=emboli,
        embolus_voxels=tuple(counts),
        embolus_slices=tuple(slices),
        embolus_index=index if keep_masks else None,
        artery_mask=artery_mask,
        clean_hu=clean,
    )


def generate_phantom(
    seed: int,
    *,
    size: Size = "small",
    slices: int | tuple[int, int] | None = None,
    category: Category | None = None,
    pe_type: PEType | None = None,
    keep_masks: bool = False,
    keep_clean: bool = False,
) -> Phantom:
    """Draw and render one study: ``render_phantom(sample_spec(seed, ...))``."""
    spec = sample_spec(seed, size=size, slices=slices, category=category, pe_type=pe_type)
    return render_phantom(spec, keep_masks=keep_masks, keep_clean=keep_clean)


__all__ = [
    "Anatomy",
    "Embolus",
    "Phantom",
    "PhantomSpec",
    "SLICE_LABEL",
    "STUDY_LABELS",
    "StudyLabels",
    "VesselSegment",
    "generate_phantom",
    "render_phantom",
    "sample_spec",
    "study_seed",
]
