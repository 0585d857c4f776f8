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

import numpy as np
from scipy import ndimage

from pe_triage_node.synth.sampling import sample_spec, study_seed
from pe_triage_node.synth.spec import (
    SLICE_LABEL,
    STUDY_LABELS,
    Anatomy,
    Category,
    Embolus,
    PEType,
    Phantom,
    PhantomSpec,
    Size,
    StudyLabels,
    VesselSegment,
    dome_z,
    lung_taper,
    mediastinum_f,
    mediastinum_w,
)

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
    dome = dome_z(an, X2, Y2).astype(np.float32)
    right_side = X2 < 20 * s
    med_c = 5 * s
    # lung ellipses compared with the squared taper, mediastinum as |x - c| / f(y) against w(z)
    ell = np.minimum(
        ((X2 + an.lung_cx) / an.lung_a) ** 2 + ((Y2 - an.cavity_cy) / an.lung_b) ** 2,
        ((X2 - an.lung_cx) / an.lung_a) ** 2 + ((Y2 - an.cavity_cy) / an.lung_b) ** 2,
    )
    ell[~cavity] = np.inf
    med = (np.abs(X2 - med_c) / mediastinum_f(an, Y2)).astype(np.float32)
    g2 = (lung_taper(an, zs) ** 2).astype(np.float32)
    wz = mediastinum_w(an, zs).astype(np.float32)
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
    med = (np.abs(X2 - 5 * s) / mediastinum_f(an, Y2)).astype(np.float32)
    med[(Y2 <= front + 2) | (Y2 >= an.spine_y)] = np.inf
    wz = mediastinum_w(an, zs).astype(np.float32) - 2
    dome = dome_z(an, X2, Y2).astype(np.float32)
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

