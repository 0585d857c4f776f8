"""The typed result of one analysed study and its JSON form."""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np

DISCLAIMER = "NOT FOR DIAGNOSTIC USE"
RESULT_FORMAT = "pe-triage-result/1"
_SUMMARY_SIZE = 48  # side of the peak-slice map kept in summary JSON

MapsMode = Literal["summary", "full", "none"]


@dataclass
class GradCamMap:
    """Grad-CAM of the phase-1 logit on r3d_18's last block for one window, upsampled to the window.

    ``cam`` is (10, S, S) in [0, 1] (float16), or ``None`` when read back from
    summary JSON; ``peak_slice_map`` is the peak slice at 48 x 48. The peak (slice,
    row, column) is Guided Grad-CAM's (:mod:`~pe_triage_node.inference.gradcam`), row and
    column in the source image's own pixel grid (as the DICOM stores it).
    """

    window: int
    labels: list[str]
    peak_value: float
    peak_slice_in_window: int
    source_slice_index: int  # in the series sorted along the slice normal, 0 = lowest position
    sop_instance_uid: str
    instance_number: int | None
    peak_row: float
    peak_column: float
    window_source_slices: tuple[int, int]
    cam: np.ndarray | None = None
    peak_slice_map: np.ndarray | None = None

    def to_dict(self, maps: MapsMode) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("cam", "peak_slice_map")}
        d["window_source_slices"] = list(self.window_source_slices)
        if maps == "full" and self.cam is not None:
            arr = np.ascontiguousarray(self.cam, dtype="<f2")
            d["cam"] = {"shape": list(arr.shape), "dtype": "float16", "base64": base64.b64encode(arr.tobytes()).decode("ascii")}
        if maps in ("summary", "full") and self.peak_slice_map is not None:
            d["peak_slice_map"] = np.round(self.peak_slice_map.astype(np.float64), 3).tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GradCamMap:
        cam = None
        if isinstance(d.get("cam"), dict):
            raw = base64.b64decode(d["cam"]["base64"])
            cam = np.frombuffer(raw, dtype="<f2").reshape(d["cam"]["shape"]).astype(np.float16)
        psm = np.asarray(d["peak_slice_map"], dtype=np.float32) if d.get("peak_slice_map") is not None else None
        kw = {k: v for k, v in d.items() if k not in ("cam", "peak_slice_map")}
        kw["window_source_slices"] = tuple(kw["window_source_slices"])
        return cls(**kw, cam=cam, peak_slice_map=psm)


@dataclass
class WindowSpan:
    """Where one 10-slice window lies: 1 mm grid slices and the source series slices it covers."""

    index: int
    resampled_slices: tuple[int, int]  # half-open, in the resampled (1 mm) grid
    source_slices: tuple[int, int]  # first and last source slice index (inclusive)
    padded_slices: int  # zero slices appended (last window only)


@dataclass
class StudyResult:
    """Everything the node knows about one analysed series. ``probabilities`` are raw model outputs;
    ``labels`` are the consistent findings (never contradictory); thresholds are those applied."""

    model_name: str
    model_version: str
    intended_use: str
    meaningless: bool  # True for random weights: the numbers mean nothing
    series_instance_uid: str
    study_instance_uid: str
    probabilities: dict[str, float]  # nine study labels
    window_probabilities: list[float]  # phase-2 window head, pe_present_on_image per window
    phase1_window_probabilities: list[float]
    labels: dict[str, bool]  # nine study labels + pe_present_on_image
    window_labels: list[bool]
    consistency: dict[str, Any]  # chosen set, losses, labels changed by the correction
    thresholds: dict[str, float]
    attention: dict[str, list[float]]  # per study label, over windows, sums to 1
    gradcam: list[GradCamMap]
    windows: list[WindowSpan]
    lung_crop_method: str
    crop: dict[str, Any]
    geometry: dict[str, Any]
    device: str
    precision: str
    timings_s: dict[str, float]
    # SOP Instance UIDs of the source slices in z order (index = source slice index used above)
    source_sop_instance_uids: list[str] = field(default_factory=list)
    disclaimer: str = DISCLAIMER
    format: str = RESULT_FORMAT

    @property
    def positive(self) -> bool:
        return bool(self.labels.get("pe_present_on_image", False))

    def to_dict(self, maps: MapsMode = "summary") -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "gradcam":
                d[f.name] = [g.to_dict(maps) for g in v]
            elif f.name == "windows":
                d[f.name] = [{**asdict(w), "resampled_slices": list(w.resampled_slices), "source_slices": list(w.source_slices)} for w in v]
            else:
                d[f.name] = v
        return d

    def to_json(self, maps: MapsMode = "summary", indent: int | None = None) -> str:
        """JSON text. ``maps``: "summary" keeps each Grad-CAM's peak slice at 48 x 48 (a few kB per map),
        "full" adds the (10, S, S) map as base64 float16, "none" only the peak locations."""
        return json.dumps(self.to_dict(maps), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyResult:
        kw = dict(d)
        if kw.get("format", RESULT_FORMAT) != RESULT_FORMAT:
            raise ValueError(f"unknown result format {kw.get('format')!r}")
        kw["gradcam"] = [GradCamMap.from_dict(g) for g in kw["gradcam"]]
        kw["windows"] = [
            WindowSpan(w["index"], tuple(w["resampled_slices"]), tuple(w["source_slices"]), w["padded_slices"])  # type: ignore[arg-type]
            for w in kw["windows"]
        ]
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str) -> StudyResult:
        return cls.from_dict(json.loads(text))


def summarise_map(cam: np.ndarray, peak_slice: int, size: int = _SUMMARY_SIZE) -> np.ndarray:
    """The peak slice of a (10, S, S) map, block-averaged down to ``size`` x ``size``."""
    import torch
    import torch.nn.functional as F

    sl = torch.from_numpy(np.asarray(cam[peak_slice], dtype=np.float32))[None, None]
    return F.adaptive_avg_pool2d(sl, size)[0, 0].numpy()


def findings_block(result: StudyResult) -> str:
    """The findings as one readable block of text (for the console)."""
    lines = [f"=== PE triage: {DISCLAIMER} ==="]
    if result.meaningless:
        lines.append("!!! RANDOM WEIGHTS: THESE NUMBERS ARE MEANINGLESS (smoke test / benchmark only) !!!")
    lines.append(f"model      {result.model_name} {result.model_version}")
    g = result.geometry
    lines.append(
        f"series     {g['source_slices']} slices, spacing {g['spacing_mm'][0]:.2f} x {g['spacing_mm'][1]:.2f} x {g['spacing_mm'][2]:.2f} mm; "
        f"{len(result.windows)} windows; lung crop: {result.lung_crop_method}"
    )
    from pe_triage_node.export.findings import finding_lines, main_finding  # the one wording of findings

    lines.append(f"study      {main_finding(result.labels)} (consistent label set: {result.consistency['chosen']})")
    for line in finding_lines(result):
        p = f"p={line.probability:.3f}" if line.probability is not None else "p=?"
        t = f" (t={line.threshold:.2f})" if line.threshold is not None else ""
        lines.append(f"  {line.text:<24} {'YES' if line.present else 'no '}  {p}{t}")
    if result.consistency.get("changed"):
        lines.append(f"corrected  {', '.join(result.consistency['changed'])} (consistency rules)")
    for m in result.gradcam:
        lines.append(
            f"grad-cam   window {m.window} ({', '.join(m.labels)}): strongest at source slice {m.source_slice_index}"
            f" (instance {m.instance_number}), row {m.peak_row:.0f} col {m.peak_column:.0f}"
        )
    lines.append("timings    " + ", ".join(f"{k} {v:.2f}s" for k, v in result.timings_s.items()))
    lines.append(f"device     {result.device} ({result.precision})")
    lines.append(f"=== {DISCLAIMER} ===")
    return "\n".join(lines)
