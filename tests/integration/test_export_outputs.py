"""SR and SC outputs of one StudyResult: IOD validity (dciodvfy), SR tree (dsrdump), content, derived UIDs."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pydicom
import pytest
from PIL import Image

from pe_triage_node.export import identity
from pe_triage_node.export.findings import main_finding, series_description
from pe_triage_node.export.outputs import OutputSource, render_outputs, standalone_triage, write_outputs
from pe_triage_node.export.sc import cam_on_slice
from pe_triage_node.inference.result import StudyResult
from pe_triage_node.inference.volume import CTVolume
from pe_triage_node.rules import Priority

from tests import export_support as es


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return es.write_series(tmp_path_factory.mktemp("export_series"))


@pytest.fixture(scope="module")
def result(series_dir: Path) -> StudyResult:
    return es.positive(es.analyse(series_dir))


@pytest.fixture(scope="module")
def volume(series_dir: Path) -> CTVolume:
    return es.load_volume(series_dir)


@pytest.fixture(scope="module")
def written(result: StudyResult, volume: CTVolume, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_outputs(OutputSource.of(result, volume, es.decision(Priority.STAT, "Central PE", ("review",))), tmp_path_factory.mktemp("out"))


def _scs(written: list[Path]) -> list[Path]:
    return [p for p in written if p.name.startswith("SC_")]


def test_outputs_are_one_sr_one_summary_a_gradcam_per_map_and_the_key_images(written: list[Path], result: StudyResult) -> None:
    kinds = [pydicom.dcmread(p).Modality for p in written]
    assert kinds[0] == "SR" and kinds[-1] == "KO"
    assert kinds.count("OT") == 1 + len(result.gradcam) == len(_scs(written))
    assert len(result.gradcam) >= 1


def test_every_object_passes_dciodvfy_without_errors(written: list[Path]) -> None:
    for path in written:
        assert es.dciodvfy_errors(path) == [], path.name


def test_sr_tree_prints_with_dsrdump_and_says_what_it_must(written: list[Path], result: StudyResult) -> None:
    text = es.dsrdump(written[0])
    for fragment in (
        "Comprehensive 3D SR",
        "Verification Flag   : UNVERIFIED",
        "Imaging Measurement Report",
        '(121007,DCM,"Device")',
        '"Device Observer Serial Number")="' + result.model_version,
        '(418272005,SCT,"CT angiography")',
        "Image Library",
        '"Pulmonary embolism")=(52101004,SCT,"Present")',
        '"Central pulmonary embolism")=(52101004,SCT,"Present")',
        '"Left-sided pulmonary embolism")=(272519000,SCT,"Absent")',
        '"RV/LV diameter ratio category")=(RVLV-GTE-1,99PETRIAGE',
        '"Pulmonary embolism chronicity")=(ACUTE,99PETRIAGE',
        '"AI triage priority")=(STAT,99PETRIAGE',
        '"Algorithm Version")="' + result.model_version,
        '"Algorithm Parameters")="threshold',
        '"Probability of central PE")=',
        '(1,UCUM,"no units")',
        "Not for diagnostic use statement",
    ):
        assert fragment in text, fragment


def test_sr_copies_patient_and_study_and_references_every_source_instance(written: list[Path], series_dir: Path) -> None:
    sr = pydicom.dcmread(written[0])
    assert str(sr.PatientName) == es.PATIENT_NAME and sr.PatientID == es.PATIENT_ID
    assert sr.StudyInstanceUID == es.IDENTITY.study_instance_uid
    assert sr.AccessionNumber == "ACC77"
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert sr.SeriesDescription == "AI PE TRIAGE: STAT - central PE, RV/LV>=1"
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    sources = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series_dir.glob("*.dcm")}
    assert evidence == sources
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99PETRIAGE"
    texts = [str(v) for v in _text_values(sr)]
    assert any(t.startswith("RANDOM WEIGHTS") and identity.NOT_FOR_DIAGNOSTIC_USE in t for t in texts)


def _text_values(ds: pydicom.Dataset) -> list[str]:
    out = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            out.append(item.TextValue)
        out.extend(_text_values(item))
    return out


def test_scs_are_rgb_with_burned_in_annotation_and_the_source_patient(written: list[Path], result: StudyResult) -> None:
    for path in _scs(written):
        sc = pydicom.dcmread(path)
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3 and sc.BitsAllocated == 8
        assert sc.BurnedInAnnotation == "YES"
        assert str(sc.PatientName) == es.PATIENT_NAME and sc.StudyInstanceUID == result.study_instance_uid
        assert sc.SeriesDescription.startswith("AI PE TRIAGE: STAT")
        assert min(sc.Rows, sc.Columns) >= 512  # legible text even on a tiny matrix
    overlays = [pydicom.dcmread(p) for p in _scs(written)[1:]]
    assert {o.SourceImageSequence[0].ReferencedSOPInstanceUID for o in overlays} == {g.sop_instance_uid for g in result.gradcam}


def test_gradcam_overlay_is_hot_where_the_marker_is(result: StudyResult, series_dir: Path) -> None:
    """The marker (Guided Grad-CAM's peak) lies in the heat map's hot part: at least half its maximum."""
    gc = result.gradcam[0]
    ds = next(d for d in (pydicom.dcmread(p) for p in series_dir.glob("*.dcm")) if d.SOPInstanceUID == gc.sop_instance_uid)
    cam = cam_on_slice(gc, result, ds.Rows, ds.Columns, flipped_y=False, flipped_x=False)
    r, c = int(round(gc.peak_row)), int(round(gc.peak_column))
    near = cam[max(0, r - 2) : r + 3, max(0, c - 2) : c + 3]  # the resampling onto the source grid moves it a little
    assert float(near.max()) >= 0.45
    assert cam.max() == pytest.approx(1.0)


def _uids(outputs: list[pydicom.Dataset]) -> set[str]:
    return {u for o in outputs for u in (o.SeriesInstanceUID, o.SOPInstanceUID)}


def test_uids_are_derived_equal_across_runs_and_differ_across_model_versions_and_generations(
    result: StudyResult, volume: CTVolume
) -> None:
    d = es.decision()
    first = render_outputs(OutputSource.of(result, volume, d))
    again = render_outputs(OutputSource.of(result, volume, d))
    uids = [(o.SeriesInstanceUID, o.SOPInstanceUID) for o in first]
    assert uids == [(o.SeriesInstanceUID, o.SOPInstanceUID) for o in again]
    assert len({u for _, u in uids}) == len(uids)  # all distinct
    other = render_outputs(OutputSource.of(dataclasses.replace(result, model_version="2.0.0"), volume, d))
    assert not _uids(first) & _uids(other)
    corrected = render_outputs(OutputSource.of(result, volume, d, generation=1))  # late instances re-opened the series
    assert not _uids(first) & _uids(corrected) and not _uids(other) & _uids(corrected)
    assert first[0].SOPInstanceUID == identity.OutputUIDs(result.series_instance_uid, result.model_version).sr_instance
    assert corrected[0].SOPInstanceUID == identity.OutputUIDs(
        result.series_instance_uid, result.model_version, generation=1).sr_instance
    for o in first + corrected:
        assert len(o.SOPInstanceUID) <= 64 and o.SOPInstanceUID.startswith(identity.OUTPUT_UID_PREFIX)


def test_a_corrected_sr_names_its_predecessor(result: StudyResult, volume: CTVolume, tmp_path: Path) -> None:
    before = identity.OutputUIDs(result.series_instance_uid, result.model_version)
    [sr, *_] = write_outputs(OutputSource.of(result, volume, es.decision(), generation=1, previous=before), tmp_path)
    ds = pydicom.dcmread(sr)
    [study] = ds.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == result.study_instance_uid
    [series] = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == before.sr_series
    [item] = series.ReferencedSOPSequence
    assert (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) == (ds.SOPClassUID, before.sr_instance)
    assert ds.SOPInstanceUID != before.sr_instance
    assert es.dciodvfy_errors(sr) == []
    assert "PredecessorDocumentsSequence" not in render_outputs(OutputSource.of(result, volume, es.decision()))[0]


def test_rewriting_replaces_the_same_files(result: StudyResult, volume: CTVolume, tmp_path: Path) -> None:
    a = write_outputs(OutputSource.of(result, volume, es.decision()), tmp_path)
    b = write_outputs(OutputSource.of(result, volume, es.decision()), tmp_path)
    assert a == b and sorted(tmp_path.iterdir()) == sorted(a)


def test_negative_result_reports_absent_and_routine(result: StudyResult, volume: CTVolume, tmp_path: Path) -> None:
    neg = es.negative(result)
    paths = write_outputs(OutputSource.of(neg, volume, es.decision(Priority.ROUTINE, None)), tmp_path)
    assert len(paths) == 2  # SR + summary, no Grad-CAM and so no key images
    sr = pydicom.dcmread(paths[0])
    assert sr.SeriesDescription == "AI PE TRIAGE: ROUTINE - no PE"
    text = es.dsrdump(paths[0])
    assert '"Pulmonary embolism")=(272519000,SCT,"Absent")' in text
    assert "Central pulmonary embolism" not in text
    assert '"AI triage priority")=(ROUTINE,99PETRIAGE[1],"ROUTINE")' in text  # meaning = the worklist word
    for p in paths:
        assert es.dciodvfy_errors(p) == []


def test_main_finding_and_series_description_wording() -> None:
    base = {"pe_present_on_image": True, "central_pe": False, "leftsided_pe": True, "rightsided_pe": True,
            "chronic_pe": False, "acute_and_chronic_pe": True, "rv_lv_ratio_gte_1": False}
    assert main_finding(base) == "acute-on-chronic bilateral PE"
    assert main_finding({"pe_present_on_image": False, "indeterminate": True}) == "indeterminate study"
    assert main_finding({"pe_present_on_image": True, "central_pe": True, "rv_lv_ratio_gte_1": True}) == "central PE, RV/LV>=1"
    long = series_description(es.decision(Priority.URGENT), base, " (images) with a long tail " * 3)
    assert len(long) == 64 and long.startswith("AI PE TRIAGE: URGENT - acute-on-chronic")


def test_summary_png_for_a_person(written: list[Path], tmp_path: Path) -> None:
    """Keeps one rendered summary and one overlay as PNG (under the test's tmp dir) for a look."""
    for i, p in enumerate(_scs(written)[:2]):
        Image.fromarray(pydicom.dcmread(p).pixel_array).save(tmp_path / f"sc{i}.png")
        assert (tmp_path / f"sc{i}.png").stat().st_size > 10_000


def test_derived_uid_rejects_a_bad_source_uid() -> None:
    with pytest.raises(ValueError):
        identity.derived_uid("1.2.03", "v1", identity.KIND_SR)
    with pytest.raises(ValueError):
        identity.derived_uid("1.2.3", "", identity.KIND_SR)


def test_standalone_outputs_use_the_shipped_rules(result: StudyResult, volume: CTVolume, tmp_path: Path) -> None:
    decision = standalone_triage(result, volume).decision
    assert decision.priority == Priority.STAT and decision.rule_name == "Central PE"  # shipped default rule 1
    paths = write_outputs(OutputSource.of(result, volume, decision), tmp_path, pngs=True)
    assert pydicom.dcmread(paths[0]).SeriesDescription == "AI PE TRIAGE: STAT - central PE, RV/LV>=1"
    assert (tmp_path / "summary.png").is_file() and (tmp_path / "gradcam-1.png").is_file()


def test_image_library_lists_every_source_instance_once(written: list[Path], series_dir: Path) -> None:
    sr = pydicom.dcmread(written[0])
    library = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Image Library")
    group = library.ContentSequence[0]
    refs = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in group.ContentSequence if i.ValueType == "IMAGE"]
    sources = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series_dir.glob("*.dcm")]
    assert sorted(refs) == sorted(sources) and len(set(refs)) == len(refs)
    shared = {i.ConceptNameCodeSequence[0].CodeMeaning for i in group.ContentSequence if i.ValueType != "IMAGE"}
    assert {"Modality", "Frame of Reference UID", "Pixel Data Rows", "Horizontal Pixel Spacing"} <= shared


def test_an_element_the_outputs_do_not_name_never_fails_them(result: StudyResult, tmp_path: Path) -> None:
    """A private element of the wrong length in every slice (Philips (01F1,1026) holding text in VR FD)."""
    from pydicom.errors import BytesLengthException

    series = es.write_series(tmp_path / "series")
    es.add_malformed_private_element(sorted(series.glob("*.dcm")))
    probe = pydicom.dcmread(next(series.glob("*.dcm")))
    with pytest.raises(BytesLengthException):
        list(probe)  # reading every element fails: what the outputs must never do
    paths = write_outputs(OutputSource.of(result, es.load_volume(series), es.decision()), tmp_path / "out")
    for path in paths:
        ds = pydicom.dcmread(path)
        assert es.MALFORMED_TAG not in ds and str(ds.PatientName) == es.PATIENT_NAME
        assert es.dciodvfy_errors(path) == [], path.name


def test_outputs_copy_only_the_attributes_they_name(result: StudyResult, tmp_path: Path) -> None:
    series = es.write_series(tmp_path / "series")
    for path in series.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.PatientComments = "not for the outputs"
        ds.add_new(0x00291010, "OB", b"\x00\x01")  # a private element without its creator
        ds.save_as(path, enforce_file_format=True)
    for ds in render_outputs(OutputSource.of(result, es.load_volume(series), es.decision())):
        assert "PatientComments" not in ds and 0x00291010 not in ds
        assert ds.PatientID == es.PATIENT_ID and ds.AccessionNumber == "ACC77"


def test_library_warnings_are_logged_without_the_patient_data_they_quote(
    result: StudyResult, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """highdicom warns 'The string "<PatientName>" is unlikely to represent the intended person name'."""
    import warnings

    from pe_triage_node.synth.ct_series import StudyIdentity, write_ct_series

    name = "Lung_Dx-A0001"  # no "^": highdicom's person-name check warns and quotes it
    ident = StudyIdentity(study_instance_uid=es.IDENTITY.study_instance_uid, patient_id="PID-778899",
                          patient_name=name, accession_number="ACC-445566", patient_birth_date="19471103")
    series = tmp_path / "series"
    write_ct_series(es.chest_volume(), series, pixel_spacing=(1.5, 1.5), slice_spacing=2.0, study=ident,
                    series_instance_uid=es.SERIES_UID)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        outputs = render_outputs(OutputSource.of(result, es.load_volume(series), es.decision()))
    assert str(outputs[0].PatientName) == name
    assert [str(w.message) for w in escaped] == [], "every warning is handled where it arises"
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "library UserWarning" in text, "the warning is still reported, without its text"
    for phi in (name, "PID-778899", "ACC-445566", "19471103"):
        assert phi not in text


def test_a_series_numbered_head_first_renders_the_same_descriptors(result: StudyResult, tmp_path: Path) -> None:
    """Instance 1 at the head (many scanners): the Image Library's shared descriptors come from another slice."""
    series = es.write_series(tmp_path / "series")
    files = sorted(series.glob("*.dcm"), key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber))
    for number, path in enumerate(reversed(files), start=1):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = number
        ds.save_as(path, enforce_file_format=True)
    sr = render_outputs(OutputSource.of(result, es.load_volume(series), es.decision()))[0]
    library = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Image Library")
    shared = {i.ConceptNameCodeSequence[0].CodeMeaning for i in library.ContentSequence[0].ContentSequence if i.ValueType != "IMAGE"}
    assert {"Modality", "Frame of Reference UID", "Pixel Data Rows", "Pixel Data Columns", "Horizontal Pixel Spacing"} <= shared


def test_key_images_name_the_gradcam_slices_highest_peak_first(written: list[Path], result: StudyResult) -> None:
    """The KOS (TID 2010) references the source slices behind the Grad-CAM maps, in the original series and study,
    titled and described for review, observed by the algorithm, with UIDs derived like the SR's."""
    kos = pydicom.dcmread(written[-1])
    uids = identity.OutputUIDs(result.series_instance_uid, result.model_version)
    assert kos.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document Storage
    assert (kos.SeriesInstanceUID, kos.SOPInstanceUID) == (uids.kos_series, uids.kos_instance)
    assert kos.StudyInstanceUID == result.study_instance_uid and kos.PatientID == es.PATIENT_ID
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113000"  # CID 7010 "Of Interest"
    items = kos.ContentSequence
    [description] = [i.TextValue for i in items if i.ConceptNameCodeSequence[0].CodeMeaning == "Key Object Description"]
    assert description.startswith("For review: AI PE triage key images - STAT - central PE")
    assert identity.NOT_FOR_DIAGNOSTIC_USE in description
    observer = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in items if i.RelationshipType == "HAS OBS CONTEXT"}
    assert observer["Device Observer Serial Number"].TextValue == result.model_version
    refs = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items if i.ValueType == "IMAGE"]
    by_peak = sorted(result.gradcam, key=lambda g: -g.peak_value)
    assert refs == list(dict.fromkeys(g.sop_instance_uid for g in by_peak))
    [study] = kos.CurrentRequestedProcedureEvidenceSequence
    [series] = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == result.series_instance_uid  # the original series
    assert {i.ReferencedSOPInstanceUID for i in series.ReferencedSOPSequence} == set(refs)
