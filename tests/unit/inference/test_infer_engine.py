"""The engine end to end on tiny series: result contents, JSON, determinism, bf16 vs fp32, Grad-CAM mapping, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from pe_triage_node.cli import main
from pe_triage_node.config import InferenceSection
from pe_triage_node.errors import VolumeRejected, WeightsError
from pe_triage_node.inference.consistency import violations
from pe_triage_node.inference.engine import InferenceEngine, cpu_has_native_bf16
from pe_triage_node.inference.labels import STUDY_LABELS
from pe_triage_node.inference.result import StudyResult
from pe_triage_node.inference.volume import load_ct_volume
from pe_triage_node.inference.weights import random_model, save_weights
from pe_triage_node.synth.ct_series import write_ct_series


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    return InferenceEngine(random_model(1, input_size=32), device="cpu", precision="fp32", batch_size=3, lung_crop="threshold")


@pytest.fixture(scope="module")
def result(engine: InferenceEngine, small_series: Path) -> StudyResult:
    return engine.analyse(small_series)


def test_result_contents(result: StudyResult, small_series: Path) -> None:
    assert result.meaningless and result.disclaimer == "NOT FOR DIAGNOSTIC USE"
    assert set(result.probabilities) == set(STUDY_LABELS)
    assert result.lung_crop_method == "threshold"
    n = len(result.windows)
    assert n == len(result.window_probabilities) == len(result.window_labels) == len(result.phase1_window_probabilities)
    assert all(abs(sum(a) - 1) < 1e-5 and len(a) == n for a in result.attention.values())
    assert violations(result.labels, result.window_labels) == []
    assert set(result.timings_s) >= {"load", "preprocess", "phase1", "phase2", "consistency", "gradcam", "total"}
    assert result.geometry["spacing_mm"] == [2.0, 2.0, 2.0] and result.precision == "fp32"
    # lungs span 8-52 mm of 60 mm: the crop keeps them and drops most of the rest
    z0, z1 = result.crop["z"]
    assert z0 <= 8 and z1 >= 52 and z1 - z0 <= 60
    vol = load_ct_volume(small_series)
    assert result.source_sop_instance_uids == vol.sop_instance_uids
    for m in result.gradcam:
        a, b = m.window_source_slices
        assert a <= m.source_slice_index <= b
        assert m.sop_instance_uid == vol.sop_instance_uids[m.source_slice_index]
        assert m.cam is not None and m.cam.shape == (10, 32, 32)


def test_json_round_trip_and_size(result: StudyResult) -> None:
    text = result.to_json()
    assert len(text) < 200_000
    back = StudyResult.from_json(result.to_json(maps="full"))
    assert back.probabilities == result.probabilities and back.labels == result.labels
    for a, b in zip(back.gradcam, result.gradcam):
        assert a.cam is not None and b.cam is not None and np.array_equal(a.cam, b.cam)
    assert json.loads(result.to_json(maps="none"))["gradcam"] == [
        {k: v for k, v in g.items() if k not in ("cam", "peak_slice_map")} for g in json.loads(text)["gradcam"]
    ]


def test_deterministic(engine: InferenceEngine, result: StudyResult, small_series: Path) -> None:
    again = engine.analyse(small_series)
    assert again.probabilities == result.probabilities
    assert again.window_probabilities == result.window_probabilities
    assert again.attention == result.attention


def test_warm_up_leaves_results_unchanged(engine: InferenceEngine, result: StudyResult, small_series: Path) -> None:
    """The worker's start-up pass over a synthetic chest: it runs the whole pipeline and changes nothing."""
    assert engine.warm_up(slices=12, matrix=96) > 0
    again = engine.analyse(small_series)
    assert again.probabilities == result.probabilities
    assert again.window_probabilities == result.window_probabilities


def test_bf16_agrees_with_fp32(small_series: Path, result: StudyResult) -> None:
    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (avx512_bf16/amx): auto precision stays fp32")
    bf16 = InferenceEngine(random_model(1, input_size=32), device="cpu", precision="auto", batch_size=3).analyse(small_series)
    assert bf16.precision == "bf16"
    for k, p in result.probabilities.items():
        assert abs(bf16.probabilities[k] - p) < 0.02
    assert np.max(np.abs(np.subtract(bf16.window_probabilities, result.window_probabilities))) < 0.02
    assert np.max(np.abs(np.subtract(bf16.phase1_window_probabilities, result.phase1_window_probabilities))) < 0.02


def test_rejections_propagate(engine: InferenceEngine, tmp_path: Path) -> None:
    with pytest.raises(VolumeRejected):
        engine.analyse(tmp_path)


def test_gradcam_maps_back_to_the_lesion_slices(tmp_path: Path) -> None:
    """One-window study with a planted lesion and the lesion-detector encoder: the peak lands on it in the source."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_infer_gradcam import lesion_detector

    hu = np.full((10, 64, 64), 40.0, dtype=np.float32)  # no lungs: whole field, 1 mm grid == source grid
    hu[2:9, 30:54, 6:30] = 300.0
    write_ct_series(hu[:, ::-1, :].copy(), tmp_path, pixel_spacing=(1.0, 1.0), extra={"ImageOrientationPatient": [1, 0, 0, 0, -1, 0]})
    model = random_model(0, input_size=64)
    model.phase1 = lesion_detector()
    with torch.no_grad():
        model.phase2.window_head.bias.fill_(10.0)  # every window positive
    result = InferenceEngine(model, device="cpu", precision="fp32", lung_crop="threshold").analyse(tmp_path)
    assert result.labels["pe_present_on_image"]
    m = result.gradcam[0]
    assert 2 <= m.source_slice_index <= 8
    # stored rows run anterior-to-posterior reversed: the peak comes back in the stored grid
    assert 64 - 54 <= m.peak_row < 64 - 30 and 6 <= m.peak_column < 30


def test_from_config_without_weights_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no model weights"):
        InferenceEngine.from_config(InferenceSection(), repo_root=tmp_path)
    with pytest.raises(WeightsError, match="lungmask"):
        InferenceEngine(random_model(0, input_size=32), device="cpu", lung_crop="lungmask", lungmask_weights=tmp_path / "none.pth")


def test_cli_infer(small_series: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no config/node.toml, no models/ here: the shipped demo weights are found anyway
    assert main(["infer", str(small_series), "--device", "cpu"]) == 0
    assert "NOT FOR DIAGNOSTIC USE" in capsys.readouterr().out
    assert main(["infer", str(small_series), "--weights", str(tmp_path / "none" / "manifest.json")]) == 2
    assert "no model weights" in capsys.readouterr().err
    m = random_model(2, input_size=32)
    manifest = save_weights(tmp_path / "w", m.phase1, m.phase2, model_name="cli-test", model_version="9", input_size=32)
    out = tmp_path / "out" / "result.json"
    assert main(["infer", str(small_series), "--weights", str(manifest), "--json", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "NOT FOR DIAGNOSTIC USE" in text and "cli-test 9" in text and "pe_present_on_image" in text
    assert StudyResult.from_json(out.read_text()).model_version == "9"
    outputs = tmp_path / "outputs"
    assert main(["infer", str(small_series), "--weights", str(manifest), "--device", "cpu", "--outputs", str(outputs)]) == 0
    assert "priority " in capsys.readouterr().out
    srs, scs = sorted(outputs.glob("SR_*.dcm")), sorted(outputs.glob("SC_*.dcm"))
    assert len(srs) == 1 and scs  # the SR and at least the summary SC
    sr = pydicom.dcmread(srs[0])
    assert sr.SeriesDescription.startswith("AI PE TRIAGE") and sr.VerificationFlag == "UNVERIFIED"
    # what the HL7 and FHIR destinations would be sent, named after the SR
    import hl7
    from fhir.resources.R4B.bundle import Bundle

    assert sorted(p.name for p in (outputs / "hl7").iterdir()) == [f"ORU_{sr.SOPInstanceUID}.hl7"]
    oru = hl7.parse((outputs / "hl7" / f"ORU_{sr.SOPInstanceUID}.hl7").read_bytes().decode("utf-8"))
    assert str(oru.segment("MSH")[9]) == "ORU^R01^ORU_R01" and str(oru.segment("OBR")[20]) == sr.StudyInstanceUID
    bundle = Bundle.model_validate_json((outputs / "fhir" / f"Bundle_{sr.SOPInstanceUID}.json").read_bytes())
    assert {e.resource.get_resource_type() for e in bundle.entry} == {"Device", "Observation", "DiagnosticReport", "Task"}
    assert main(["infer", str(tmp_path / "w"), "--weights", str(manifest)]) == 3
    assert "series rejected" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_random_weights_is_loud(tmp_path: Path, capsys: pytest.CaptureFixture[str], phantom) -> None:  # type: ignore[no-untyped-def]
    write_ct_series(phantom(nz=12, n=32, lung_z=(2, 10)), tmp_path / "s", pixel_spacing=(4.0, 4.0), slice_spacing=1.0)
    assert main(["infer", str(tmp_path / "s"), "--random-weights", "--device", "cpu", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert "MEANINGLESS" in captured.out and "MEANINGLESS" in captured.err


def test_more_than_40_windows_are_interpolated_to_40_and_back() -> None:
    from pe_triage_node.inference.volume import CTVolume

    n = 450  # 45 windows of 1 mm slices
    hu = np.full((n, 16, 16), 40.0, dtype=np.float32)
    vol = CTVolume(hu=hu, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), orientation=(1, 0, 0, 0, 1, 0),
                   sop_instance_uids=[f"1.2.{i}" for i in range(n)], instance_numbers=list(range(n)), positions_mm=[float(i) for i in range(n)])
    engine = InferenceEngine(random_model(0, input_size=16), device="cpu", precision="fp32", batch_size=16)
    result = engine.analyse(vol)
    assert len(result.windows) == len(result.window_probabilities) == 45
    assert all(len(a) == 45 and abs(sum(a) - 1) < 1e-5 for a in result.attention.values())
    assert result.windows[-1].source_slices == (440, 449)
    assert engine.precision == "fp32"
    assert InferenceEngine(random_model(0, input_size=16), device="cpu", precision="fp16").precision == "fp32"
