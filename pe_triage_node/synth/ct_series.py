"""Write a HU volume as a valid CT Image Storage series (PS3.3 A.3).

The one place the project turns arrays into DICOM CT slices: the phantom
generator, the tests and the benchmarks all call :func:`write_ct_series`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

SYNTH_UID_PREFIX = "1.2.826.0.1.3680043.10.1453."  # pydicom's root + a project branch


@dataclass(frozen=True)
class StudyIdentity:
    """Patient and study attributes shared by every series of one synthetic study."""

    study_instance_uid: str = field(default_factory=lambda: generate_uid(SYNTH_UID_PREFIX))
    patient_id: str = "PHANTOM-0001"
    patient_name: str = "Phantom^CTPA"
    patient_birth_date: str = "19600101"
    patient_sex: str = "O"
    patient_age: str = "066Y"
    accession_number: str = "SYN0001"
    study_id: str = "1"
    study_description: str = "CT ANGIO CHEST PE PROTOCOL"
    study_date: str = "20260101"
    study_time: str = "120000"


def write_ct_series(
    volume_hu: np.ndarray,
    out_dir: Path,
    *,
    pixel_spacing: tuple[float, float] = (0.7, 0.7),
    slice_spacing: float = 1.0,
    slice_thickness: float | None = None,
    study: StudyIdentity | None = None,
    series_instance_uid: str | None = None,
    series_number: int = 2,
    series_description: str = "CTA CHEST PE 1.0 B30f",
    kernel: str = "B30f",
    transfer_syntax: str = ExplicitVRLittleEndian,
    origin: tuple[float, float, float] | None = None,
    extra: Mapping[str, Any] | None = None,
    filename_prefix: str = "",
    sop_instance_uids: Sequence[str] | None = None,
    frame_of_reference_uid: str | None = None,
    name_files_by_uid: bool = False,
) -> list[Path]:
    """Write ``volume_hu`` (z, y, x; index 0 the most inferior slice) as one CT series.

    Positions follow the volume (z increases towards the head, PS3.3 C.7.6.2.1.1),
    pixel data is int16 with RescaleIntercept 0 and slope 1. ``extra`` sets
    further attributes by keyword on every slice. Returns the written paths in
    slice order; files are named ``<prefix><index:04d>.dcm``, or
    ``<SOPInstanceUID>.dcm`` with ``name_files_by_uid`` (the RSPECT layout).
    ``sop_instance_uids`` (one per slice) and ``frame_of_reference_uid`` make
    the UIDs reproducible; by default they are fresh.
    """
    if volume_hu.ndim != 3:
        raise ValueError(f"volume must be 3-D (z, y, x), got shape {volume_hu.shape}")
    if transfer_syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        raise ValueError("write uncompressed; compress afterwards (dcmcjpls, dcmcjpeg...)")
    if sop_instance_uids is not None and len(sop_instance_uids) != volume_hu.shape[0]:
        raise ValueError(f"{len(sop_instance_uids)} SOP Instance UIDs for {volume_hu.shape[0]} slices")
    study = study or StudyIdentity()
    series_uid = series_instance_uid or generate_uid(SYNTH_UID_PREFIX)
    frame_uid = frame_of_reference_uid or generate_uid(SYNTH_UID_PREFIX)
    nz, ny, nx = volume_hu.shape
    ox, oy, oz = origin if origin is not None else (-nx * pixel_spacing[1] / 2, -ny * pixel_spacing[0] / 2, 0.0)
    pixels = np.clip(np.rint(volume_hu), -32768, 32767).astype("<i2")
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now()
    paths: list[Path] = []
    for i in range(nz):
        sop_uid = UID(sop_instance_uids[i]) if sop_instance_uids is not None else generate_uid(SYNTH_UID_PREFIX)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = UID(transfer_syntax)
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceCreationDate = now.strftime("%Y%m%d")
        ds.InstanceCreationTime = now.strftime("%H%M%S")
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        for level in ("Study", "Series", "Acquisition", "Content"):  # one acquisition, one date and time
            setattr(ds, f"{level}Date", study.study_date)
            setattr(ds, f"{level}Time", study.study_time)
        ds.AccessionNumber = study.accession_number
        ds.Modality = "CT"
        ds.Manufacturer = "pe-triage-node phantom"
        ds.InstitutionName = "Synthetic"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = study.study_description
        ds.SeriesDescription = series_description
        ds.ManufacturerModelName = "CTPA phantom"
        ds.PatientName = study.patient_name
        ds.PatientID = study.patient_id
        ds.PatientBirthDate = study.patient_birth_date
        ds.PatientSex = study.patient_sex
        ds.PatientAge = study.patient_age
        ds.BodyPartExamined = "CHEST"
        ds.ContrastBolusAgent = "IOHEXOL"  # a CTPA; pass extra={"ContrastBolusAgent": ""} for a plain CT
        ds.SliceThickness = f"{(slice_thickness or slice_spacing):.3g}"
        ds.KVP = "100"
        ds.ConvolutionKernel = kernel
        ds.PatientPosition = "FFS"
        ds.StudyInstanceUID = study.study_instance_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = study.study_id
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = i + 1
        z = oz + i * slice_spacing
        ds.ImagePositionPatient = [f"{ox:.4f}", f"{oy:.4f}", f"{z:.4f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.PixelSpacing = [f"{pixel_spacing[0]:.6g}", f"{pixel_spacing[1]:.6g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = "100"
        ds.WindowWidth = "700"
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        ds.PixelData = pixels[i].tobytes()
        name = f"{sop_uid}.dcm" if name_files_by_uid else f"{i:04d}.dcm"
        path = out_dir / f"{filename_prefix}{name}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
