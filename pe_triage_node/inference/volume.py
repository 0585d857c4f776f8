"""Load one CT series from a folder of DICOM files into a HU volume (PS3.3 C.7.6.2).

Slices are sorted by their position along the slice normal (ImagePositionPatient
projected on the cross product of the ImageOrientationPatient cosines), never by
InstanceNumber; the z spacing comes from those positions, never from
SliceThickness (overlapping reconstructions have spacing < thickness).
Anything that cannot become one regular axial CT volume raises
:class:`~pe_triage_node.errors.VolumeRejected` with a reason a person can read.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from pe_triage_node.errors import VolumeRejected

log = logging.getLogger(__name__)

WINDOW_SLICES = 10  # slices per phase-1 window (MODEL.md, preprocessing step 5)
CT_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"})
_ORIENTATION_TOL = 1e-3  # max difference between direction cosines of one series
MAX_MATRIX = 2048  # rows and columns: CT reconstructs 512² to 1024²; beyond is not a CT slice (memory bound)
_GAP_FACTOR = 1.5  # a step this many times the median step means missing slices


@dataclass
class CTVolume:
    """One CT series as a HU volume in canonical order.

    ``hu`` is float32 (z, y, x): z runs along the slice normal from the lowest
    position upwards (for an axial series, inferior to superior), y along the
    column direction (rows of the image), x along the row direction. ``spacing``
    is (z, y, x) in mm, z from the slice positions. Per-slice lists are in
    the same z order and map every slice back to the series as sent.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    orientation: tuple[float, ...]
    sop_instance_uids: list[str] = field(default_factory=list)
    instance_numbers: list[int | None] = field(default_factory=list)
    positions_mm: list[float] = field(default_factory=list)
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    slice_thickness: float | None = None
    contrast_bolus_agent: str = ""  # (0018,0010) of the first slice; empty when not sent
    flipped_y: bool = False  # image rows were reversed to make y run posterior
    flipped_x: bool = False  # image columns were reversed to make x run to the patient's left
    datasets: list[pydicom.Dataset] = field(default_factory=list, repr=False)  # headers in z order; only with keep_datasets

    @functools.cached_property
    def _z_of_sop(self) -> dict[str, int]:
        return {uid: z for z, uid in enumerate(self.sop_instance_uids)}

    def slice_hu(self, ds: pydicom.Dataset) -> np.ndarray:
        """The HU image of one of this series' slices, rows and columns as stored (a view of ``hu``)."""
        image = self.hu[self._z_of_sop[str(ds.SOPInstanceUID)]]
        if self.flipped_y:
            image = image[::-1, :]
        if self.flipped_x:
            image = image[:, ::-1]
        return image

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.hu.shape
        return int(z), int(y), int(x)


def slice_hu(ds: pydicom.Dataset) -> np.ndarray:
    """One slice's HU image (float32, rows and columns as stored), its encoded pixel data freed.

    Raises :class:`VolumeRejected` when the pixel data cannot be decoded.
    """
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # decoder errors come in many types
        raise VolumeRejected(f"pixel data cannot be decoded ({type(exc).__name__})") from exc
    del ds.PixelData  # free the encoded bytes as we go
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return pixels.astype(np.float32) * slope + intercept


@dataclass
class SliceHeader:
    """One slice's header as the volume checks it; with its HU image when decoded ahead
    (:func:`decode_slice`, :mod:`pe_triage_node.worker.prefetch`)."""

    path: Path
    dataset: pydicom.Dataset  # read once, pixel data decoded after sorting
    orientation: np.ndarray
    position: np.ndarray
    sop_uid: str
    instance_number: int | None
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    series_uid: str
    hu: np.ndarray | None = None  # decoded ahead (prefetched), else decoded after sorting


def _float_list(ds: pydicom.Dataset, keyword: str, n: int, what: str) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != n:
        raise VolumeRejected(f"{what} missing or malformed on instance {ds.get('InstanceNumber', '?')}")
    try:
        return np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise VolumeRejected(f"{what} not numeric on instance {ds.get('InstanceNumber', '?')}") from exc


def decode_slice(path: Path) -> SliceHeader:
    """One CT slice read, its header checked (:class:`VolumeRejected` as :func:`load_ct_volume` raises it)
    and its HU decoded, its encoded pixel data freed: a slice ready for the volume."""
    header = _header(path, pydicom.dcmread(path))
    header.hu = slice_hu(header.dataset)
    return header


def _read_header(path: Path, *, skip_unreadable: bool = True,
                 prefetched: Callable[[Path], SliceHeader | None] | None = None) -> SliceHeader | None:
    ready = prefetched(path) if prefetched is not None else None
    if ready is not None:
        return ready
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError):
        if not skip_unreadable:
            raise
        log.debug("skipping non-DICOM file %s", path.name)
        return None
    return _header(path, ds)


def _header(path: Path, ds: pydicom.Dataset) -> SliceHeader:
    modality = str(ds.get("Modality", ""))
    sop_class = str(ds.get("SOPClassUID", ""))
    if modality != "CT" or sop_class not in CT_SOP_CLASSES:
        raise VolumeRejected(f"not a CT image series (Modality {modality or 'absent'}, SOP class {sop_class or 'absent'})")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise VolumeRejected("multi-frame (enhanced) CT is not supported; send single-frame CT Image Storage")
    if "ImagePositionPatient" not in ds:
        raise VolumeRejected("ImagePositionPatient missing: slices cannot be ordered")
    if "ImageOrientationPatient" not in ds:
        raise VolumeRejected("ImageOrientationPatient missing: slices cannot be ordered")
    if "PixelSpacing" not in ds:
        raise VolumeRejected("PixelSpacing missing")
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if not (0 < rows <= MAX_MATRIX and 0 < columns <= MAX_MATRIX):
        raise VolumeRejected(f"matrix {rows} x {columns} outside 1..{MAX_MATRIX} (a CT slice is at most {MAX_MATRIX}²)")
    ps = _float_list(ds, "PixelSpacing", 2, "PixelSpacing")
    inst = ds.get("InstanceNumber")
    return SliceHeader(
        path=path,
        dataset=ds,
        orientation=_float_list(ds, "ImageOrientationPatient", 6, "ImageOrientationPatient"),
        position=_float_list(ds, "ImagePositionPatient", 3, "ImagePositionPatient"),
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        instance_number=int(inst) if inst not in (None, "") else None,
        rows=rows,
        columns=columns,
        pixel_spacing=(float(ps[0]), float(ps[1])),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
    )


def load_ct_volume(
    source: Path | Sequence[Path],
    *,
    max_tilt_deg: float = 2.0,
    min_slices: int = WINDOW_SLICES,
    keep_datasets: bool = False,
    prefetched: Callable[[Path], SliceHeader | None] | None = None,
) -> CTVolume:
    """Read one CT series: every DICOM file directly in the folder ``source``, or exactly the files listed.

    In a folder, files that are not DICOM are skipped; a listed file that cannot
    be read raises its ``OSError`` / ``InvalidDicomError`` (the caller's problem,
    not the series'). Raises :class:`VolumeRejected` for:
    no CT slices, non-CT data, mixed series or orientations, non-axial
    orientation, gantry tilt (slice positions not along the normal) beyond
    ``max_tilt_deg``, missing positions, duplicate positions, gaps
    (missing slices), differing matrix or pixel spacing, fewer slices than
    ``min_slices`` (one phase-1 window by default).
    ``keep_datasets``: keep the slices' headers (the datasets less their pixel
    data) in ``CTVolume.datasets``, for outputs rendered without reading the files again.
    ``prefetched``: the slices of listed files decoded ahead (path -> :func:`decode_slice`'s slice, or
    ``None`` when that file must be read); their headers were checked as the files' are. Each slice's
    HU is released as it is copied in: the volume's pages reuse the slices' (on a VM, pages the
    process never touched cost up to 2 ms a MiB), and the series is never held twice.
    """
    if isinstance(source, (str, Path)):
        dicom_dir = Path(source)
        if not dicom_dir.is_dir():
            raise VolumeRejected(f"not a folder: {dicom_dir}")
        headers = [h for p in sorted(dicom_dir.iterdir()) if p.is_file() and (h := _read_header(p)) is not None]
    else:
        headers = [h for p in source if (h := _read_header(Path(p), skip_unreadable=False, prefetched=prefetched)) is not None]
    if not headers:
        raise VolumeRejected("no DICOM CT slices in the folder")
    if len(headers) < min_slices:
        raise VolumeRejected(f"{len(headers)} slices, fewer than one window ({min_slices})")

    ref = headers[0]
    for h in headers[1:]:
        if np.max(np.abs(h.orientation - ref.orientation)) > _ORIENTATION_TOL:
            raise VolumeRejected("mixed image orientations within the series")
        if (h.rows, h.columns) != (ref.rows, ref.columns):
            raise VolumeRejected("slices of differing matrix size within the series")
        if max(abs(a - b) for a, b in zip(h.pixel_spacing, ref.pixel_spacing)) > 1e-3:
            raise VolumeRejected("slices of differing pixel spacing within the series")

    row_cos, col_cos = ref.orientation[:3], ref.orientation[3:]
    normal = np.cross(row_cos, col_cos)
    if np.linalg.norm(normal) < 0.99:
        raise VolumeRejected("ImageOrientationPatient cosines are not orthonormal")
    normal /= np.linalg.norm(normal)
    if normal[2] < 0:
        normal = -normal  # order slices feet to head whatever the cosines' handedness
    # Axial: normal within 30 degrees of the patient's head-feet axis.
    if abs(normal[2]) < math.cos(math.radians(30)):
        raise VolumeRejected("not an axial series (slice normal far from the head-feet axis)")

    dist = np.array([float(h.position @ normal) for h in headers])
    order = np.argsort(dist, kind="stable")
    headers = [headers[i] for i in order]
    dist = dist[order]
    steps = np.diff(dist)
    if np.any(steps < 1e-3):
        raise VolumeRejected("duplicate slice positions (several reconstructions or repeated slices in one series?)")
    median = float(np.median(steps))
    if float(steps.max()) > _GAP_FACTOR * median:
        raise VolumeRejected(f"gap in slice positions ({steps.max():.2f} mm vs typical {median:.2f} mm): missing slices")
    # Gantry tilt: the positions move along a direction that is not the normal.
    span = headers[-1].position - headers[0].position
    cos_tilt = float(abs(span @ normal) / max(np.linalg.norm(span), 1e-9))
    tilt = math.degrees(math.acos(min(1.0, cos_tilt)))
    if tilt > max_tilt_deg:
        raise VolumeRejected(f"gantry tilt {tilt:.1f} degrees beyond tolerance ({max_tilt_deg:.1f})")

    spacing_z = float((dist[-1] - dist[0]) / (len(dist) - 1))
    n, ny, nx = len(headers), ref.rows, ref.columns
    hu = np.empty((n, ny, nx), dtype=np.float32)
    thickness: float | None = None
    series_uid = study_uid = agent = ""
    for i, h in enumerate(headers):
        ds = h.dataset
        if i == 0:
            series_uid = h.series_uid
            study_uid = str(ds.get("StudyInstanceUID", ""))
            st = ds.get("SliceThickness")
            thickness = float(st) if st not in (None, "") else None
            agent = str(ds.get("ContrastBolusAgent", "") or "")
        elif h.series_uid != series_uid:
            raise VolumeRejected("files of more than one series in the folder")
        image = h.hu if h.hu is not None else slice_hu(ds)
        h.hu = None
        # Canonical in-plane directions: rows along +x (patient left), columns along +y (posterior);
        # flipped slice by slice as it is copied in (no second copy of the whole volume).
        if row_cos[0] < 0:
            image = image[:, ::-1]
        if col_cos[1] < 0:
            image = image[::-1, :]
        hu[i] = image
        del image
    return CTVolume(
        hu=hu,
        spacing=(spacing_z, ref.pixel_spacing[0], ref.pixel_spacing[1]),
        origin=tuple(float(v) for v in headers[0].position),  # type: ignore[arg-type]
        orientation=tuple(float(v) for v in ref.orientation),
        sop_instance_uids=[h.sop_uid for h in headers],
        instance_numbers=[h.instance_number for h in headers],
        positions_mm=[float(d) for d in dist],
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        slice_thickness=thickness,
        contrast_bolus_agent=agent,
        flipped_y=bool(col_cos[1] < 0),
        flipped_x=bool(row_cos[0] < 0),
        datasets=[h.dataset for h in headers] if keep_datasets else [],
    )
