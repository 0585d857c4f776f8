"""The structured report: Comprehensive 3D SR, TID 1500 Measurement Report (PS3.3 A.35.13, PS3.16 TID 1500).

Tree (highdicom builds and checks it)::

    CONTAINER Imaging Measurement Report (TID 1500)
      Language: English
      Observer: device (TID 1002/1004) - UID per model version, manufacturer, model name,
                serial number = model version
      Procedure reported: (418272005, SCT, "CT angiography")
      Image Library (TID 1600): every SOP instance of the analysed series
      Imaging Measurements
        Measurement Group (TID 1501), tracking id "PE triage", finding type
        (59282003, SCT, "Pulmonary embolism"), finding site (81040000, SCT, "Pulmonary artery"),
        Algorithm Identification (TID 4019): name, version, manufacturer, thresholds
          CODE qualitative evaluations - the consistent findings
          NUM  measurements - each label's probability, unit (1, UCUM, "no units")
      Qualitative Evaluations (TID 1500 row 12, UMLS C0034375)
          CODE triage priority (STAT / URGENT / ROUTINE) and the rule that set it
          TEXT "NOT FOR DIAGNOSTIC USE ..." statement

VerificationFlag is UNVERIFIED and CompletionFlag COMPLETE (PS3.3 C.17.2).

Codes. SNOMED CT (SCT) where DICOM's own code tables carry a fitting concept:
59282003 Pulmonary embolism, 52101004 Present, 272519000 Absent, 82334004
Indeterminate, 90734009 Chronic, 81040000 Pulmonary artery, 418272005 CT
angiography. The rest are in this node's private coding scheme
:data:`PRIVATE_SCHEME` ("99PETRIAGE", PS3.16 8.2: a "99" designator is local),
version 1, listed in :data:`PRIVATE_CODES` below and never re-used with another
meaning.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableSequence, Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian

from pe_triage_node.export import identity
from pe_triage_node.export.findings import (
    ResultFindings,
    chronicity,
    is_positive,
    label_probability,
    label_text,
    series_description,
)
from pe_triage_node.inference.labels import STUDY_LABELS, WINDOW_LABEL
from pe_triage_node.inference.result import StudyResult
from pe_triage_node.rules import Priority, PriorityDecision

PRIVATE_SCHEME = "99PETRIAGE"
PRIVATE_SCHEME_VERSION = "1"


def _private(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning, scheme_version=PRIVATE_SCHEME_VERSION)


def _sct(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator="SCT", meaning=meaning)


# -- standard codes -----------------------------------------------------------
PULMONARY_EMBOLISM = _sct("59282003", "Pulmonary embolism")
PRESENT = _sct("52101004", "Present")
ABSENT = _sct("272519000", "Absent")
INDETERMINATE = _sct("82334004", "Indeterminate")
CHRONIC = _sct("90734009", "Chronic")
PULMONARY_ARTERY = _sct("81040000", "Pulmonary artery")
CT_ANGIOGRAPHY = _sct("418272005", "CT angiography")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept(value="C0034375", scheme_designator="UMLS", meaning="Qualitative Evaluations")
NO_UNITS = hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")

# -- private codes (99PETRIAGE, version 1) ------------------------------------
#: Code value -> meaning of every private code the node writes.
PRIVATE_CODES: dict[str, str] = {
    "CENTRAL-PE": "Central pulmonary embolism",
    "RIGHT-PE": "Right-sided pulmonary embolism",
    "LEFT-PE": "Left-sided pulmonary embolism",
    "PE-CHRONICITY": "Pulmonary embolism chronicity",
    "ACUTE": "Acute",
    "ACUTE-ON-CHRONIC": "Acute on chronic",
    "RVLV-RATIO": "RV/LV diameter ratio category",
    "RVLV-GTE-1": "RV/LV ratio >= 1",
    "RVLV-LT-1": "RV/LV ratio < 1",
    "STUDY-QUALITY": "Study quality for PE assessment",
    "ADEQUATE": "Adequate",
    "TRIAGE-PRIORITY": "AI triage priority",
    "STAT": "STAT",
    "URGENT": "URGENT",
    "ROUTINE": "ROUTINE",
    "TRIAGE-RULE": "Triage rule applied",
    "DISCLAIMER": "Not for diagnostic use statement",
    "P-PE-PRESENT": "Probability of PE (highest window)",
    "P-NEGATIVE": "Probability of negative exam for PE",
    "P-INDETERMINATE": "Probability of indeterminate exam",
    "P-CHRONIC": "Probability of chronic PE",
    "P-ACUTE-CHRONIC": "Probability of acute on chronic PE",
    "P-CENTRAL": "Probability of central PE",
    "P-LEFT": "Probability of left-sided PE",
    "P-RIGHT": "Probability of right-sided PE",
    "P-RVLV-GTE-1": "Probability of RV/LV ratio >= 1",
    "P-RVLV-LT-1": "Probability of RV/LV ratio < 1",
}


def private_code(value: str) -> hd.sr.CodedConcept:
    """A code of :data:`PRIVATE_SCHEME` by value (raises :class:`KeyError` for an unknown one)."""
    return _private(value, PRIVATE_CODES[value])


#: Probability measurement code for each RSNA label.
PROBABILITY_CODES: dict[str, str] = {
    WINDOW_LABEL: "P-PE-PRESENT",
    "negative_exam_for_pe": "P-NEGATIVE",
    "indeterminate": "P-INDETERMINATE",
    "chronic_pe": "P-CHRONIC",
    "acute_and_chronic_pe": "P-ACUTE-CHRONIC",
    "central_pe": "P-CENTRAL",
    "leftsided_pe": "P-LEFT",
    "rightsided_pe": "P-RIGHT",
    "rv_lv_ratio_gte_1": "P-RVLV-GTE-1",
    "rv_lv_ratio_lt_1": "P-RVLV-LT-1",
}

PRIORITY_CODES: dict[Priority, str] = {Priority.STAT: "STAT", Priority.URGENT: "URGENT", Priority.ROUTINE: "ROUTINE"}


def _present(flag: bool) -> hd.sr.CodedConcept:
    return PRESENT if flag else ABSENT


#: A finding as codes: (concept name, value), e.g. (Pulmonary embolism, Present).
CodedFinding = tuple[hd.sr.CodedConcept, hd.sr.CodedConcept]


def coded_findings(labels: Mapping[str, bool]) -> list[CodedFinding]:
    """The consistent findings as codes (the labels, never the raw probabilities): PE present, absent or
    indeterminate, the study quality and, for a positive study, central / right / left, chronicity, RV/LV.

    The one coding of the findings: the SR, the HL7 ORU and the FHIR Bundle all carry these.
    """
    positive = is_positive(labels)
    pe_value = PRESENT if positive else (INDETERMINATE if labels.get("indeterminate") else ABSENT)
    items = [(PULMONARY_EMBOLISM, pe_value)]
    quality = INDETERMINATE if labels.get("indeterminate") else private_code("ADEQUATE")
    items.append((private_code("STUDY-QUALITY"), quality))
    if positive:
        for label, code in (("central_pe", "CENTRAL-PE"), ("rightsided_pe", "RIGHT-PE"), ("leftsided_pe", "LEFT-PE")):
            items.append((private_code(code), _present(bool(labels.get(label)))))
        kind = chronicity(labels)
        value = {"chronic": CHRONIC, "acute-on-chronic": private_code("ACUTE-ON-CHRONIC")}.get(kind or "", private_code("ACUTE"))
        items.append((private_code("PE-CHRONICITY"), value))
        rvlv = "RVLV-GTE-1" if labels.get("rv_lv_ratio_gte_1") else "RVLV-LT-1"
        items.append((private_code("RVLV-RATIO"), private_code(rvlv)))
    return items


def coded_probabilities(result: StudyResult | ResultFindings) -> list[tuple[str, hd.sr.CodedConcept, float]]:
    """(label, concept, probability) of each label that has one, in reading order (unit: UCUM "1")."""
    out = []
    for label in (WINDOW_LABEL, *STUDY_LABELS):
        p = label_probability(result, label)
        if p is not None:
            out.append((label, private_code(PROBABILITY_CODES[label]), float(p)))
    return out


def _qualitative(result: StudyResult) -> list[hd.sr.QualitativeEvaluation]:
    return [hd.sr.QualitativeEvaluation(name, value) for name, value in coded_findings(result.labels)]


def _measurements(result: StudyResult) -> list[hd.sr.Measurement]:
    """Each label's probability as a NUM item, unit "1" (UCUM, no units)."""
    return [hd.sr.Measurement(name=name, value=round(p, 6), unit=NO_UNITS) for _, name, p in coded_probabilities(result)]


def algorithm_identification(result: StudyResult) -> hd.sr.AlgorithmIdentification:
    """TID 4019: model name and version, the node as manufacturer, the thresholds as parameters."""
    return hd.sr.AlgorithmIdentification(
        name=result.model_name[:64],
        version=result.model_version[:64],
        parameters=identity.algorithm_parameters(result.thresholds),
        manufacturer=identity.MANUFACTURER,
    )


def device_observer(result: StudyResult, prefix: str) -> hd.sr.ObserverContext:
    """TID 1002/1004: the algorithm as the observer; serial number = model version."""
    return hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=identity.device_uid(result.model_name, result.model_version, prefix=prefix),
            name=identity.DEVICE_NAME,
            manufacturer_name=identity.MANUFACTURER,
            model_name=result.model_name[:64],
            serial_number=result.model_version[:64],
        ),
    )


def _study_evaluations(result: StudyResult, decision: PriorityDecision) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: the triage priority (CODE), the rule behind it and the disclaimer (TEXT)."""
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=private_code("TRIAGE-PRIORITY"),
            value=private_code(PRIORITY_CODES[decision.priority]),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
        hd.sr.TextContentItem(
            name=private_code("TRIAGE-RULE"),
            value=(decision.rule_name or "default priority")[:1024] + (f" [{', '.join(decision.flags)}]" if decision.flags else ""),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
    ]
    items.append(hd.sr.TextContentItem(
        name=private_code("DISCLAIMER"), value=identity.disclaimer(result.meaningless),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    ))
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def build_measurement_report(
    result: StudyResult, decision: PriorityDecision, source_datasets: Sequence[Dataset], uids: identity.OutputUIDs
) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree for ``result`` (``source_datasets``: the analysed series' headers)."""
    report = _findings_report(result, decision, uids)
    _insert_image_library([report[0].ContentSequence], source_datasets)
    return report


def _findings_report(result: StudyResult, decision: PriorityDecision, uids: identity.OutputUIDs) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree less its Image Library."""
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.tracking, identifier="PE triage"),
        finding_type=PULMONARY_EMBOLISM,
        algorithm_id=algorithm_identification(result),
        finding_sites=[hd.sr.FindingSite(PULMONARY_ARTERY)],
        measurements=_measurements(result),
        qualitative_evaluations=_qualitative(result),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device_observer(result, uids.prefix)),
        procedure_reported=CT_ANGIOGRAPHY,
        imaging_measurements=[group],
    )
    report[0].ContentSequence.append(_study_evaluations(result, decision))
    return report


def _insert_image_library(roots: Sequence[MutableSequence[Dataset]], datasets: Sequence[Dataset]) -> None:
    """TID 1500 row 5: the Image Library right after the procedure reported, in each of ``roots``
    (the root container's items; the same library item in each)."""
    library = image_library(datasets)
    for root in {id(root): root for root in roots}.values():
        at = next(i for i, item in enumerate(root) if hd.sr.CodedConcept.from_dataset(item.ConceptNameCodeSequence[0])
                  == codes.DCM.ProcedureReported) + 1
        root.insert(at, library)


def image_library(datasets: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library: one group for the analysed series, its shared descriptors (TID 1602:
    modality, frame of reference, matrix, pixel spacing, thickness, orientation) stated once, then an
    IMAGE item per SOP instance. highdicom's ``ImageLibrary`` repeats every descriptor per image,
    which takes about 40 ms an image (12 s for a 300-slice CTPA); the group form says the same."""
    ordered = sorted(datasets, key=lambda ds: int(getattr(ds, "InstanceNumber", 0) or 0))
    first = ordered[0]
    group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    shared: list[hd.sr.ContentItem] = [
        item for item in hd.sr.ImageLibraryEntryDescriptors(first) if not str(item.name.meaning).startswith("Image Position")
    ]
    source = hd.sr.CodedConcept(value="260753009", scheme_designator="SCT", meaning="Source")
    images = [
        hd.sr.ImageContentItem(
            name=source,
            referenced_sop_class_uid=ds.SOPClassUID,
            referenced_sop_instance_uid=ds.SOPInstanceUID,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        for ds in ordered
    ]
    group.ContentSequence = hd.sr.ContentSequence([*shared, *images])
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def predecessor_reference(study_instance_uid: str, previous: identity.OutputUIDs) -> Dataset:
    """The SR of an earlier output set, as highdicom's ``previous_versions`` takes it (PS3.3 C.17.2.1)."""
    ds = Dataset()
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = previous.sr_series
    ds.SOPClassUID = Comprehensive3DSRStorage
    ds.SOPInstanceUID = previous.sr_instance
    return ds


def build_sr(
    result: StudyResult,
    decision: PriorityDecision,
    source_datasets: Sequence[Dataset],
    uids: identity.OutputUIDs,
    *,
    previous: identity.OutputUIDs | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The Comprehensive 3D SR of one result, patient and study copied from the source series.

    ``source_datasets``: the analysed series' headers as :func:`~.source.source_header`
    copies them (the first gives patient and study; every one is evidence).
    ``previous``: the output set this result corrects; its SR is named in the
    Predecessor Documents Sequence. Raises :class:`ValueError` when
    ``source_datasets`` is empty or from another series.
    """
    if not source_datasets:
        raise ValueError("the SR needs the analysed series' datasets (none given)")
    for ds in source_datasets:
        if ds.SeriesInstanceUID != result.series_instance_uid:
            raise ValueError("a source dataset belongs to another series than the result")
    study_uid = str(source_datasets[0].StudyInstanceUID)
    # highdicom copies the content tree it is given and searches it for the images it references,
    # about 0.25 s for a 300-image library: the library (all of it evidence, which highdicom records
    # from ``evidence`` whether referenced or not) goes into the document once it is built.
    sr = hd.sr.Comprehensive3DSR(
        evidence=source_datasets,
        content=_findings_report(result, decision, uids),
        series_instance_uid=uids.sr_series,
        series_number=identity.SR_SERIES_NUMBER,
        sop_instance_uid=uids.sr_instance,
        instance_number=1,
        manufacturer=identity.MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description(decision, result.labels),
        manufacturer_model_name=result.model_name[:64],
        software_versions=f"{identity.SOFTWARE_VERSION} model {result.model_version}"[:64],
        device_serial_number=result.model_version[:64],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        previous_versions=[predecessor_reference(study_uid, previous)] if previous is not None else None,
    )
    _insert_image_library([sr.ContentSequence, sr.content[0].ContentSequence], source_datasets)  # the document, highdicom's view
    sr.CodingSchemeIdentificationSequence = [coding_scheme_identification()]
    return sr


def coding_scheme_identification() -> Dataset:
    """PS3.3 C.12.1.1.1.1 (SOP Common): declares the private scheme :data:`PRIVATE_SCHEME`."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "pe-triage-node private codes for PE triage findings"
    item.CodingSchemeVersion = PRIVATE_SCHEME_VERSION
    item.CodingSchemeResponsibleOrganization = "pe-triage-node project"
    return item


__all__ = [
    "PRIVATE_CODES",
    "PRIVATE_SCHEME",
    "algorithm_identification",
    "build_measurement_report",
    "build_sr",
    "label_text",
    "private_code",
]
