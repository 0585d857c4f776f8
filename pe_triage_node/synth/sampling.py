"""Drawing a :class:`~pe_triage_node.synth.spec.PhantomSpec` from a seed: anatomy, vessel trees, emboli, mimics, scanner geometry.

Coordinates and conventions as in :mod:`pe_triage_node.synth.phantom`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Literal

import numpy as np

from pe_triage_node.synth.spec import (
    DEFAULT_MIX,
    ORDER_NAMES,
    SUBSEGMENTAL_ORDER,
    Anatomy,
    Category,
    Embolus,
    PEType,
    PhantomSpec,
    Side,
    Size,
    VesselSegment,
    inside_lung,
)

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
            if bool(inside_lung(an, p1[None, :], margin=0.5 * r + 1.0)[0]):
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
    targets = cand[inside_lung(an, cand, margin=4.0)][:n_seeds]
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
        if not bool(inside_lung(an, np.array(pts[1:]), margin=r).all()):
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

    ``size`` "small": 128² pixels, 64–96 slices of 2.5–4.5 mm (tests; more
    ``slices`` give thinner ones, down to 0.8 mm: CPU training); "full": 512², 200–400 slices of 0.6–1.5 mm spacing (thickness up
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
        # 2-5 mm for the default counts; thinner (down to 0.8 mm) when more slices are asked for (training sets)
        dz = float(np.clip(span / n, 0.8, 5.0))
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


