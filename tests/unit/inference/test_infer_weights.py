"""Weights: manifest writing and loading, sha256 and architecture checks, paper-style checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pe_triage_node.errors import WeightsError
from pe_triage_node.inference.labels import TABLE2_THRESHOLDS
from pe_triage_node.inference.networks import StudyModel, StudyModelSpec
from pe_triage_node.inference.weights import Thresholds, load_paper_checkpoints, load_weights, random_model, save_weights


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return random_model(3, input_size=32)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    return save_weights(
        tmp_path_factory.mktemp("w"), model.phase1, model.phase2, model_name="test-model", model_version="0.0.1", input_size=32, dtype="float32"
    )


def _outputs(m, seed: int = 0) -> tuple[torch.Tensor, ...]:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, 10, 32, 32, generator=g)
    f = torch.randn(1, 40, 512, generator=g)
    mask = torch.ones(1, 40, dtype=torch.bool)
    with torch.inference_mode():
        return (*m.phase1(x), *m.phase2(f, mask))


def test_thresholds_default_to_table_2() -> None:
    assert Thresholds().as_dict() == TABLE2_THRESHOLDS


def test_save_and_load_round_trip(model, saved: Path) -> None:  # type: ignore[no-untyped-def]
    manifest = json.loads(saved.read_text())
    assert manifest["format"] == "pe-triage-weights/1"
    assert manifest["padding_mode"] == "symmetric" and manifest["input_size"] == 32
    assert {f["role"] for f in manifest["files"]} == {"phase1", "phase2"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])
    loaded = load_weights(saved)
    assert loaded.manifest.model_version == "0.0.1" and not loaded.meaningless
    for a, b in zip(_outputs(model), _outputs(loaded)):
        assert torch.equal(a, b)


def test_fp16_files_load_close(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = save_weights(tmp_path, model.phase1, model.phase2, model_name="t", model_version="1", dtype="float16")
    assert (tmp_path / "phase1.safetensors").stat().st_size < 70e6  # 33 M parameters x 2 bytes
    loaded = load_weights(path)
    assert torch.sigmoid(_outputs(loaded)[0]).sub(torch.sigmoid(_outputs(model)[0])).abs().max() < 0.01


def test_sha256_mismatch(saved: Path, tmp_path: Path) -> None:
    data = json.loads(saved.read_text())
    data["files"][1]["sha256"] = "0" * 64
    bad = saved.parent / "tampered.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(WeightsError, match="sha256 mismatch for phase2.safetensors"):
        load_weights(bad)


def test_missing_file_and_bad_manifest(saved: Path, tmp_path: Path) -> None:
    data = json.loads(saved.read_text())
    data["files"][0]["path"] = "absent.safetensors"
    (tmp_path / "m.json").write_text(json.dumps(data))
    with pytest.raises(WeightsError, match="weights file missing"):
        load_weights(tmp_path / "m.json")
    data["files"][0]["path"] = "../escape.safetensors"
    (tmp_path / "m.json").write_text(json.dumps(data))
    with pytest.raises(WeightsError, match="relative"):
        load_weights(tmp_path / "m.json")
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not readable JSON"):
        load_weights(tmp_path / "m.json")
    with pytest.raises(WeightsError, match="not found"):
        load_weights(tmp_path / "absent.json")


def test_wrong_architecture(saved: Path) -> None:
    data = json.loads(saved.read_text())
    data["architecture"]["phase2_spec"]["channels"] = 64
    bad = saved.parent / "arch.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(WeightsError, match="wrong architecture"):
        load_weights(bad)


def test_paper_checkpoints(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # phase 1 as a DataParallel state dict in a wrapper; phase 2 with old-style weight norm names
    p1 = {"module." + k: v for k, v in model.phase1.state_dict().items()}
    torch.save({"state_dict": p1, "epoch": 7}, tmp_path / "phase1.pth")
    causal = StudyModel(StudyModelSpec(padding="causal"))
    old = {}
    for k, v in causal.state_dict().items():
        k = k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v")
        old[k] = v
    torch.save(old, tmp_path / "phase2.pth")
    loaded = load_paper_checkpoints(tmp_path / "phase1.pth", tmp_path / "phase2.pth")
    assert loaded.manifest.padding_mode == "causal"
    f = torch.randn(1, 40, 512)
    mask = torch.ones(1, 40, dtype=torch.bool)
    with torch.inference_mode():
        assert torch.equal(loaded.phase2(f, mask)[1], causal.eval()(f, mask)[1])
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        load_paper_checkpoints(tmp_path / "phase1.pth", tmp_path / "phase2.pth", sha256={"phase1": "0" * 64})
    with pytest.raises(WeightsError, match="wrong architecture"):
        load_paper_checkpoints(tmp_path / "phase2.pth", tmp_path / "phase2.pth")
