"""The index's own walk over little endian datasets gives what pydicom's reader gives.

Every case is read twice: as the receiver reads it, and with the walk switched
off (pydicom's reader for every dataset); attributes and verdicts must agree.
"""

from __future__ import annotations

import copy
import io
import random
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pe_triage_node.dicom import index
from pe_triage_node.dicom.index import IndexedAttributes, read_indexed_attributes
from pe_triage_node.errors import InputRejected
from pe_triage_node.synth.ct_series import write_ct_series

TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
_NOT_A_NUMBER_YET = "987.6543"  # pydicom writes no invalid DS: the encoded bytes are replaced


def _base(tmp_path: Path, ts: str) -> Dataset:
    vol = np.random.default_rng(7).normal(0, 50, (1, 16, 16)).astype(np.float32)
    (path,) = write_ct_series(vol, tmp_path / ts, transfer_syntax=ts)
    return pydicom.dcmread(path)


def _body(ds: Dataset, ts: str) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = ts == ImplicitVRLittleEndian
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dataset(fp, ds)
    return fp.getvalue().replace(_NOT_A_NUMBER_YET.encode(), b"n/a     ")


def _outcome(read: Callable[[], IndexedAttributes]) -> IndexedAttributes | str:
    try:
        return read()
    except InputRejected:
        return "refused"


def _both(body: bytes, ts: str, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        walked = _outcome(lambda: read_indexed_attributes(body, ts))
        with monkeypatch.context() as m:
            m.setattr(index, "_scan_le", lambda buf, implicit: None)
            reference = _outcome(lambda: read_indexed_attributes(body, ts))
    return walked, reference


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _variants(ds: Dataset) -> list[Dataset]:
    out = []
    padded = copy.deepcopy(ds)
    padded.ImageType = ["ORIGINAL", "PRIMARY ", "AXIAL"]
    padded.StudyDescription = "CTA  CHEST  "
    padded.ProtocolName = "A \\B"
    padded.ImagePositionPatient = [" -1.5", "+2e1", "3 "]
    padded.SliceThickness = "0001.250"
    padded.InstanceNumber = "007"
    out.append(padded)
    latin = copy.deepcopy(ds)
    latin.SpecificCharacterSet = "ISO_IR 100"
    latin.PatientName = "Müller^Hans"
    latin.ReferringPhysicianName = "Gómez^Ana\\Ñu^X"
    out.append(latin)
    utf8 = copy.deepcopy(ds)
    utf8.SpecificCharacterSet = "ISO_IR 192"
    utf8.PatientName = "Ñandú^José=山田^太郎"
    utf8.StudyDescription = "Thorax ☤"
    out.append(utf8)
    iso2022 = copy.deepcopy(ds)
    iso2022.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    iso2022.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    out.append(iso2022)
    odd = copy.deepcopy(ds)
    odd.InstanceNumber = "1.0"  # not an IS: pydicom's conversion
    odd.SeriesNumber = ""
    odd.ImageOrientationPatient = "1\\0\\0\\0\\1\\"  # an empty value
    odd.SliceThickness = _NOT_A_NUMBER_YET  # made "n/a" once encoded: no slice thickness
    out.append(odd)
    sequences = copy.deepcopy(ds)
    nested = Sequence([_item(CodeValue="X", CodeMeaning="Y")])
    nested.is_undefined_length = True  # type: ignore[attr-defined]
    inner = _item(ReferencedSOPInstanceUID="1.2.3", ReferencedSOPClassUID="1.2.4")
    inner.PurposeOfReferenceCodeSequence = nested
    inner.is_undefined_length_sequence_item = True
    seq = Sequence([inner, _item(ReferencedSOPInstanceUID="1.2.5")])
    seq.is_undefined_length = True  # type: ignore[attr-defined]
    sequences.ReferencedImageSequence = seq
    sequences.ProcedureCodeSequence = Sequence([_item(CodeValue="Z", PatientName="Inner^Name")])
    sequences.add_new(0x00091010, "LO", "PRIVATE")
    out.append(sequences)
    icon = copy.deepcopy(ds)
    pixels = Dataset()
    pixels.add_new(0x7FE00010, "OB", b"\xfe\xff\x00\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    pixels["PixelData"].is_undefined_length = True
    icon.IconImageSequence = Sequence([pixels])
    out.append(icon)
    unknown = copy.deepcopy(ds)
    unknown.add_new(0x00081030, "UN", b"STUDY AS UN ")  # StudyDescription sent as UN
    out.append(unknown)
    return out


@pytest.mark.parametrize("ts", TRANSFER_SYNTAXES)
def test_walk_reads_what_pydicom_reads(tmp_path: Path, ts: str, monkeypatch: pytest.MonkeyPatch) -> None:
    base = _base(tmp_path, ts)
    for ds in [base, *_variants(base)]:
        if ts == ImplicitVRLittleEndian and "StudyDescription" in ds and ds["StudyDescription"].VR == "UN":
            continue  # implicit VR carries no VR
        walked, reference = _both(_body(ds, ts), ts, monkeypatch)
        assert walked == reference


def test_walk_covers_the_plain_and_the_odd_values(tmp_path: Path) -> None:
    base = _base(tmp_path, ExplicitVRLittleEndian)
    padded, latin, utf8, iso2022, odd, *_rest = _variants(base)
    read = [read_indexed_attributes(_body(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian) for ds in (padded, latin, utf8, iso2022)]
    assert read[0].image_type == "ORIGINAL\\PRIMARY \\AXIAL" and read[0].protocol_name == "A\\B"
    assert read[0].image_position_patient == "-1.5\\+2e1\\3" and read[0].slice_thickness == 1.25
    assert read[0].instance_number == 7 and read[0].study_description == "CTA  CHEST"
    assert read[1].patient_name == "Müller^Hans" and read[1].referring_physician == "Gómez^Ana\\Ñu^X"
    assert read[2].patient_name == "Ñandú^José=山田^太郎" and read[2].study_description == "Thorax ☤"
    assert read[3].patient_name == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        odd_read = read_indexed_attributes(_body(odd, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    assert (odd_read.instance_number, odd_read.series_number, odd_read.slice_thickness) == (1, None, None)
    assert odd_read.image_orientation_patient == "1\\0\\0\\0\\1\\"


@pytest.mark.parametrize("ts", TRANSFER_SYNTAXES)
def test_walk_and_pydicom_agree_on_damaged_data(tmp_path: Path, ts: str, monkeypatch: pytest.MonkeyPatch) -> None:
    base = _base(tmp_path, ts)
    sequences = _variants(base)[5]
    rng = random.Random(11)
    for ds in (base, sequences):
        body = _body(ds, ts)
        header_end = body.index(b"\xe0\x7f\x10\x00") + 12
        cuts = list(range(0, header_end, 3)) + [len(body) - 1, len(body) - 100]
        for cut in cuts:
            walked, reference = _both(body[:cut], ts, monkeypatch)
            assert walked == reference, cut
        for _ in range(150):
            damaged = bytearray(body)
            at = rng.randrange(header_end)
            damaged[at] = rng.randrange(256)
            walked, reference = _both(bytes(damaged), ts, monkeypatch)
            assert walked == reference, at


def test_walk_reads_received_files(tmp_path: Path) -> None:
    vol = np.random.default_rng(3).normal(0, 50, (3, 16, 16)).astype(np.float32)
    for path in write_ct_series(vol, tmp_path):
        raw = path.read_bytes()
        fp = io.BytesIO(raw)
        fp.seek(132)
        _read_file_meta_info(fp)
        assert index._scan_le(raw[fp.tell() :], False) is not None  # the fast walk, not the fallback
