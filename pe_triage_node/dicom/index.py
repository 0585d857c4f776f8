"""Read only the attributes the node indexes from an encoded dataset, never its pixel data.

The C-STORE handler hands over the dataset bytes exactly as received (PS3.8
P-DATA fragments reassembled); this module walks the top-level elements, skips
every value it does not index, stops at (7FE0,0010) Pixel Data and checks that
the pixel element's declared length fits the bytes received, so a truncated
instance is refused instead of spooled.

The walk over little endian data is this module's own (:func:`_scan_le`, a few
struct reads per element); the indexed values are decoded by pydicom exactly as
a pydicom read would. Anything the walk does not expect (a truncated element, an
unknown VR, undefined length outside a sequence, big endian) is read again by
pydicom's reader (:func:`_read_with_pydicom`), which gives the verdict and the reason.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from io import BytesIO
from typing import Any, cast

from pydicom.charset import convert_encodings, default_encoding
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_16
from pydicom.values import convert_value
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from pe_triage_node.dicom.uids import validate_uid
from pe_triage_node.errors import InputRejected

PIXEL_DATA = 0x7FE00010
_SEQ_DELIMITER_LE = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_SEQ_DELIMITER_BE = b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_SPECIFIC_CHARACTER_SET = 0x00080005
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_UNDEFINED_LENGTH = 0xFFFFFFFF

INDEXED_TAGS: list[BaseTag | int] = [
    0x00080005,  # SpecificCharacterSet
    0x00080008,  # ImageType
    0x00080016,  # SOPClassUID
    0x00080018,  # SOPInstanceUID
    0x00080020,  # StudyDate
    0x00080030,  # StudyTime
    0x00080050,  # AccessionNumber
    0x00080060,  # Modality
    0x00080090,  # ReferringPhysicianName
    0x00081030,  # StudyDescription
    0x0008103E,  # SeriesDescription
    0x00100010,  # PatientName
    0x00100020,  # PatientID
    0x00100030,  # PatientBirthDate
    0x00100040,  # PatientSex
    0x00101010,  # PatientAge
    0x00180010,  # ContrastBolusAgent
    0x00180050,  # SliceThickness
    0x00181030,  # ProtocolName
    0x00181210,  # ConvolutionKernel
    0x00280002,  # SamplesPerPixel
    0x00280008,  # NumberOfFrames
    0x00280010,  # Rows
    0x00280011,  # Columns
    0x00280100,  # BitsAllocated
    0x0020000D,  # StudyInstanceUID
    0x0020000E,  # SeriesInstanceUID
    0x00200011,  # SeriesNumber
    0x00200013,  # InstanceNumber
    0x00200032,  # ImagePositionPatient
    0x00200037,  # ImageOrientationPatient
]
_KEYWORDS: dict[int, str] = {int(tag): keyword_for_tag(tag) for tag in INDEXED_TAGS}
_DICTIONARY_VRS: dict[int, str] = {int(tag): dictionary_VR(tag) for tag in INDEXED_TAGS}
# Decoded by pydicom as the text itself, trailing spaces and NULs off (DA/TM: unless datetime_conversion).
_PLAIN_STRING_VRS = frozenset({"AS", "CS", "DA", "TM", "UI"})
_NUMBER_STRING_VRS = frozenset({"DS", "IS"})
_TEXT_VRS = frozenset({"LO", "PN", "SH", "UC"})  # decoded with the Specific Character Set
_DS_PATTERN = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_IS_PATTERN = re.compile(r"[+-]?[0-9]+")
_SHORT_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_16)  # 2-byte length in explicit VR
_LONG_VRS_BYTES = frozenset(vr.encode() for vr in _LONG_VRS)


@dataclass(slots=True)
class IndexedAttributes:
    """What the receiver records about one instance (the database holds PHI; logs never do)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    patient_age: str | None = None
    accession_number: str | None = None
    study_description: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    referring_physician: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    protocol_name: str | None = None
    image_type: str | None = None
    convolution_kernel: str | None = None
    slice_thickness: float | None = None
    contrast_bolus_agent: str | None = None
    instance_number: int | None = None
    image_position_patient: str | None = None
    image_orientation_patient: str | None = None


def read_indexed_attributes(stream: bytes, transfer_syntax: str) -> IndexedAttributes:
    """Parse the indexed attributes of an encoded dataset (no File Meta, as sent on the wire).

    Raises :class:`InputRejected` with a readable reason when the bytes cannot be
    understood: bad structure, truncation, missing or invalid UIDs.
    """
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little = transfer_syntax != ExplicitVRBigEndian
    buf = stream
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            buf = inflater.decompress(stream) + inflater.flush()
        except zlib.error as exc:
            raise InputRejected(f"deflated dataset cannot be inflated: {exc}") from exc
        if not inflater.eof:
            raise InputRejected("deflated dataset is truncated")
    if len(buf) < 8:
        raise InputRejected(f"dataset too short ({len(buf)} bytes)")
    scanned = _scan_le(buf, implicit) if little else None
    source, pixel_at = scanned if scanned is not None else _read_with_pydicom(buf, implicit, little)
    pixel_length = _check_complete(buf, pixel_at, implicit, little)
    try:
        values = _values(source) if isinstance(source, Dataset) else _decode_raw(source)
    except Exception as exc:
        raise InputRejected(f"indexed attribute cannot be decoded: {type(exc).__name__}: {exc}") from exc
    if pixel_length is not None and pixel_length != 0xFFFFFFFF:
        _check_native_pixel_length(values, pixel_length)
    try:
        return _attributes(values)
    except InputRejected:
        raise
    except Exception as exc:
        raise InputRejected(f"indexed attribute cannot be decoded: {type(exc).__name__}: {exc}") from exc


def _read_with_pydicom(buf: bytes, implicit: bool, little: bool) -> tuple[Dataset, int]:
    """The indexed elements read by pydicom, and where its read stopped."""
    fp = BytesIO(buf)
    try:
        ds = read_dataset(
            fp,
            implicit,
            little,
            stop_when=_at_pixel_data,
            specific_tags=INDEXED_TAGS,
        )
    except Exception as exc:  # pydicom raises many types on garbage
        raise InputRejected(f"dataset cannot be parsed: {type(exc).__name__}: {exc}") from exc
    return ds, fp.tell()


# -- the fast walk over little endian data ------------------------------------------------
class _Unexpected(Exception):
    """An encoding the fast walk leaves to pydicom's reader."""


def _scan_le(buf: bytes, implicit: bool) -> tuple[dict[int, RawDataElement], int] | None:
    """The indexed top-level elements of a little endian dataset, undecoded, and where Pixel Data starts
    (the end of the data when there is none); ``None`` when the walk meets something it does not expect."""
    try:
        return _walk(buf, 0, implicit, top_level=True)
    except (_Unexpected, RecursionError, struct.error):
        return None


def _walk(buf: bytes, pos: int, implicit: bool, *, top_level: bool) -> tuple[dict[int, RawDataElement], int]:
    """Walk elements from ``pos``: at top level up to Pixel Data or the end, in an item up to its delimiter."""
    found: dict[int, RawDataElement] = {}
    end = len(buf)
    while pos < end:
        if end - pos < 8:
            raise _Unexpected
        group, element = struct.unpack_from("<HH", buf, pos)
        tag = group << 16 | element
        if top_level:
            if tag == PIXEL_DATA:
                return found, pos
        elif tag == _ITEM_END:
            return found, pos + 8
        if group == 0xFFFE:
            raise _Unexpected
        vr: str | None = None
        if implicit:
            (length,) = struct.unpack_from("<L", buf, pos + 4)
            value_at = pos + 8
        else:
            vr_bytes = buf[pos + 4 : pos + 6]
            if vr_bytes in _SHORT_VRS:
                (length,) = struct.unpack_from("<H", buf, pos + 6)
                value_at = pos + 8
            elif vr_bytes in _LONG_VRS_BYTES:
                (length,) = struct.unpack_from("<L", buf, pos + 8)
                value_at = pos + 12
            else:
                raise _Unexpected
            vr = vr_bytes.decode("ascii")
        if length == _UNDEFINED_LENGTH:
            if (vr is not None and vr != "SQ") or tag in _KEYWORDS:
                raise _Unexpected
            pos = _skip_sequence(buf, value_at, implicit)
            continue
        pos = value_at + length
        if pos > end:
            raise _Unexpected
        if top_level and tag in _KEYWORDS:
            found[tag] = RawDataElement(BaseTag(tag), vr, length, buf[value_at:pos], value_at, implicit, True)
    if not top_level:
        raise _Unexpected  # an item without its delimiter
    return found, pos


def _skip_sequence(buf: bytes, pos: int, implicit: bool) -> int:
    """The position after an undefined-length sequence's delimiter, its items walked (nested ones too)."""
    end = len(buf)
    while True:
        if end - pos < 8:
            raise _Unexpected
        group, element, length = struct.unpack_from("<HHL", buf, pos)
        tag = group << 16 | element
        if tag == _SEQUENCE_END:
            return pos + 8
        if tag != _ITEM:
            raise _Unexpected
        if length == _UNDEFINED_LENGTH:
            _found, pos = _walk(buf, pos + 8, implicit, top_level=False)
        else:
            pos += 8 + length
            if pos > end:
                raise _Unexpected


def _decode_raw(raw_elements: Mapping[int, RawDataElement]) -> dict[str, Any]:
    """The values of the indexed elements by keyword, as pydicom decodes them; a multi-valued
    string as the received text (values joined by backslashes), which is what the index keeps."""
    encodings: str | list[str] = default_encoding
    charset = raw_elements.get(_SPECIFIC_CHARACTER_SET)
    if charset is not None:
        value = convert_raw_data_element(charset).value
        if value:
            encodings = convert_encodings(value)
    text_codec = encodings if isinstance(encodings, str) else encodings[0] if len(encodings) == 1 else None
    values: dict[str, Any] = {}
    for tag, raw in raw_elements.items():
        vr = raw.VR if raw.VR is not None else _DICTIONARY_VRS[tag]
        decoded: Any = _decode_plainly(vr, cast(bytes, raw.value), text_codec)
        if decoded is None:  # pydicom's own conversion (hooks included for UN)
            decoded = convert_raw_data_element(raw, encoding=encodings).value if vr == "UN" else convert_value(vr, raw, encodings)
        values[_KEYWORDS[tag]] = decoded
    return values


def _decode_plainly(vr: str, data: bytes, text_codec: str | None) -> str | int | None:
    """A value decoded without pydicom where the result is the same (``None`` elsewhere).

    pydicom strips trailing spaces and NULs (per value for SH/LO/UC), decodes text
    with the character set when no escape sequence is present, and keeps the text
    of a DS/IS value, stripped, once it parsed as a number.
    """
    if vr in _PLAIN_STRING_VRS and not (vr in ("DA", "TM") and pydicom_config.datetime_conversion):
        return data.decode(default_encoding).rstrip("\0 ")
    if vr == "US":
        return int.from_bytes(data, "little") if len(data) == 2 else None
    if vr in _NUMBER_STRING_VRS:
        parts = [part.strip() for part in data.decode(default_encoding).rstrip("\0 ").split("\\")]
        pattern = _DS_PATTERN if vr == "DS" else _IS_PATTERN
        return "\\".join(parts) if all(pattern.fullmatch(part) for part in parts) else None
    if vr in _TEXT_VRS and text_codec is not None and b"\x1b" not in data:
        try:
            if vr == "PN":
                return data.rstrip(b"\0 ").decode(text_codec)
            return "\\".join(part.rstrip("\0 ") for part in data.decode(text_codec).split("\\"))
        except (LookupError, UnicodeError):
            return None
    return None


def _at_pixel_data(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return tag == PIXEL_DATA


def _values(ds: Dataset) -> dict[str, Any]:
    """The dataset's values by keyword, each element decoded once (cheaper than a lookup per keyword)."""
    return {elem.keyword: elem.value for elem in ds}


def _check_native_pixel_length(ds: Mapping[str, Any], length: int) -> None:
    """Refuse native Pixel Data shorter than Rows × Columns × Samples × BitsAllocated/8 × Frames."""
    try:
        rows = int(ds.get("Rows") or 0)
        cols = int(ds.get("Columns") or 0)
        bits = int(ds.get("BitsAllocated") or 0)
        spp = int(ds.get("SamplesPerPixel") or 1)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return
    if not rows or not cols or bits % 8:
        return
    expected = rows * cols * spp * (bits // 8) * max(frames, 1)
    if length < expected:
        raise InputRejected(
            f"Pixel Data truncated: {length} bytes, Rows x Columns x samples x bytes x frames needs {expected}"
        )


def _check_complete(buf: bytes, pos: int, implicit: bool, little: bool) -> int | None:
    """Refuse a dataset whose last element (normally Pixel Data) extends past the bytes received.

    Returns the Pixel Data element's declared length, ``None`` when there is none.
    """
    total = len(buf)
    if pos > total:
        raise InputRejected(f"dataset truncated: an element ends at byte {pos} of {total}")
    if pos == total:
        return None
    endian = "<" if little else ">"
    if implicit:
        if total - pos < 8:
            raise InputRejected("dataset truncated inside the Pixel Data header")
        _group, _elem, length = struct.unpack_from(endian + "HHL", buf, pos)
        header = 8
    else:
        if total - pos < 8:
            raise InputRejected("dataset truncated inside the Pixel Data header")
        vr = buf[pos + 4 : pos + 6].decode("ascii", "replace")
        if vr in _LONG_VRS:
            if total - pos < 12:
                raise InputRejected("dataset truncated inside the Pixel Data header")
            (length,) = struct.unpack_from(endian + "L", buf, pos + 8)
            header = 12
        else:
            (length,) = struct.unpack_from(endian + "H", buf, pos + 6)
            header = 8
    if length == 0xFFFFFFFF:
        delimiter = _SEQ_DELIMITER_LE if little else _SEQ_DELIMITER_BE
        if buf.rfind(delimiter, pos + header) < 0:
            raise InputRejected("encapsulated Pixel Data truncated: no sequence delimiter")
        return int(length)
    if pos + header + length > total:
        raise InputRejected(
            f"dataset truncated: Pixel Data declares {length} bytes, {total - pos - header} received"
        )
    return int(length)


def _text(ds: Mapping[str, Any], keyword: str, limit: int) -> str | None:
    value: Any = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    text = text.strip()
    return text[:limit] if text else None


def _int(ds: Mapping[str, Any], keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _float(ds: Mapping[str, Any], keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _attributes(ds: Mapping[str, Any]) -> IndexedAttributes:
    return IndexedAttributes(
        sop_class_uid=validate_uid(_text(ds, "SOPClassUID", 65), "SOPClassUID"),
        sop_instance_uid=validate_uid(_text(ds, "SOPInstanceUID", 65), "SOPInstanceUID"),
        study_instance_uid=validate_uid(_text(ds, "StudyInstanceUID", 65), "StudyInstanceUID"),
        series_instance_uid=validate_uid(_text(ds, "SeriesInstanceUID", 65), "SeriesInstanceUID"),
        modality=_text(ds, "Modality", 16),
        patient_id=_text(ds, "PatientID", 64),
        patient_name=_text(ds, "PatientName", 324),
        patient_birth_date=_text(ds, "PatientBirthDate", 8),
        patient_sex=_text(ds, "PatientSex", 16),
        patient_age=_text(ds, "PatientAge", 4),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_description=_text(ds, "StudyDescription", 64),
        study_date=_text(ds, "StudyDate", 8),
        study_time=_text(ds, "StudyTime", 16),
        referring_physician=_text(ds, "ReferringPhysicianName", 324),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription", 64),
        protocol_name=_text(ds, "ProtocolName", 64),
        image_type=_text(ds, "ImageType", 128),
        convolution_kernel=_text(ds, "ConvolutionKernel", 64),
        slice_thickness=_float(ds, "SliceThickness"),
        contrast_bolus_agent=_text(ds, "ContrastBolusAgent", 64),
        instance_number=_int(ds, "InstanceNumber"),
        image_position_patient=_text(ds, "ImagePositionPatient", 96),
        image_orientation_patient=_text(ds, "ImageOrientationPatient", 192),
    )
