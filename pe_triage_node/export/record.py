"""What the HL7 and FHIR payloads are built from: one result, its priority, and the patient and order it belongs to.

A :class:`ResultRecord` is read either from the database, as the exporter does
when a job is due (the ``results`` row the worker stored and the ``studies``
row the receiver keeps: patient name, ID, birth date, sex, accession number),
or from an analysis in memory (``pe-triage infer --outputs``: the result, the
decision and the series' first header). Both give the same record for the
same study, so what ``infer --outputs`` writes is what the node would send.

The record holds patient data: never log it (log the UIDs and the result id).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset

from pe_triage_node.export import identity
from pe_triage_node.export.findings import ResultFindings
from pe_triage_node.inference.result import StudyResult
from pe_triage_node.rules import Priority, PriorityDecision

if TYPE_CHECKING:
    from pe_triage_node.db.models import Study, TriageResult


@dataclass(frozen=True)
class PatientOrder:
    """The patient and the imaging order, as DICOM gives them (PN and DA/TM strings; empty when unknown)."""

    patient_id: str = ""
    patient_name: str = ""  # DICOM PN: Family^Given^Middle^Prefix^Suffix
    birth_date: str = ""  # YYYYMMDD
    sex: str = ""  # M / F / O
    accession_number: str = ""
    study_date: str = ""  # YYYYMMDD
    study_time: str = ""  # HHMMSS.FFFFFF

    @classmethod
    def of_study(cls, study: Study | None) -> PatientOrder:
        """From the ``studies`` row (``None``: nothing known)."""
        if study is None:
            return cls()
        return cls(
            patient_id=study.patient_id or "",
            patient_name=study.patient_name or "",
            birth_date=study.patient_birth_date or "",
            sex=study.patient_sex or "",
            accession_number=study.accession_number or "",
            study_date=study.study_date or "",
            study_time=study.study_time or "",
        )

    @classmethod
    def of_header(cls, ds: Dataset) -> PatientOrder:
        """From one header of the analysed series (read through :func:`~.source.source_header`: a malformed
        value is left out, never raised)."""
        from pe_triage_node.export.source import source_header

        header = source_header(ds)

        def text(keyword: str) -> str:
            value = header.get(keyword)
            return "" if value is None else str(value).strip()

        return cls(
            patient_id=text("PatientID"),
            patient_name=text("PatientName"),
            birth_date=text("PatientBirthDate"),
            sex=text("PatientSex"),
            accession_number=text("AccessionNumber"),
            study_date=text("StudyDate"),
            study_time=text("StudyTime"),
        )


@dataclass(frozen=True)
class ResultRecord:
    """One stored result as the HL7 and FHIR builders read it."""

    study_instance_uid: str
    series_instance_uid: str
    generation: int
    model_name: str
    model_version: str
    meaningless: bool
    findings: ResultFindings
    priority: Priority
    rule_name: str | None
    flags: tuple[str, ...]
    created_at: dt.datetime  # when the result was stored (UTC)
    patient: PatientOrder
    result_id: int | None = None  # the ``results`` row, when stored

    def output_uids(self, prefix: str = identity.OUTPUT_UID_PREFIX) -> identity.OutputUIDs:
        """The UIDs of the SR, SCs and KOS of this result (the FHIR report names its SR)."""
        return identity.OutputUIDs(self.series_instance_uid, self.model_version, prefix, self.generation)

    @classmethod
    def from_row(cls, row: TriageResult, study: Study | None) -> ResultRecord:
        """From the ``results`` row and its study's ``studies`` row."""
        summary = _json(row.result_json, {})
        flags = _json(row.flags, [])
        created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=dt.UTC)
        return cls(
            study_instance_uid=row.study_instance_uid,
            series_instance_uid=row.series_instance_uid,
            generation=row.generation,
            model_name=str(summary.get("model_name") or "unknown model"),
            model_version=row.model_version,
            meaningless=bool(summary.get("meaningless", False)),
            findings=ResultFindings.from_row(row),
            priority=Priority(row.priority),
            rule_name=row.rule_name,
            flags=tuple(str(f) for f in flags),
            created_at=created,
            patient=PatientOrder.of_study(study),
            result_id=row.id,
        )

    @classmethod
    def from_analysis(
        cls, result: StudyResult, decision: PriorityDecision, header: Dataset, *,
        generation: int = 0, when: dt.datetime | None = None,
    ) -> ResultRecord:
        """From a result in memory, its decision and the analysed series' first header."""
        return cls(
            study_instance_uid=result.study_instance_uid,
            series_instance_uid=result.series_instance_uid,
            generation=generation,
            model_name=result.model_name,
            model_version=result.model_version[:64],
            meaningless=result.meaningless,
            findings=ResultFindings.of(result),
            priority=decision.priority,
            rule_name=decision.rule_name,
            flags=tuple(decision.flags),
            created_at=when or dt.datetime.now(dt.UTC),
            patient=PatientOrder.of_header(header),
        )


def _json(text: str | None, default: Any) -> Any:
    """``text`` parsed as JSON when it is of ``default``'s type, else ``default``."""
    try:
        value = json.loads(text or "")
    except (json.JSONDecodeError, TypeError):
        return default
    return value if isinstance(value, type(default)) else default
