"""The receiver's pieces without a network: UID validation, attribute indexing, the spool, File Meta,
the request checks of the Storage SCP, and the pynetdicom code its upper layer was written against."""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.filereader import _read_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.dul import DULServiceProvider
from pynetdicom.events import Event
from pynetdicom.presentation import build_context

from pe_triage_node.dicom import upper_layer
from pe_triage_node.dicom.index import read_indexed_attributes
from pe_triage_node.dicom.receiver import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_SOP_CLASS_MISMATCH,
    _Refused,
    identify,
    part10_header,
)
from pe_triage_node.dicom.spool import Spool
from pe_triage_node.dicom.uids import is_valid_uid, validate_uid
from pe_triage_node.errors import InputRejected, SpoolFull
from pe_triage_node.synth.ct_series import write_ct_series


@pytest.mark.parametrize(
    "uid,ok",
    [
        ("1.2.840.10008.5.1.4.1.1.2", True),
        ("0.1", True),
        ("1.2.0.3", True),
        ("1." + "2" * 62, True),  # 64 characters
        ("1." + "2" * 63, False),  # 65
        ("1.02.3", False),  # leading zero
        ("1..2", False),
        (".1.2", False),
        ("1.2.", False),
        ("1.2.3\n", False),
        ("1.2.a", False),
        ("../../etc", False),
        ("1/2", False),
        ("", False),
    ],
)
def test_uid_check_is_strict(uid: str, ok: bool) -> None:
    assert is_valid_uid(uid) is ok
    if not ok:
        with pytest.raises(InputRejected):
            validate_uid(uid, "UID")


def _encoded(tmp_path: Path, ts: str = ExplicitVRLittleEndian) -> tuple[bytes, bytes, pydicom.Dataset]:
    vol = np.random.default_rng(5).normal(0, 50, (1, 32, 32)).astype(np.float32)
    (path,) = write_ct_series(vol, tmp_path / ts, transfer_syntax=ts)
    raw = path.read_bytes()
    fp = io.BytesIO(raw)
    fp.seek(132)
    _read_file_meta_info(fp)
    return raw[: fp.tell()], raw[fp.tell() :], pydicom.dcmread(path)


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_index_reads_the_indexed_attributes(tmp_path: Path, ts: str) -> None:
    _meta, body, ds = _encoded(tmp_path, ts)
    a = read_indexed_attributes(body, ts)
    assert (a.sop_instance_uid, a.series_instance_uid, a.study_instance_uid) == (
        ds.SOPInstanceUID,
        ds.SeriesInstanceUID,
        ds.StudyInstanceUID,
    )
    assert a.modality == "CT" and a.instance_number == 1 and a.slice_thickness == 1.0
    assert a.image_type == "ORIGINAL\\PRIMARY\\AXIAL"
    assert a.patient_name == "Phantom^CTPA"


def test_index_reads_deflated_datasets(tmp_path: Path) -> None:
    _meta, body, ds = _encoded(tmp_path)
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = deflater.compress(body) + deflater.flush()
    assert read_indexed_attributes(deflated, DeflatedExplicitVRLittleEndian).sop_instance_uid == ds.SOPInstanceUID
    with pytest.raises(InputRejected, match="truncated|inflated"):
        read_indexed_attributes(deflated[: len(deflated) // 2], DeflatedExplicitVRLittleEndian)


def test_index_refuses_truncated_and_garbage(tmp_path: Path) -> None:
    _meta, body, _ds = _encoded(tmp_path)
    for cut in (len(body) - 1, len(body) // 2, 200, 3):
        with pytest.raises(InputRejected):
            read_indexed_attributes(body[:cut], ExplicitVRLittleEndian)
    with pytest.raises(InputRejected):
        read_indexed_attributes(os.urandom(4096), ExplicitVRLittleEndian)
    with pytest.raises(InputRejected):
        read_indexed_attributes(b"\x00" * 4096, ImplicitVRLittleEndian)


def _store_event(ds: pydicom.Dataset, body: bytes, ts: str, *, sop_class: str | None = None, sop: str | None = None) -> Event:
    """The EVT_C_STORE event pynetdicom hands the handler for a request carrying ``body``."""
    request = C_STORE()
    request.AffectedSOPClassUID = sop_class or ds.SOPClassUID
    request.AffectedSOPInstanceUID = sop or ds.SOPInstanceUID
    request.DataSet = io.BytesIO(body)
    cx = build_context(request.AffectedSOPClassUID, ts)
    cx.context_id = 1
    return Event(None, evt.EVT_C_STORE, {"request": request, "context": cx.as_tuple})  # type: ignore[arg-type]


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_part10_header_makes_a_valid_file_of_the_received_bytes(tmp_path: Path, ts: str) -> None:
    _meta, body, ds = _encoded(tmp_path, ts)
    event = _store_event(ds, body, ts)
    out = tmp_path / "x.dcm"
    header = part10_header(event, "SCANNER")
    meta = event.file_meta
    meta.SourceApplicationEntityTitle = "SCANNER"
    assert header == b"\x00" * 128 + b"DICM" + encode_file_meta(meta)  # what pydicom writes
    out.write_bytes(header + event.encoded_dataset(include_meta=False))
    back = pydicom.dcmread(out)
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert back.file_meta.TransferSyntaxUID == ts
    assert back.file_meta.SourceApplicationEntityTitle == "SCANNER"
    assert back.PixelData == ds.PixelData


def test_identify_matches_the_dataset_to_the_request(tmp_path: Path) -> None:
    _meta, body, ds = _encoded(tmp_path)
    ts = ExplicitVRLittleEndian
    assert identify(body, ts, _store_event(ds, body, ts).request).sop_instance_uid == ds.SOPInstanceUID
    with pytest.raises(_Refused) as wrong_uid:
        identify(body, ts, _store_event(ds, body, ts, sop="1.2.3.4").request)
    assert wrong_uid.value.status == STATUS_CANNOT_UNDERSTAND and "SOPInstanceUID" in wrong_uid.value.reason
    with pytest.raises(_Refused) as wrong_class:
        identify(body, ts, _store_event(ds, body, ts, sop_class=MRImageStorage).request)
    assert wrong_class.value.status == STATUS_SOP_CLASS_MISMATCH
    assert wrong_class.value.attrs is not None and wrong_class.value.attrs.series_instance_uid == ds.SeriesInstanceUID
    with pytest.raises(_Refused) as garbage:
        identify(os.urandom(2048), ts, _store_event(ds, body, ts).request)
    assert garbage.value.status == STATUS_CANNOT_UNDERSTAND and garbage.value.attrs is None


# -- the pynetdicom code the upper layer overrides or calls -------------------------------------
def test_pynetdicom_code_the_upper_layer_relies_on_is_unchanged() -> None:
    """Fails when an installed pynetdicom differs from the code dicom/upper_layer.py was written for."""
    assert upper_layer.pynetdicom_changes() == []


def test_code_digest_sees_code_changes_and_ignores_docstrings_and_comments() -> None:
    code = 'def f(x):\n    """Doc."""\n    return x + 1\n'
    documented = 'def f(x):\n    """Another doc."""\n    # a comment\n    return x + 1\n'
    changed = 'def f(x):\n    """Doc."""\n    return x + 2\n'
    digest = upper_layer.source_digest(code)
    assert upper_layer.source_digest(documented) == digest
    assert upper_layer.source_digest(changed) != digest


def test_a_changed_pinned_function_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def _read_pdu_data(self: DULServiceProvider) -> None:
        return None

    pinned = dict(upper_layer.PINNED_PYNETDICOM)
    name = "DULServiceProvider._read_pdu_data"
    pinned[name] = (_read_pdu_data, pinned[name][1])
    monkeypatch.setattr(upper_layer, "PINNED_PYNETDICOM", pinned)
    assert upper_layer.pynetdicom_changes() == [name]


def test_spool_write_is_atomic_and_respects_the_floor(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_mb=0)
    rel = Spool.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert rel == "1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    assert spool.write(rel, (b"abc", b"def")) == 6
    assert (tmp_path / "spool" / rel).read_bytes() == b"abcdef"
    assert [p.name for p in (tmp_path / "spool" / "1.2.3" / "1.2.3.4").iterdir()] == ["1.2.3.4.5.dcm"]
    with pytest.raises(InputRejected):
        Spool.relative_path("1.2.3", "../x", "1.2")
    full = Spool(tmp_path / "spool", min_free_mb=10**9)
    with pytest.raises(SpoolFull):
        full.write(Spool.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.6"), (b"x",))
    assert not (tmp_path / "spool" / "1.2.3" / "1.2.3.4" / "1.2.3.4.6.dcm").exists()
    (tmp_path / "spool" / "1.2.3" / ".tmp-1-2-3").write_bytes(b"half")
    assert spool.sweep_temporaries() == 1
