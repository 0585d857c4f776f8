"""The phantom's description: study labels, vessel segments, emboli, anatomy, the spec a seed draws and the rendered phantom.

See :mod:`pe_triage_node.synth.phantom` for the coordinate conventions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from pe_triage_node.inference.consistency import violations
from pe_triage_node.inference.labels import STUDY_LABELS, WINDOW_LABEL

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
        return violations({k: bool(v) for k, v in self.as_dict().items()}, [pe_positive])


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


# --------------------------------------------------------------------------- anatomy's shape
# (shared by the painter and the vessel-tree growth)


def lung_taper(an: Anatomy, z: np.ndarray) -> np.ndarray:
    """In-plane scale of the lungs at height z: 1 below the widest level, 0 at the apex."""
    u = np.clip((z - an.lung_widest_z) / (an.apex_z - an.lung_widest_z), 0.0, 1.0)
    return np.sqrt(np.clip(1.0 - u * u, 0.0, 1.0))


def dome_z(an: Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height of the diaphragm under (x, y): domes centred in each hemithorax."""
    right = x < 0
    top = np.where(right, an.dome_right_z, an.dome_left_z)
    cx = np.where(right, -an.lung_cx, an.lung_cx)
    rho2 = ((x - cx) / an.lung_a) ** 2 + ((y - an.cavity_cy + 10 * an.scale) / an.lung_b) ** 2
    return top - an.dome_depth * np.clip(rho2, 0.0, 1.6)


def mediastinum_w(an: Anatomy, z: np.ndarray) -> np.ndarray:
    """Height factor of the mediastinal half-width (mm): widest at the hila."""
    s = an.scale
    return s * (9 + 26 * np.exp(-(((z + 5 * s) / (40 * s)) ** 2)))


def mediastinum_f(an: Anatomy, y: np.ndarray) -> np.ndarray:
    """Antero-posterior factor of the mediastinal half-width: narrow behind the sternum."""
    front = an.cavity_cy - an.cavity_b
    return 0.3 + 0.7 * np.clip((y - front) / (50 * an.scale), 0.0, 1.0)


def mediastinum_halfwidth(an: Anatomy, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Half-width of the mediastinal band between the lungs (wider at the hila, narrow in front)."""
    return mediastinum_w(an, z) * mediastinum_f(an, y)


def inside_lung(an: Anatomy, p: np.ndarray, margin: float = 3.0) -> np.ndarray:
    """Whether points (N, 3) lie in lung parenchyma, ``margin`` mm from its edges (approximately)."""
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    g = np.maximum(lung_taper(an, z), 1e-3)
    side = np.where(x < 0, -1.0, 1.0)
    lung = ((x - side * an.lung_cx) / (an.lung_a * g - margin)) ** 2 + (
        (y - an.cavity_cy) / (an.lung_b * g - margin)
    ) ** 2 <= 1
    cav = (x / (an.cavity_a - margin)) ** 2 + ((y - an.cavity_cy) / (an.cavity_b - margin)) ** 2 <= 1
    med = np.abs(x - 5 * an.scale) < mediastinum_halfwidth(an, y, z) + margin
    above = z > dome_z(an, x, y) + margin
    below_apex = z < an.apex_z - margin
    # the heart sits in the left-anterior lower chest
    hx, hy, hz = an.heart_c
    heart = ((x - hx) / 70) ** 2 + ((y - hy) / 60) ** 2 + ((z - hz) / 62) ** 2 <= 1
    return lung & cav & ~med & above & below_apex & ~heart
