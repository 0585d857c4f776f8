"""The inference engine: one CT series in, one :class:`~.result.StudyResult` out.

Load once (:meth:`InferenceEngine.from_config`), then call :meth:`analyse` per
series. Stages: load (:mod:`.volume`) -> preprocess (:mod:`.preprocess`) ->
phase 1 (r3d_18, windows streamed in batches) -> phase 2 (TCN + attention) ->
consistency (:mod:`.consistency`) -> Grad-CAM (:mod:`.gradcam`).

Speed: ``torch.inference_mode()``; phase 1 with BatchNorm folded into the
convolutions; bf16 on CPUs with native bf16 (avx512_bf16 / AMX) as bf16 weights
and activations (faster than autocast, which re-casts per call), AMP autocast
(bf16, or fp16 where bf16 is missing) on CUDA;
phase 2 always fp32 (it is tiny); phase 1 in channels-last 3-D memory format
(about 10 % faster with oneDNN bf16 here; ``benchmarks/inference.py`` measures
both). The CUDA paths are written but were not
run on a GPU in this project's CI (none was available).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pe_triage_node.config import InferenceSection
from pe_triage_node.errors import WeightsError
from pe_triage_node.inference.consistency import correct
from pe_triage_node.inference.gradcam import guided_backprop, guided_encoder, guided_gradcam_peak, upsample_cam
from pe_triage_node.inference.labels import PE_SPECIFIC, STUDY_LABELS, WINDOW_LABEL
from pe_triage_node.inference.networks import WindowEncoder, fit_sequence, fold_batchnorm, unfit_sequence
from pe_triage_node.inference.preprocess import LungmaskBox, PreparedStudy, describe_box, find_lungmask_weights, prepare_study
from pe_triage_node.inference.result import GradCamMap, StudyResult, WindowSpan, summarise_map
from pe_triage_node.inference.volume import WINDOW_SLICES, CTVolume, load_ct_volume
from pe_triage_node.inference.contrast import require_contrast
from pe_triage_node.inference.weights import LoadedModel, default_manifest_path, load_weights, random_model

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (avx512_bf16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="ignore")
    except OSError:
        return False
    return torch.backends.mkldnn.is_available() and ("avx512_bf16" in flags or "amx_bf16" in flags)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise WeightsError("device 'cuda' requested but no CUDA device is available")
    return torch.device(device)


def resolve_precision(precision: Precision, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA with bf16 (else fp16), bf16 on CPUs with native bf16, else fp32; fp16 on a CPU -> fp32."""
    if precision == "fp16" and device.type == "cpu":
        log.warning("fp16 is not a CPU inference precision here; using fp32 (bf16 is the CPU's reduced precision)")
        return "fp32"
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


@contextmanager
def _autocast(device: torch.device, precision: str) -> Iterator[None]:
    if precision == "fp32":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


# A window is "inside the lungs" when its mean lung share is at least this share of the best window's.
MIN_LUNG_SHARE_OF_BEST = 0.4


def evidence_windows(prepared: PreparedStudy) -> np.ndarray:
    """Which windows may carry Grad-CAM evidence: those inside the lungs (all, when no lungs were found)."""
    share = prepared.window_lung_share()
    if share is None or share.max() <= 0:
        return np.ones(prepared.n_windows, dtype=bool)
    return share >= MIN_LUNG_SHARE_OF_BEST * share.max()


class InferenceEngine:
    """Load the model once; :meth:`analyse` one series at a time (not thread-safe)."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        device: str = "auto",
        precision: Precision = "auto",
        batch_size: int = 8,
        lung_crop: Literal["auto", "lungmask", "threshold"] = "auto",
        lungmask_weights: Path | None = None,
        gradcam_windows: int = 3,
        channels_last: bool = True,
        max_tilt_deg: float = 2.0,
        require_contrast: bool = False,
        guided_evidence: bool = True,
    ) -> None:
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = model.to(self.device)
        self.model.phase1.eval()
        self.model.phase2.eval()
        self.batch_size = batch_size
        self.gradcam_windows = gradcam_windows
        self.channels_last = channels_last
        self.max_tilt_deg = max_tilt_deg
        self.require_contrast = require_contrast
        self.guided_evidence = guided_evidence
        self._guided: WindowEncoder | None = None
        self.input_size = model.manifest.input_size
        # Phase 1 runs a copy with BatchNorm folded into the convolutions. On a CPU in bf16
        # its weights are cast to bf16 (no per-call autocast casts); on CUDA AMP autocast.
        self._encoder = fold_batchnorm(self.model.phase1)
        self._input_dtype = torch.float32
        if self.device.type == "cpu" and self.precision in ("bf16", "fp16"):
            self._input_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            self._encoder.to(self._input_dtype)
        if channels_last:
            self._encoder.to(memory_format=torch.channels_last_3d)
        self.lungmask: LungmaskBox | None = None
        weights = find_lungmask_weights(lungmask_weights) if lung_crop != "threshold" else None
        if lung_crop == "lungmask" and weights is None:
            raise WeightsError(
                "inference.lung_crop = 'lungmask' but no R231 weights were found "
                f"(inference.lungmask_weights = {lungmask_weights}); set the path or use 'threshold'"
            )
        if weights is not None:
            self.lungmask = LungmaskBox(weights, device=self.device)
        log.info(
            "inference engine ready: model %s %s on %s (%s), lung crop %s",
            model.manifest.model_name,
            model.manifest.model_version,
            self.device,
            self.precision,
            "lungmask" if self.lungmask else "threshold",
        )

    @property
    def window_encoder(self) -> torch.nn.Module:
        """The phase-1 network as run (BatchNorm folded, inference dtype and memory format)."""
        return self._encoder

    @property
    def input_dtype(self) -> torch.dtype:
        """dtype the windows are cast to before phase 1 (bf16 on CPUs with native bf16)."""
        return self._input_dtype

    @classmethod
    def from_config(
        cls,
        section: InferenceSection,
        *,
        weights_manifest: Path | None = None,
        device: str | None = None,
        random_weights: bool = False,
        repo_root: Path | None = None,
        require_contrast: bool | None = None,
    ) -> InferenceEngine:
        """Build from ``[inference]``: the manifest given here, else the configured one, else
        ``models/demo/manifest.json``; ``random_weights`` only for smoke tests (output meaningless)."""
        if random_weights:
            model = random_model(0)
        else:
            manifest = weights_manifest or (default_manifest_path(repo_root) if repo_root else section.manifest)
            if not Path(manifest).is_file():
                raise WeightsError(
                    f"no model weights: manifest {manifest} not found. Set inference.weights_manifest "
                    "(or --weights) to a trained model's manifest.json (the demo weights ship in models/demo/)."
                )
            model = load_weights(Path(manifest))
        return cls(
            model,
            device=device or section.device,
            precision=section.precision,
            batch_size=section.batch_size,
            lung_crop=section.lung_crop,
            lungmask_weights=section.lungmask_weights,
            require_contrast=section.require_contrast if require_contrast is None else require_contrast,
        )

    def warm_up(self, slices: int = 3 * WINDOW_SLICES, matrix: int = 512) -> float:
        """Run the whole pipeline once on a synthetic chest, so that the first study does not pay
        for the kernels' first use (about 0.3-0.4 s on a CPU). Returns the seconds it took."""
        t = time.perf_counter()
        yy, xx = np.mgrid[0:matrix, 0:matrix].astype(np.float32) / matrix - 0.5
        body = (xx / 0.42) ** 2 + (yy / 0.32) ** 2 < 1
        lungs = ((np.abs(xx) - 0.18) / 0.13) ** 2 + (yy / 0.2) ** 2 < 1
        image = np.where(body, np.where(lungs, -850.0, 40.0), -1000.0).astype(np.float32)
        hu = np.ascontiguousarray(np.broadcast_to(image, (slices, matrix, matrix)))
        volume = CTVolume(
            hu=hu,
            spacing=(1.0, 0.7, 0.7),
            origin=(0.0, 0.0, 0.0),
            orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
            sop_instance_uids=[f"2.25.{i + 1}" for i in range(slices)],
            instance_numbers=list(range(1, slices + 1)),
            positions_mm=[float(i) for i in range(slices)],
            series_instance_uid="2.25.0",
            study_instance_uid="2.25.0",
            contrast_bolus_agent="none: a synthetic warm-up chest",
        )
        self.analyse(volume)
        return time.perf_counter() - t

    # -- stages -----------------------------------------------------------
    def _phase1(self, prepared: PreparedStudy) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats, logits, cams = [], [], []
        n = prepared.n_windows
        amp = self.precision if self.device.type == "cuda" else "fp32"
        with torch.inference_mode(), _autocast(self.device, amp):
            for start in range(0, n, self.batch_size):
                x = prepared.window_batch(start, min(n, start + self.batch_size), channels_last=self.channels_last)
                logit, feat, cam = self._encoder(x.to(self._input_dtype))
                logits.append(logit.float())
                feats.append(feat.float())
                cams.append(cam.float())
        return torch.cat(logits), torch.cat(feats), torch.cat(cams)

    def _phase2(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = feats.shape[0]
        seq, mask = fit_sequence(feats, self.model.phase2.spec.sequence_length)
        with torch.inference_mode():
            wl, sl, att = self.model.phase2(seq[None], mask[None])
        window_probs = torch.sigmoid(unfit_sequence(wl[0], n))
        attention = unfit_sequence(att[0], n).clamp(min=0)
        attention = attention / attention.sum(dim=1, keepdim=True).clamp(min=1e-12)
        return window_probs, torch.sigmoid(sl[0]), attention

    def analyse(self, source: Path | str | CTVolume) -> StudyResult:
        """Analyse one series (a folder of its DICOM files, or an already loaded volume).

        Raises :class:`~pe_triage_node.errors.VolumeRejected` for series that are not a usable CT volume,
        and, with ``require_contrast``, for series that are not contrast-enhanced (:mod:`.contrast`).
        """
        timings: dict[str, float] = {}
        t_start = t = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal t
            now = time.perf_counter()
            timings[stage] = round(now - t, 4)
            t = now

        volume = source if isinstance(source, CTVolume) else load_ct_volume(Path(source), max_tilt_deg=self.max_tilt_deg)
        if self.require_contrast:
            require_contrast(volume, volume.contrast_bolus_agent)
        lap("load")
        prepared = prepare_study(volume, device=self.device, input_size=self.input_size, lungmask=self.lungmask)
        lap("preprocess")
        logits1, feats, cams = self._phase1(prepared)
        lap("phase1")
        window_probs, study_probs, attention = self._phase2(feats)
        lap("phase2")
        manifest = self.model.manifest
        thresholds = manifest.thresholds.as_dict()
        probs = {k: float(study_probs[i]) for i, k in enumerate(STUDY_LABELS)}
        wp = [float(v) for v in window_probs]
        consistent = correct(probs, wp, thresholds)
        lap("consistency")
        att = {k: [float(v) for v in attention[i]] for i, k in enumerate(STUDY_LABELS)}
        gradcam = self._gradcam(prepared, volume, cams, consistent.labels, att, wp)
        lap("gradcam")
        timings["total"] = round(time.perf_counter() - t_start, 4)

        n_src = volume.shape[0]
        windows = []
        for w in range(prepared.n_windows):
            z0 = w * WINDOW_SLICES
            z1 = min(z0 + WINDOW_SLICES, prepared.slices.shape[0])
            windows.append(WindowSpan(w, (z0 + prepared.box[0], z1 + prepared.box[0]), prepared.window_source_slices(w, n_src), WINDOW_SLICES - (z1 - z0)))
        return StudyResult(
            model_name=manifest.model_name,
            model_version=manifest.model_version,
            intended_use=manifest.intended_use,
            meaningless=self.model.meaningless,
            series_instance_uid=volume.series_instance_uid,
            study_instance_uid=volume.study_instance_uid,
            probabilities=probs,
            window_probabilities=wp,
            phase1_window_probabilities=[float(v) for v in torch.sigmoid(logits1)],
            labels=consistent.labels,
            window_labels=consistent.window_labels,
            consistency={
                "chosen": consistent.chosen,
                "loss_positive": consistent.loss_positive,
                "loss_negative": consistent.loss_negative,
                "changed": consistent.changed,
            },
            thresholds=thresholds,
            attention=att,
            gradcam=gradcam,
            windows=windows,
            lung_crop_method=prepared.lung_crop_method,
            crop=describe_box(prepared),
            geometry={
                "source_slices": n_src,
                "source_shape": list(volume.shape),
                "spacing_mm": [float(s) for s in volume.spacing],
                "slice_thickness_mm": volume.slice_thickness,
                "input_size": self.input_size,
            },
            device=str(self.device),
            precision=self.precision,
            timings_s=timings,
            source_sop_instance_uids=list(volume.sop_instance_uids),
        )

    def _saliency(self, prepared: PreparedStudy, windows: list[int]) -> torch.Tensor | None:
        """Guided backpropagation of the shown windows, one pass (Guided Grad-CAM's fine part); ``None`` when off."""
        if not self.guided_evidence or not windows:
            return None
        if self._guided is None:
            self._guided = guided_encoder(self._encoder)
        x = torch.cat([prepared.window_batch(w, w + 1) for w in windows]).to(self.device)
        return guided_backprop(self._guided, x)

    def _gradcam(
        self,
        prepared: PreparedStudy,
        volume: CTVolume,
        cams: torch.Tensor,
        labels: dict[str, bool],
        attention: dict[str, list[float]],
        window_probs: list[float],
    ) -> list[GradCamMap]:
        """Grad-CAM for the top window of each positive finding (at most ``gradcam_windows`` windows).

        Evidence a reader can check: the windows are chosen among those inside the lungs
        (:func:`evidence_windows`) and the marked peak is the strongest response inside the
        evidence region (lungs and the mediastinum between them, never the air around the patient).
        """
        eligible = evidence_windows(prepared)

        def top(values: list[float]) -> int:
            v = np.asarray(values, dtype=np.float64)
            return int(np.flatnonzero(eligible)[np.argmax(v[eligible])])

        chosen: dict[int, list[str]] = {}
        if labels.get(WINDOW_LABEL):
            chosen.setdefault(top(window_probs), []).append(WINDOW_LABEL)
        for k in PE_SPECIFIC:
            if labels.get(k):
                w = top(attention[k])
                if w in chosen or len(chosen) < self.gradcam_windows:
                    chosen.setdefault(w, []).append(k)
        out = []
        s = self.input_size
        n_src = volume.shape[0]
        shown = list(chosen.items())[: self.gradcam_windows]
        saliency = self._saliency(prepared, [w for w, _ in shown])
        for i, (w, names) in enumerate(shown):
            cam, peak = upsample_cam(cams[w], (WINDOW_SLICES, s, s))
            z, v, u = guided_gradcam_peak(cam, saliency[i] if saliency is not None else torch.ones_like(cam), prepared.window_region(w))
            src = prepared.source_slice(w, z, n_src)
            row, col = prepared.source_pixel(v, u)
            if volume.flipped_y:
                row = volume.shape[1] - 1 - row
            if volume.flipped_x:
                col = volume.shape[2] - 1 - col
            cam_np = cam.cpu().numpy()
            out.append(
                GradCamMap(
                    window=w,
                    labels=names,
                    peak_value=peak,
                    peak_slice_in_window=z,
                    source_slice_index=src,
                    sop_instance_uid=volume.sop_instance_uids[src] if volume.sop_instance_uids else "",
                    instance_number=volume.instance_numbers[src] if volume.instance_numbers else None,
                    peak_row=round(row, 2),
                    peak_column=round(col, 2),
                    window_source_slices=prepared.window_source_slices(w, n_src),
                    cam=cam_np.astype(np.float16),
                    peak_slice_map=summarise_map(cam_np, z),
                )
            )
        return out
