"""Secondary Capture images for the radiologist (PS3.3 A.8.1, SC Image IOD): Grad-CAM overlays and a summary.

* **Grad-CAM overlay** (one per map in the result): the source slice that drove a
  positive finding, in the PE window (level 100, width 700 HU), with the
  Grad-CAM heat map blended over it, a marker at the Guided Grad-CAM peak, and the finding,
  probability, threshold and "NOT FOR DIAGNOSTIC USE" burned in above and below
  the image (never over the anatomy).
* **Summary**: a banner in the priority's colour with the headline finding, the
  findings table, and a coronal thumbnail of the series with the per-slab
  ("window") PE probability strip beside it, aligned in z.

RGB, 8 bits, BurnedInAnnotation YES, patient and study copied from the source
(:meth:`highdicom.sc.SCImage.from_ref_dataset`). Text uses Pillow's built-in
font (no download).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from pe_triage_node.export import identity
from pe_triage_node.export.findings import finding_lines, label_probability, label_text, main_finding, series_description
from pe_triage_node.inference.result import GradCamMap, StudyResult
from pe_triage_node.rules import Priority, PriorityDecision

PE_WINDOW = (-250.0, 450.0)  # MODEL.md: PE window, level 100 / width 700 HU
MIN_SIDE = 512  # small matrices are scaled up so burned-in text stays legible
PRIORITY_COLOURS: dict[Priority, tuple[int, int, int]] = {
    Priority.STAT: (200, 0, 0),
    Priority.URGENT: (225, 110, 0),
    Priority.ROUTINE: (0, 110, 40),
}
_WHITE = (255, 255, 255)
_GREY = (160, 160, 160)
_RED = (255, 70, 70)
_YELLOW = (255, 220, 0)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


# -- pixels -------------------------------------------------------------------


def hu_image(ds: Dataset) -> np.ndarray:
    """Stored values x RescaleSlope + RescaleIntercept (PS3.3 C.11.1.1.2), as float32."""
    arr = ds.pixel_array.astype(np.float32)
    return arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)


#: The HU image of one source slice, rows and columns as stored: :func:`hu_image` decodes
#: the dataset's pixel data; the worker passes :meth:`CTVolume.slice_hu` (already decoded).
SliceHU = Callable[[Dataset], np.ndarray]


def window_u8(hu: np.ndarray, bounds: tuple[float, float] = PE_WINDOW) -> np.ndarray:
    lo, hi = bounds
    return (np.clip((hu - lo) / (hi - lo), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """A jet-like colour map for values in [0, 1]: blue - cyan - yellow - red. Returns float RGB in [0, 255]."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    stops = np.array([0.0, 0.35, 0.65, 1.0])
    colours = np.array([[0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]], dtype=np.float32)
    out = np.empty(v.shape[:-1] + (3,), dtype=np.float32)
    for c in range(3):
        out[..., c] = np.interp(v[..., 0], stops, colours[:, c])
    return out


def _orientation(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    iop = [float(x) for x in getattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    return np.array(iop[:3]), np.array(iop[3:])


def _letter(vec: np.ndarray) -> str:
    """PS3.3 C.7.6.1.1.1 patient orientation letter of the main component of a direction (LPS)."""
    axis = int(np.argmax(np.abs(vec)))
    return (("R", "L"), ("A", "P"), ("F", "H"))[axis][int(vec[axis] > 0)]


def cam_on_slice(gc: GradCamMap, result: StudyResult, rows: int, cols: int, flipped_y: bool, flipped_x: bool) -> np.ndarray:
    """The Grad-CAM map of the peak slice resampled onto the stored source pixel grid (zeros outside the lung crop).

    The map covers the crop box ``result.crop`` of the 1 mm grid (the inverse of
    ``PreparedStudy.source_pixel``); uses the full map when present, else the
    48 x 48 summary kept in JSON.
    """
    if gc.cam is not None:
        m = np.asarray(gc.cam[gc.peak_slice_in_window], dtype=np.float32)
    elif gc.peak_slice_map is not None:
        m = np.asarray(gc.peak_slice_map, dtype=np.float32)
    else:
        return np.zeros((rows, cols), dtype=np.float32)
    crop = result.crop
    y0, y1 = crop["y"]
    x0, x1 = crop["x"]
    res_rows, res_cols = crop["resampled_shape"][1], crop["resampled_shape"][2]
    r = np.arange(rows, dtype=np.float32)
    c = np.arange(cols, dtype=np.float32)
    if flipped_y:  # canonical row of each stored row
        r = rows - 1 - r
    if flipped_x:
        c = cols - 1 - c
    ry = (r + 0.5) * res_rows / rows - 0.5
    rx = (c + 0.5) * res_cols / cols - 0.5
    v = (ry + 0.5 - y0) * m.shape[0] / max(y1 - y0, 1) - 0.5
    u = (rx + 0.5 - x0) * m.shape[1] / max(x1 - x0, 1) - 0.5
    vi = np.clip(np.rint(v), 0, m.shape[0] - 1).astype(int)
    ui = np.clip(np.rint(u), 0, m.shape[1] - 1).astype(int)
    out = m[np.ix_(vi, ui)]
    out[(v < -0.5) | (v > m.shape[0] - 0.5), :] = 0.0
    out[:, (u < -0.5) | (u > m.shape[1] - 0.5)] = 0.0
    peak = float(out.max())
    return out / peak if peak > 0 else out


def blend_heat(gray: np.ndarray, cam: np.ndarray, max_alpha: float = 0.55, floor: float = 0.2) -> np.ndarray:
    """RGB uint8: ``gray`` with the heat map over it where ``cam`` exceeds ``floor`` (opacity grows with it)."""
    base = np.repeat(gray[..., None].astype(np.float32), 3, axis=2)
    alpha = np.clip((cam - floor) / (1.0 - floor), 0.0, 1.0)[..., None] * max_alpha
    out = base * (1 - alpha) + heat_colours(cam) * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _scaled(img: Image.Image, min_side: int = MIN_SIDE) -> tuple[Image.Image, float]:
    scale = max(1.0, min_side / min(img.size))
    if scale == 1.0:
        return img, 1.0
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR), scale


# -- the images ---------------------------------------------------------------


def render_gradcam_overlay(
    result: StudyResult, gc: GradCamMap, source: Dataset, decision: PriorityDecision, hu_of: SliceHU = hu_image
) -> np.ndarray:
    """RGB (rows, cols, 3) uint8: one Grad-CAM overlay with its text bands."""
    row_cos, col_cos = _orientation(source)
    hu = hu_of(source)
    rows, cols = hu.shape
    cam = cam_on_slice(gc, result, rows, cols, flipped_y=bool(col_cos[1] < 0), flipped_x=bool(row_cos[0] < 0))
    img, scale = _scaled(Image.fromarray(blend_heat(window_u8(hu), cam), "RGB"))
    top, bottom = 86, 54
    canvas = Image.new("RGB", (max(img.width, 560), img.height + top + bottom), (0, 0, 0))
    x_off = (canvas.width - img.width) // 2
    canvas.paste(img, (x_off, top))
    draw = ImageDraw.Draw(canvas)
    # peak marker: an open circle, so the pixel itself stays visible
    px, py = x_off + (gc.peak_column + 0.5) * scale, top + (gc.peak_row + 0.5) * scale
    rad = max(10.0, 6 * scale)
    draw.ellipse((px - rad, py - rad, px + rad, py + rad), outline=_WHITE, width=2)
    big, small = _font(22), _font(15)
    names = ", ".join(label_text(name) for name in gc.labels)
    probs = []
    for name in gc.labels:
        p = label_probability(result, name)
        t = result.thresholds.get(name)
        if p is not None:
            probs.append(f"{label_text(name)} p={p:.2f}" + (f" (threshold {t:g})" if t is not None else ""))
    draw.text((10, 6), f"Grad-CAM: {names}", fill=_YELLOW, font=big)
    draw.text((10, 36), "; ".join(probs)[:110], fill=_WHITE, font=small)
    where = f"slice {gc.source_slice_index + 1}/{result.geometry.get('source_slices', '?')}"
    if gc.instance_number is not None:
        where += f" (instance {gc.instance_number})"
    draw.text((10, 58), f"{where}, slab {gc.window + 1}; PE window W700 L100; priority {decision.priority.value}", fill=_GREY, font=small)
    _disclaimer_band(draw, canvas, result, canvas.height - bottom)
    return np.asarray(canvas, dtype=np.uint8)


def _disclaimer_band(draw: ImageDraw.ImageDraw, canvas: Image.Image, result: StudyResult, y: int) -> None:
    draw.text((10, y + 6), identity.NOT_FOR_DIAGNOSTIC_USE + " - AI triage, unverified", fill=_RED, font=_font(18))
    text = f"{result.model_name} {result.model_version}"
    if result.meaningless:
        text = identity.MEANINGLESS_TEXT
    draw.text((10, y + 30), text[:100], fill=_RED if result.meaningless else _GREY, font=_font(14))


@dataclass(frozen=True)
class CoronalSlab:
    """A coronal slab through the middle of the analysed series, sorted along the slice normal.

    ``hu`` is (slices, cols): per slice, the mean HU of the rows within ``slab_mm``
    of the middle row (index 0 = lowest position). Only this slab is kept, not the
    whole volume (a 300-slice 512 x 512 series would be 300 MB as float32).
    """

    hu: np.ndarray
    slice_spacing_mm: float
    pixel_spacing_mm: tuple[float, float]
    flipped_x: bool

    @property
    def n_slices(self) -> int:
        return int(self.hu.shape[0])


def sort_along_normal(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Slices ordered by ImagePositionPatient projected on the slice normal (MODEL.md preprocessing 1)."""
    if not datasets:
        return []
    row_cos, col_cos = _orientation(datasets[0])
    normal = np.cross(row_cos, col_cos)
    return sorted(datasets, key=lambda ds: float(np.dot([float(v) for v in getattr(ds, "ImagePositionPatient", [0, 0, 0])], normal)))


def coronal_slab(datasets: Sequence[Dataset], slab_mm: float = 10.0, hu_of: SliceHU = hu_image) -> CoronalSlab:
    """The mid-chest coronal slab of the series (datasets with pixel data)."""
    ordered = sort_along_normal(datasets)
    row_cos, col_cos = _orientation(ordered[0])
    normal = np.cross(row_cos, col_cos)
    pos = [float(np.dot([float(v) for v in getattr(ds, "ImagePositionPatient", [0, 0, 0])], normal)) for ds in ordered]
    spacing = float(np.median(np.diff(pos))) if len(pos) > 1 else float(getattr(ordered[0], "SliceThickness", 1.0) or 1.0)
    ps = [float(v) for v in getattr(ordered[0], "PixelSpacing", [1.0, 1.0])]
    rows = int(ordered[0].Rows)
    half = max(1, round(slab_mm / 2 / ps[0]))
    lo, hi = max(0, rows // 2 - half), rows // 2 + half + 1
    hu = np.stack([hu_of(ds)[lo:hi].mean(axis=0) for ds in ordered])
    return CoronalSlab(hu, abs(spacing) or 1.0, (ps[0], ps[1]), bool(row_cos[0] < 0))


def coronal_thumbnail(slab: CoronalSlab) -> np.ndarray:
    """Coronal PE-window image, head up, patient's right on the viewer's left, physical aspect kept.
    uint8 (height, width)."""
    cor = slab.hu[:, ::-1] if slab.flipped_x else slab.hu
    cor = cor[::-1]  # highest position (head, for an axial feet-to-head normal) on top
    n, cols = cor.shape
    height_mm, width_mm = n * slab.slice_spacing_mm, cols * slab.pixel_spacing_mm[1]
    img = Image.fromarray(window_u8(np.ascontiguousarray(cor)))
    return np.asarray(img.resize((cols, max(1, round(cols * height_mm / width_mm))), Image.Resampling.BILINEAR))


def render_summary(result: StudyResult, decision: PriorityDecision, slab: CoronalSlab) -> np.ndarray:
    """RGB (768, 1024, 3) uint8: banner, findings table, coronal thumbnail with the per-slab strip."""
    W, H, banner = 1024, 768, 104
    canvas = Image.new("RGB", (W, H), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    colour = PRIORITY_COLOURS[decision.priority]
    draw.rectangle((0, 0, W, banner), fill=colour)
    draw.text((16, 8), f"AI PE TRIAGE: {decision.priority.value}", fill=_WHITE, font=_font(40))
    head = main_finding(result.labels).upper()
    if decision.flags:
        head += "   [" + ", ".join(f.upper() for f in decision.flags) + "]"
    draw.text((16, 58), head[:60], fill=_WHITE, font=_font(30))

    # left: coronal thumbnail + strip, fitted into a 470 x 560 box
    thumb = Image.fromarray(coronal_thumbnail(slab)).convert("RGB")
    box_w, box_h, x0, y0 = 420, 560, 16, banner + 48
    scale = min(box_w / thumb.width, box_h / thumb.height)
    thumb = thumb.resize((max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))), Image.Resampling.BILINEAR)
    canvas.paste(thumb, (x0, y0))
    draw.text((x0, y0 - 26), "Coronal (PE window), head up, R on left", fill=_GREY, font=_font(15))
    _attention_strip(draw, result, slab.n_slices, x0 + thumb.width + 6, y0, thumb.height)
    legend = _font(15)
    draw.text((x0, y0 + thumb.height + 8), "Strip: AI P(PE) per 10 mm slab, blue 0 - red 1", fill=_GREY, font=legend)
    draw.text((x0, y0 + thumb.height + 28), "White arrows: slabs shown as Grad-CAM images", fill=_GREY, font=legend)

    # right: findings table
    tx, ty = 560, banner + 20
    f_row, f_small = _font(21), _font(15)
    draw.text((tx, ty), "Finding", fill=_GREY, font=f_small)
    draw.text((tx + 250, ty), "AI", fill=_GREY, font=f_small)
    draw.text((tx + 310, ty), "p (threshold)", fill=_GREY, font=f_small)
    ty += 26
    for line in finding_lines(result):
        fill = _RED if line.present else _GREY
        draw.text((tx, ty), line.text, fill=_WHITE if line.present else _GREY, font=f_row)
        draw.text((tx + 250, ty), "YES" if line.present else "no", fill=fill, font=f_row)
        if line.probability is not None:
            t = f" ({line.threshold:g})" if line.threshold is not None else ""
            draw.text((tx + 310, ty), f"{line.probability:.2f}{t}", fill=_WHITE if line.present else _GREY, font=f_row)
        ty += 32
    ty += 10
    rule = decision.rule_name or "default priority"
    draw.text((tx, ty), f"Priority rule: {rule}"[:48], fill=_WHITE, font=f_small)
    ty += 22
    if result.consistency.get("changed"):
        draw.text((tx, ty), "Labels made consistent (RSNA rules)", fill=_GREY, font=f_small)
        ty += 22
    draw.text((tx, ty), f"Grad-CAM images: {len(result.gradcam)}", fill=_GREY, font=f_small)
    _disclaimer_band(draw, canvas, result, H - 56)
    return np.asarray(canvas, dtype=np.uint8)


def _attention_strip(draw: ImageDraw.ImageDraw, result: StudyResult, n_slices: int, x: int, y: int, height: int) -> None:
    """Per-slab PE probability (window head) as coloured cells beside the coronal image, head up."""
    width = 34
    draw.rectangle((x, y, x + width, y + height), outline=_GREY)
    cam_windows = {gc.window for gc in result.gradcam}
    for span, p in zip(result.windows, result.window_probabilities):
        a, b = span.source_slices
        top = y + height * (n_slices - 1 - b) / n_slices
        bottom = y + height * (n_slices - a) / n_slices
        rgb = tuple(int(v) for v in heat_colours(np.array([p]))[0])
        draw.rectangle((x + 1, top, x + width - 1, bottom), fill=rgb)
        if span.index in cam_windows:
            draw.polygon([(x + width + 2, (top + bottom) / 2), (x + width + 12, top), (x + width + 12, bottom)], fill=_WHITE)



# -- DICOM --------------------------------------------------------------------


def _sc(
    ref: Dataset,
    pixels: np.ndarray,
    *,
    result: StudyResult,
    decision: PriorityDecision,
    series_uid: str,
    sop_uid: str,
    instance_number: int,
    orientation: tuple[str, str],
    description: str,
    source: Dataset | None = None,
) -> hd.sc.SCImage:
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=identity.SC_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=identity.MANUFACTURER,
        patient_orientation=orientation,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series_description(decision, result.labels, " (images)"),
        manufacturer_model_name=result.model_name[:64],
        software_versions=f"{identity.SOFTWARE_VERSION} model {result.model_version}"[:64],
        device_serial_number=result.model_version[:64],
    )
    sc.BurnedInAnnotation = "YES"
    # General Series: the chest is an unpaired body part, so Laterality (Type 2C) stays absent.
    sc.BodyPartExamined = str(ref.get("BodyPartExamined") or "CHEST")[:16]
    sc.RecognizableVisualFeatures = "NO"
    sc.ImageComments = f"{identity.NOT_FOR_DIAGNOSTIC_USE}. {description}"[:10240]
    sc.DerivationDescription = description[:1024]
    if source is not None:
        item = Dataset()
        item.ReferencedSOPClassUID = source.SOPClassUID
        item.ReferencedSOPInstanceUID = source.SOPInstanceUID
        sc.SourceImageSequence = [item]
    return sc


def build_gradcam_sc(
    result: StudyResult,
    decision: PriorityDecision,
    gc: GradCamMap,
    index: int,
    source: Dataset,
    uids: identity.OutputUIDs,
    hu_of: SliceHU = hu_image,
) -> hd.sc.SCImage:
    """The ``index``-th Grad-CAM overlay as an SC instance (``source``: the slice; its HU from ``hu_of``)."""
    row_cos, col_cos = _orientation(source)
    pixels = render_gradcam_overlay(result, gc, source, decision, hu_of)
    return _sc(
        source,
        pixels,
        result=result,
        decision=decision,
        series_uid=uids.sc_series,
        sop_uid=uids.sc_gradcam(index),
        instance_number=2 + index,
        orientation=(_letter(row_cos), _letter(col_cos)),
        description=f"Grad-CAM heat map for {', '.join(gc.labels)} over the PE-window source slice",
        source=source,
    )


def build_summary_sc(
    result: StudyResult,
    decision: PriorityDecision,
    datasets: Sequence[Dataset],
    uids: identity.OutputUIDs,
    hu_of: SliceHU = hu_image,
) -> hd.sc.SCImage:
    """The one-glance summary as an SC instance (``datasets``: the series; their HU from ``hu_of``)."""
    pixels = render_summary(result, decision, coronal_slab(datasets, hu_of=hu_of))
    return _sc(
        datasets[0],
        pixels,
        result=result,
        decision=decision,
        series_uid=uids.sc_series,
        sop_uid=uids.sc_summary,
        instance_number=1,
        orientation=("L", "F"),
        description="AI PE triage summary: findings, priority, per-slab PE probability over a coronal thumbnail",
    )
