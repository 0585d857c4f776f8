"""Model weights: a JSON manifest naming sha256-checked files, the loader, the writer and the paper-checkpoint loader.

Manifest (``manifest.json``, format ``pe-triage-weights/1``)::

    {
      "format": "pe-triage-weights/1",
      "model_name": "pe-tcn-attention", "model_version": "2026.1",
      "intended_use": "Research triage of CTPA for PE. NOT FOR DIAGNOSTIC USE.",
      "architecture": {"phase1": "r3d_18", "phase2": "tcn_attention",
                       "phase2_spec": {"feature_dim": 512, "channels": 128, "levels": 2, "kernel_size": 3,
                                       "dropout": 0.2, "padding": "symmetric", "sequence_length": 40,
                                       "mlp_hidden": 128}},
      "input_size": 192, "window_slices": 10, "spacing_mm": 1.0,
      "padding_mode": "symmetric",
      "thresholds": {"pe_present_on_image": 0.15, ...},
      "files": [{"role": "phase1", "path": "phase1.safetensors", "format": "safetensors",
                 "sha256": "<64 hex>", "dtype": "float16"}, {"role": "phase2", ...}],
      "training": {...}, "metrics": {...}
    }

Files are safetensors, or torch pickles read with ``weights_only=True``; every
file's sha256 is checked before it is read, and every mismatch raises
:class:`~pe_triage_node.errors.WeightsError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pe_triage_node.errors import WeightsError
from pe_triage_node.inference.labels import STUDY_LABELS, TABLE2_THRESHOLDS, WINDOW_LABEL
from pe_triage_node.inference.networks import StudyModel, StudyModelSpec, WindowEncoder

log = logging.getLogger(__name__)

MANIFEST_FORMAT: Literal["pe-triage-weights/1"] = "pe-triage-weights/1"
DEFAULT_INTENDED_USE = (
    "Research triage of CT pulmonary angiograms for suspected pulmonary embolism. "
    "NOT FOR DIAGNOSTIC USE: not a medical device; every finding needs a radiologist's read."
)
RANDOM_MODEL_NAME = "RANDOM-WEIGHTS (MEANINGLESS OUTPUT, smoke tests only)"


class Thresholds(BaseModel):
    """Decision thresholds per label; defaults are MODEL.md Table 2."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pe_present_on_image: float = Field(TABLE2_THRESHOLDS[WINDOW_LABEL], gt=0, lt=1)
    negative_exam_for_pe: float = Field(TABLE2_THRESHOLDS["negative_exam_for_pe"], gt=0, lt=1)
    indeterminate: float = Field(TABLE2_THRESHOLDS["indeterminate"], gt=0, lt=1)
    chronic_pe: float = Field(TABLE2_THRESHOLDS["chronic_pe"], gt=0, lt=1)
    acute_and_chronic_pe: float = Field(TABLE2_THRESHOLDS["acute_and_chronic_pe"], gt=0, lt=1)
    central_pe: float = Field(TABLE2_THRESHOLDS["central_pe"], gt=0, lt=1)
    leftsided_pe: float = Field(TABLE2_THRESHOLDS["leftsided_pe"], gt=0, lt=1)
    rightsided_pe: float = Field(TABLE2_THRESHOLDS["rightsided_pe"], gt=0, lt=1)
    rv_lv_ratio_gte_1: float = Field(TABLE2_THRESHOLDS["rv_lv_ratio_gte_1"], gt=0, lt=1)
    rv_lv_ratio_lt_1: float = Field(TABLE2_THRESHOLDS["rv_lv_ratio_lt_1"], gt=0, lt=1)

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.model_dump().items()}


class WeightFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["phase1", "phase2"]
    path: str
    format: Literal["safetensors", "torch"] = "safetensors"
    sha256: str
    dtype: str | None = None

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", v.lower()):
            raise ValueError("sha256 must be 64 hex digits")
        return v.lower()

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        p = Path(v)
        if p.is_absolute() or ".." in p.parts:
            raise ValueError("path must be relative to the manifest, without '..'")
        return v


class Architecture(BaseModel):
    model_config = ConfigDict(extra="forbid")

    phase1: Literal["r3d_18"] = "r3d_18"
    phase2: Literal["tcn_attention"] = "tcn_attention"
    phase2_spec: dict[str, Any] = Field(default_factory=lambda: StudyModelSpec().to_dict())

    def spec(self) -> StudyModelSpec:
        try:
            return StudyModelSpec(**self.phase2_spec)
        except TypeError as exc:
            raise ValueError(f"phase2_spec: {exc}") from exc


class Manifest(BaseModel):
    """What a weights folder claims to be; validated once when loaded."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["pe-triage-weights/1"] = MANIFEST_FORMAT
    model_name: str
    model_version: str
    intended_use: str = DEFAULT_INTENDED_USE
    architecture: Architecture = Field(default_factory=Architecture)
    input_size: int = Field(192, ge=16, le=512)
    window_slices: Literal[10] = 10
    spacing_mm: float = 1.0
    padding_mode: Literal["symmetric", "causal"] = "symmetric"
    thresholds: Thresholds = Field(default_factory=Thresholds)
    files: list[WeightFile]
    training: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        roles = sorted(f.role for f in self.files)
        if roles != ["phase1", "phase2"]:
            raise ValueError(f"files must hold exactly one phase1 and one phase2 entry, got {roles}")
        spec = self.architecture.spec()
        if spec.padding != self.padding_mode:
            raise ValueError(f"padding_mode {self.padding_mode!r} differs from phase2_spec padding {spec.padding!r}")
        return self


@dataclass
class LoadedModel:
    """Both networks in eval mode plus the manifest they came from."""

    phase1: WindowEncoder
    phase2: StudyModel
    manifest: Manifest
    meaningless: bool = False  # random weights: output means nothing

    def to(self, device: torch.device) -> LoadedModel:
        self.phase1.to(device)
        self.phase2.to(device)
        return self


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_state(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    try:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path), device="cpu"))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt files raise many types
        raise WeightsError(f"{path.name}: cannot be read ({type(exc).__name__}: {exc})") from exc
    return _unwrap(obj, path)


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path.name}: not a state dict of tensors")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def _load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise WeightsError(
            f"{what}: wrong architecture ({len(missing)} missing keys, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise WeightsError(f"{what}: wrong architecture ({k}: shape {tuple(v.shape)}, expected {tuple(own[k].shape)})")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def read_manifest(path: Path) -> Manifest:
    """Parse and validate a manifest file (no weights read)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise WeightsError(f"weights manifest not found: {path}") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"weights manifest {path}: not readable JSON ({exc})") from exc
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise WeightsError(f"weights manifest {path}: {where}: {first['msg']}") from exc


def load_weights(manifest_path: Path) -> LoadedModel:
    """Load both networks from a manifest: sha256 of every file checked first, then strict key and shape checks.

    Weights saved in fp16 are cast to fp32; the models come back on the CPU in eval mode.
    """
    manifest_path = Path(manifest_path)
    manifest = read_manifest(manifest_path)
    spec = manifest.architecture.spec()
    phase1, phase2 = WindowEncoder(), StudyModel(spec)
    for entry in manifest.files:
        path = manifest_path.parent / entry.path
        if not path.is_file():
            raise WeightsError(f"weights file missing: {entry.path} (named in {manifest_path.name})")
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise WeightsError(f"sha256 mismatch for {entry.path}: file {digest[:12]}..., manifest {entry.sha256[:12]}...")
        state = _read_state(path, entry.format)
        _load_into(phase1 if entry.role == "phase1" else phase2, state, entry.role)
    log.info("loaded weights %s %s", manifest.model_name, manifest.model_version)
    return LoadedModel(phase1.eval(), phase2.eval(), manifest)


def save_weights(
    out_dir: Path,
    phase1: WindowEncoder,
    phase2: StudyModel,
    *,
    model_name: str,
    model_version: str,
    intended_use: str = DEFAULT_INTENDED_USE,
    thresholds: Thresholds | None = None,
    input_size: int = 192,
    dtype: Literal["float16", "float32"] = "float16",
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``phase1.safetensors``, ``phase2.safetensors`` and ``manifest.json`` into ``out_dir``; return the manifest path.

    ``dtype`` float16 halves the files; floating tensors are cast, integer
    buffers (BatchNorm's counters) kept. The phase-2 architecture and padding
    mode are taken from ``phase2.spec``.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = torch.float16 if dtype == "float16" else torch.float32
    files = []
    for role, module in (("phase1", phase1), ("phase2", phase2)):
        state = {k: (v.detach().to("cpu", target) if v.is_floating_point() else v.detach().cpu()).contiguous() for k, v in module.state_dict().items()}
        path = out_dir / f"{role}.safetensors"
        save_file(state, str(path), metadata={"role": role, "model_name": model_name, "model_version": model_version})
        files.append(WeightFile(role=role, path=path.name, sha256=sha256_file(path), dtype=dtype))  # type: ignore[arg-type]
    manifest = Manifest(
        model_name=model_name,
        model_version=model_version,
        intended_use=intended_use,
        architecture=Architecture(phase2_spec=phase2.spec.to_dict()),
        input_size=input_size,
        padding_mode=phase2.spec.padding,
        thresholds=thresholds or Thresholds(),
        files=files,
        training=training,
        metrics=metrics,
    )
    path = out_dir / "manifest.json"
    path.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


def _paper_phase2_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map old-style weight norm (``weight_g``/``weight_v``) onto torch's parametrization names."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.endswith(".weight_g"):
            k = k[: -len("weight_g")] + "parametrizations.weight.original0"
        elif k.endswith(".weight_v"):
            k = k[: -len("weight_v")] + "parametrizations.weight.original1"
        out[k] = v
    return out


def load_paper_checkpoints(
    phase1_path: Path,
    phase2_path: Path,
    *,
    padding: Literal["symmetric", "causal"] = "causal",
    spec: StudyModelSpec | None = None,
    sha256: dict[str, str] | None = None,
    model_version: str = "paper-checkpoint",
) -> LoadedModel:
    """Load paper-style checkpoints: separate torch files for phase 1 (r3d_18 state dict, 1-logit ``fc``)
    and phase 2 (TCN + heads; old ``weight_g``/``weight_v`` weight norm accepted).

    Read with ``weights_only=True``; ``{"state_dict": ...}`` wrappers and
    ``module.`` prefixes are unwrapped. Bai's TCN pads causally, hence the
    default. ``sha256`` ({"phase1": hex, "phase2": hex}) is checked when given.
    Convert to the node's format with :func:`save_weights`.
    """
    spec = spec or StudyModelSpec(padding=padding)
    phase1, phase2 = WindowEncoder(), StudyModel(spec)
    for role, path in (("phase1", Path(phase1_path)), ("phase2", Path(phase2_path))):
        if not path.is_file():
            raise WeightsError(f"checkpoint missing: {path}")
        if sha256 and role in sha256 and sha256_file(path) != sha256[role].lower():
            raise WeightsError(f"sha256 mismatch for {path.name}")
        state = _read_state(path, "torch")
        if role == "phase1":
            state = {k.removeprefix("net."): v for k, v in state.items()}
            _load_into(phase1, state, "phase1")
        else:
            _load_into(phase2, _paper_phase2_keys(state), "phase2")
    manifest = Manifest(
        model_name="ma2022-tcn-attention",
        model_version=model_version,
        padding_mode=spec.padding,
        architecture=Architecture(phase2_spec=spec.to_dict()),
        files=[
            WeightFile(role="phase1", path=Path(phase1_path).name, format="torch", sha256=sha256_file(Path(phase1_path))),
            WeightFile(role="phase2", path=Path(phase2_path).name, format="torch", sha256=sha256_file(Path(phase2_path))),
        ],
    )
    return LoadedModel(phase1.eval(), phase2.eval(), manifest)


def random_model(seed: int = 0, *, input_size: int = 192, padding: Literal["symmetric", "causal"] = "symmetric") -> LoadedModel:
    """Randomly initialised networks for smoke tests and benchmarks only: their output is MEANINGLESS."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        phase1, phase2 = WindowEncoder(), StudyModel(StudyModelSpec(padding=padding))
    finally:
        torch.random.set_rng_state(gen_state)
    manifest = Manifest.model_construct(
        format=MANIFEST_FORMAT,
        model_name=RANDOM_MODEL_NAME,
        model_version=f"random-seed-{seed}",
        intended_use="NONE: random weights, the output is meaningless",
        architecture=Architecture(phase2_spec=phase2.spec.to_dict()),
        input_size=input_size,
        window_slices=10,
        spacing_mm=1.0,
        padding_mode=padding,
        thresholds=Thresholds(),
        files=[],
        training=None,
        metrics=None,
    )
    return LoadedModel(phase1.eval(), phase2.eval(), manifest, meaningless=True)


def default_manifest_path(repo_root: Path | None = None) -> Path:
    """The shipped demo weights' manifest (or ``models/demo/manifest.json`` under ``repo_root``)."""
    if repo_root is not None:
        return repo_root / "models" / "demo" / "manifest.json"
    from pe_triage_node.resources import demo_manifest

    return demo_manifest()


__all__ = [
    "STUDY_LABELS",
    "LoadedModel",
    "Manifest",
    "Thresholds",
    "WeightFile",
    "default_manifest_path",
    "load_paper_checkpoints",
    "load_weights",
    "random_model",
    "read_manifest",
    "save_weights",
]
