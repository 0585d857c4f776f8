"""FHIR R4: one transaction Bundle per result, POSTed to the server's base URL.

:func:`build_bundle` is a pure function of a :class:`~.record.ResultRecord`,
built with ``fhir.resources``' R4B models (R4B changed none of the resources
used here, so they are valid R4; the models check every element as it is made)::

    Device            the algorithm: model name and version, the node as manufacturer
    Observation  x n  one per finding (valueCodeableConcept, the SR's codes) and one per
                      probability (valueQuantity, unit 1), status preliminary, device -> the Device
    DiagnosticReport  status preliminary, LOINC 18748-4 "Diagnostic imaging study", conclusion
                      (headline, priority, disclaimer), conclusionCode, result -> the Observations,
                      imagingStudy -> the ImagingStudy by its StudyInstanceUID identifier,
                      basedOn -> the order (ServiceRequest) by its accession number
    Task              priority stat | urgent | routine, intent proposal: "read this study" for the
                      worklist, focus -> the ImagingStudy, reasonReference -> the DiagnosticReport

The patient, the study and the order are referenced by identifier (the hospital's
server holds them; the node does not create them). Every entry is a conditional
create (``ifNoneExist`` on a deterministic identifier): a re-send creates nothing twice.

:func:`post_bundle` sends it: 2xx delivered; 4xx dead with the OperationOutcome's
text; 5xx, 408, 429 and network trouble retried. The bundle carries patient data:
never logged (the HTTP status is).
"""

from __future__ import annotations

import json
import logging
import ssl
import urllib.error
import urllib.request
import uuid
from typing import Any

import highdicom as hd
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.task import Task

from pe_triage_node.config import FHIRDestination
from pe_triage_node.export import identity, sr
from pe_triage_node.export.delivery import Delivery, http_outcome
from pe_triage_node.export.findings import is_positive, main_finding
from pe_triage_node.export.record import ResultRecord
from pe_triage_node.rules import Priority

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
DICOM_UID_SYSTEM = "urn:dicom:uid"
URI_SYSTEM = "urn:ietf:rfc:3986"
#: FHIR systems of the coding schemes the SR uses (a DICOM scheme designator -> its FHIR URI).
SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    "LN": "http://loinc.org",
    sr.PRIVATE_SCHEME: f"urn:pe-triage-node:codes:{sr.PRIVATE_SCHEME}",
}
PRIORITY = {Priority.STAT: "stat", Priority.URGENT: "urgent", Priority.ROUTINE: "routine"}  # request-priority
_REPORT_CODE = {"coding": [{"system": SYSTEMS["LN"], "code": "18748-4", "display": "Diagnostic imaging study"}],
                "text": "AI PE triage of a CT pulmonary angiogram"}
_RADIOLOGY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}]}
_IMAGING = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging",
                        "display": "Imaging"}]}
_ACCESSION = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN",
                          "display": "Accession ID"}]}


def concept(code: hd.sr.CodedConcept) -> dict[str, Any]:
    """A DICOM coded concept as a FHIR CodeableConcept."""
    system = SYSTEMS.get(code.scheme_designator, f"urn:pe-triage-node:codes:{code.scheme_designator}")
    return {"coding": [{"system": system, "code": code.value, "display": code.meaning}], "text": code.meaning}


def _oid(uid: str) -> dict[str, str]:
    return {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}


def _condition(identifier: dict[str, str]) -> str:
    return f"identifier={identifier['system']}|{identifier['value']}"


def _instant(record: ResultRecord) -> str:
    return record.created_at.isoformat(timespec="seconds")


def build_bundle(record: ResultRecord, *, uid_prefix: str = identity.OUTPUT_UID_PREFIX,
                 patient_identifier_system: str | None = None) -> Bundle:
    """The transaction Bundle of one result (deterministic: the same record gives the same Bundle)."""
    uids = record.output_uids(uid_prefix)
    namespace = uuid.uuid5(uuid.NAMESPACE_OID, uids.sr_instance)
    entries: list[dict[str, Any]] = []

    def add(resource_type: str, resource: Any, identifier: dict[str, str], full_url: str) -> None:
        entries.append({"fullUrl": full_url, "resource": resource,
                        "request": {"method": "POST", "url": resource_type, "ifNoneExist": _condition(identifier)}})

    def local(name: str) -> tuple[str, dict[str, str]]:
        full_url = f"urn:uuid:{uuid.uuid5(namespace, name)}"
        return full_url, {"system": URI_SYSTEM, "value": full_url}

    patient = record.patient
    subject: dict[str, Any] | None = None
    if patient.patient_id:
        ident = {"value": patient.patient_id}
        if patient_identifier_system:
            ident["system"] = patient_identifier_system
        subject = {"type": "Patient", "identifier": ident}
    study = {"type": "ImagingStudy", "identifier": _oid(record.study_instance_uid)}
    order = ({"type": "ServiceRequest", "identifier": {"type": _ACCESSION, "value": patient.accession_number}}
             if patient.accession_number else None)
    common: dict[str, Any] = {"subject": subject} if subject else {}

    device_identifier = _oid(identity.device_uid(record.model_name, record.model_version, prefix=uid_prefix))
    device_url = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_OID, device_identifier['value'])}"
    add("Device", Device(
        identifier=[device_identifier],
        status="active",
        manufacturer=identity.MANUFACTURER,
        deviceName=[{"name": record.model_name, "type": "model-name"}],
        version=[{"value": record.model_version}],
        type={"text": f"{identity.DEVICE_NAME} algorithm ({identity.NOT_FOR_DIAGNOSTIC_USE})"},
    ), device_identifier, device_url)

    results = []
    observed = {"status": "preliminary", "category": [_IMAGING], **common, "issued": _instant(record),
                "effectiveDateTime": _instant(record), "device": {"reference": device_url}, "derivedFrom": [study]}
    for n, (name, value) in enumerate(sr.coded_findings(record.findings.labels)):
        url, ident = local(f"finding-{n}")
        add("Observation", Observation(identifier=[ident], code=concept(name), valueCodeableConcept=concept(value),
                                       **observed), ident, url)
        results.append({"reference": url})
    for label, name, p in sr.coded_probabilities(record.findings):
        url, ident = local(f"probability-{label}")
        quantity = {"value": round(p, 6), "unit": "1", "system": SYSTEMS["UCUM"], "code": "1"}
        add("Observation", Observation(identifier=[ident], code=concept(name), valueQuantity=quantity, **observed),
            ident, url)
        results.append({"reference": url})

    headline = main_finding(record.findings.labels)
    labels = record.findings.labels
    conclusion_code: dict[str, Any] = {"text": headline}
    if is_positive(labels):
        conclusion_code = {**concept(sr.PULMONARY_EMBOLISM), "text": headline}
    elif labels.get("indeterminate"):
        conclusion_code = {**concept(sr.INDETERMINATE), "text": headline}
    report_url = f"urn:uuid:{uuid.uuid5(namespace, 'report')}"
    report_identifier = _oid(uids.sr_instance)  # the report is the SR's content
    add("DiagnosticReport", DiagnosticReport(
        identifier=[report_identifier],
        status="preliminary",
        category=[_RADIOLOGY],
        code=_REPORT_CODE,
        **common,
        effectiveDateTime=_instant(record),
        issued=_instant(record),
        result=results,
        imagingStudy=[study],
        **({"basedOn": [order]} if order else {}),
        conclusion=f"{headline}. AI triage priority {record.priority.value}. {identity.disclaimer(record.meaningless)}",
        conclusionCode=[conclusion_code],
    ), report_identifier, report_url)

    task_url, task_identifier = local("task")
    add("Task", Task(
        identifier=[task_identifier],
        status="requested",
        intent="proposal",
        priority=PRIORITY[record.priority],
        code={"text": "Read the study (AI triage priority)"},
        description=f"AI PE triage: {record.priority.value} - {headline}",
        focus=study,
        **({"for_fhir": subject} if subject else {}),
        **({"basedOn": [order]} if order else {}),
        authoredOn=_instant(record),
        requester={"reference": device_url},
        reasonReference={"reference": report_url},
        note=[{"text": identity.disclaimer(record.meaningless)}],
    ), task_identifier, task_url)

    return Bundle(type="transaction", entry=entries)


def bundle_json(bundle: Bundle, indent: int | None = None) -> str:
    """The Bundle as FHIR JSON."""
    return json.dumps(json.loads(bundle.model_dump_json(exclude_none=True)), indent=indent, ensure_ascii=False)


def outcome_text(body: bytes) -> str:
    """The words of an OperationOutcome (its issues' details or diagnostics), else the start of the body."""
    try:
        data = json.loads(body.decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        return body.decode("utf-8", errors="replace").strip()[:300]
    if not isinstance(data, dict) or data.get("resourceType") != "OperationOutcome":
        return ""
    words = []
    for issue in data.get("issue") or []:
        if isinstance(issue, dict):
            text = (issue.get("details") or {}).get("text") or issue.get("diagnostics") or issue.get("code") or ""
            words.append(f"{issue.get('severity', 'error')}: {text}")
    return "; ".join(words)[:500]


def post_bundle(dest: FHIRDestination, body: str) -> Delivery:
    """POST ``body`` (a transaction Bundle) to the destination's base URL and map the answer."""
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON, "User-Agent": "pe-triage-node"}
    if dest.bearer_token is not None:
        headers["Authorization"] = f"Bearer {dest.bearer_token.get_secret_value()}"
    req = urllib.request.Request(dest.url, data=body.encode("utf-8"), method="POST", headers=headers)
    context = ssl.create_default_context(cafile=str(dest.ca_certificates)) if dest.ca_certificates else None
    try:
        with urllib.request.urlopen(req, timeout=dest.timeout_s, context=context) as rsp:  # noqa: S310 - URL from validated config
            status, answer = int(rsp.status), b""
    except urllib.error.HTTPError as exc:
        status, answer = int(exc.code), exc.read(65536)
    except (OSError, ValueError) as exc:
        log.warning("FHIR to %s: not sent (%s)", dest.name, type(exc).__name__)
        return Delivery.retry(f"{dest.name}: {type(exc).__name__}: {exc}"[:500])
    outcome = http_outcome(status)
    log.info("FHIR to %s: HTTP %d (%s)", dest.name, status, outcome.value)
    said = outcome_text(answer)
    return Delivery(outcome, f"{dest.name}: HTTP {status}" + (f": {said}" if said else ""))
