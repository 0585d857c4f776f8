"""What the outputs read of the analysed series: named attributes, copied one by one; library warnings without values.

A source header from a scanner can carry anything: a private element whose
value does not fit its VR (a Philips (01F1,1026) holding text in a binary VR
makes pydicom raise ``BytesLengthException`` when it is converted), a date
that is not a date (highdicom parses PatientBirthDate and fails on it). The SR and the SCs are built from
:func:`source_header` copies that hold only :data:`SOURCE_ATTRIBUTES` (and
:func:`slice_reference` copies of the slices they only reference), each
read on its own: an element the outputs do not name is never read, and one
they name but cannot read is left out (Type 2 ones are left empty), with its
keyword logged, never its value.

Library warnings can quote DICOM values: highdicom warns ``The string
"<PatientName>" is unlikely to represent the intended person name``.
:func:`library_warnings_logged` catches the warnings raised inside its block
and logs one line per kind: category, module and line, never the text.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydicom.config import RAISE
from pydicom.datadict import dictionary_VM
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import validate_value

log = logging.getLogger(__name__)

#: Type 2 attributes the SR and SCs copy into their Patient and General Study modules
#: (highdicom reads them unconditionally): present, empty when the source lacks them.
TYPE2_ATTRIBUTES: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

#: An instance's identity and place in its series (every output reads it of every slice).
_IDENTITY: tuple[str, ...] = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "InstanceNumber",
)

#: A slice's matrix and place in space (SC geometry, Image Library descriptors, the coronal view).
_GEOMETRY: tuple[str, ...] = (
    "Rows",
    "Columns",
    "PixelSpacing",
    "SliceThickness",
    "ImageOrientationPatient",
    "ImagePositionPatient",
)


#: Every attribute an output reads from the analysed series, by keyword.
SOURCE_ATTRIBUTES: tuple[str, ...] = (
    # encoding and identity
    "SpecificCharacterSet",
    *_IDENTITY,
    # patient and study (PS3.3 C.7.1.1, C.7.2.1, C.7.2.2)
    *TYPE2_ATTRIBUTES,
    "IssuerOfPatientID",
    "StudyDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    # acquisition equipment (Contributing Equipment of the outputs)
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "DeviceSerialNumber",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "InstitutionAddress",
    "StationName",
    "AcquisitionDateTime",
    "AcquisitionDate",
    "AcquisitionTime",
    # the image: Image Library descriptors (TID 1602/1604), SC geometry
    "Modality",
    "BodyPartExamined",
    *_GEOMETRY,
)


#: What the outputs read of every other slice: evidence UIDs, order, and the geometry of the summary's
#: coronal view and of the Image Library descriptors (taken from the lowest InstanceNumber, any slice).
SLICE_ATTRIBUTES: tuple[str, ...] = (
    *_IDENTITY,
    "Modality",
    *_GEOMETRY,
)


def _tags(keywords: tuple[str, ...]) -> tuple[tuple[str, BaseTag], ...]:
    return tuple((k, Tag(k)) for k in keywords)


_SOURCE_TAGS = _tags(SOURCE_ATTRIBUTES)
_SLICE_TAGS = _tags(SLICE_ATTRIBUTES)


#: Value representations the output libraries parse (highdicom builds ``DA(...)`` from PatientBirthDate...):
#: a value of one of these that does not conform is left out rather than failing the job. Text of other
#: VRs is copied as it came (an over-long PatientID stays the one the PACS files the study under).
_PARSED_VRS = frozenset({"DA", "TM", "DT", "AS", "DS", "IS", "UI"})
#: Enumerated values highdicom turns into its own enums (PS3.3 C.7.1.1).
_ENUMERATED = {"PatientSex": frozenset({"M", "F", "O"})}


def _copy(ds: Dataset, tags: tuple[tuple[str, BaseTag], ...]) -> Dataset:
    out = Dataset()
    for keyword, tag in tags:
        try:
            if tag not in ds:
                continue
            elem = ds[tag]  # converts the raw element: a malformed value raises here
            if elem.VM > 1 and dictionary_VM(tag) == "1":
                raise ValueError("several values where the standard allows one")
            if elem.VR in _PARSED_VRS and elem.value not in (None, ""):
                for value in elem.value if elem.VM > 1 else [elem.value]:
                    validate_value(elem.VR, str(value), RAISE)
            if keyword in _ENUMERATED and elem.value not in (None, "") and elem.value not in _ENUMERATED[keyword]:
                raise ValueError("not one of the enumerated values")
            out.add(elem)
        except Exception:  # noqa: BLE001 - pydicom raises many types for a malformed value
            log.warning("source attribute %s unreadable or malformed: left out of the outputs", keyword)
    return out


def source_header(ds: Dataset) -> Dataset:
    """A new dataset holding :data:`SOURCE_ATTRIBUTES` of ``ds``; unreadable ones left out (Type 2: empty).

    What the SR and an SC copy patient, study and equipment from.
    """
    out = _copy(ds, _SOURCE_TAGS)
    for keyword in TYPE2_ATTRIBUTES:
        if keyword not in out:
            setattr(out, keyword, "")
    return out


def slice_reference(ds: Dataset) -> Dataset:
    """A new dataset holding :data:`SLICE_ATTRIBUTES` of ``ds`` (a slice the outputs only reference)."""
    return _copy(ds, _SLICE_TAGS)


@contextmanager
def library_warnings_logged(what: str) -> Iterator[None]:
    """Catch the warnings raised inside the block; log one PHI-free line per kind (category, module:line, count).

    Their text is dropped: pydicom's and highdicom's warnings quote DICOM values.
    Not thread-safe (``warnings.catch_warnings``): use it in a job's own thread.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            kinds = Counter((w.category.__name__, Path(w.filename).name, w.lineno) for w in caught)
            for (category, filename, lineno), n in kinds.items():
                log.warning("%s: %d library %s(s) from %s:%d (text not logged: it may quote patient data)",
                            what, n, category, filename, lineno)
