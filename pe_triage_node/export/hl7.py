"""HL7 v2.5.1 ORU^R01 for the RIS/EHR: the findings, the priority and the disclaimer, sent over MLLP.

:func:`build_oru` is a pure function of a :class:`~.record.ResultRecord` (built
and checked with ``hl7apy`` at its strict validation level)::

    MSH  ...|ORU^R01^ORU_R01|<control id>|P|2.5.1|...|UNICODE UTF-8
    SFT  pe-triage-node and its version
    PID  PID-3 PatientID, PID-5 name (DICOM PN -> XPN), PID-7 birth date, PID-8 sex
    ORC  RE, ORC-2 placer / ORC-3 filler order number = AccessionNumber, ORC-7.6 priority
    OBR  OBR-2/3 = AccessionNumber, OBR-4 CT angiography (SCT), OBR-7 study date/time,
         OBR-20 StudyInstanceUID, OBR-22 result time, OBR-24 CT, OBR-25 P (preliminary), OBR-27.6 priority
    NTE  NOT FOR DIAGNOSTIC USE ...
    TQ1  TQ1-9 priority: S (STAT), A (URGENT: ASAP), R (ROUTINE), HL7 table 0485
    OBX  RP  (113014, DCM, "Study"): StudyInstanceUID^&1.2.840.10008&ISO^Application^DICOM
    OBX  ST  (121073, DCM, "Impression"): "AI PE triage: central PE, RV/LV>=1 - priority STAT"
    OBX  CE  one per finding, the SR's codes (SNOMED CT where one exists, else 99PETRIAGE)
    OBX  CE  the triage priority (99PETRIAGE)
    OBX  NM  one per probability, unit 1 (UCUM)
    OBX  ST  (111001, DCM, "Algorithm Name"), (111003, DCM, "Algorithm Version")

Every OBX has result status P (preliminary). Without an AccessionNumber the
order numbers carry the StudyInstanceUID instead (ORC/OBR need one of them).

:func:`send_oru` sends one message over MLLP and waits for the ACK (bounded by
the destination's ``timeout_s``): AA delivered, AE retried, AR dead with the
reason the peer gave (MSA-3, ERR-8); no answer, a refused connection or an ACK
for another message is retried. The message carries patient data: it is never
logged (the ACK code and the control id are).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import socket
import time
from dataclasses import dataclass

import highdicom as hd
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Group, Message, Segment
from hl7apy.parser import parse_segment
from pydicom.sr.codedict import codes

from pe_triage_node.config import HL7Destination
from pe_triage_node.export import identity, sr
from pe_triage_node.export.delivery import Delivery
from pe_triage_node.export.findings import main_finding
from pe_triage_node.export.record import ResultRecord
from pe_triage_node.rules import Priority

log = logging.getLogger(__name__)

VERSION = "2.5.1"
CHARACTER_SET = "UNICODE UTF-8"  # HL7 table 0211
#: HL7 table 0485 (Extended Priority Codes): our three priorities.
PRIORITY_CODES: dict[Priority, tuple[str, str]] = {
    Priority.STAT: ("S", "Stat"),
    Priority.URGENT: ("A", "ASAP"),
    Priority.ROUTINE: ("R", "Routine"),
}
RESULT_STATUS = "P"  # preliminary (HL7 tables 0123 and 0085)
#: RP.2 of the study reference: the application ID as the DICOM UID root (ISO), the pointer a DICOM UID.
DICOM_ROOT = "1.2.840.10008"

MLLP_START, MLLP_END = b"\x0b", b"\x1c\x0d"
MAX_ACK_BYTES = 1 << 20


# -- building -----------------------------------------------------------------


def escape(value: str) -> str:
    """A value made safe for one HL7 component (HL7 v2.5.1 section 2.7): delimiters escaped, control characters to spaces."""
    out = value.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("&", "\\T\\").replace("~", "\\R\\")
    return re.sub(r"[\r\n\x00-\x1f]", " ", out)


def _components(*values: str) -> str:
    return "^".join(escape(v) for v in values).rstrip("^")


def _code(concept: hd.sr.CodedConcept) -> str:
    """A code as CE: identifier^text^coding system. The SR's scheme designators (SCT, DCM, UCUM) are HL7
    table 0396's names too, and a "99..." scheme is a local one there as well."""
    return _components(concept.value, concept.meaning, concept.scheme_designator)


def hl7_time(when: dt.datetime) -> str:
    """``YYYYMMDDHHMMSS+ZZZZ`` (HL7 DTM)."""
    return when.strftime("%Y%m%d%H%M%S%z")


def dicom_datetime(date: str, time_: str) -> str:
    """DICOM DA + TM as HL7 DTM (digits only, at most 4 fraction digits); empty when the date is unknown."""
    date = re.sub(r"\D", "", date)[:8]
    if len(date) != 8:
        return ""
    whole, _, fraction = time_.partition(".")
    whole = re.sub(r"\D", "", whole)[:6]
    fraction = re.sub(r"\D", "", fraction)[:4]
    return date + whole + (f".{fraction}" if fraction and len(whole) == 6 else "")


def person_name(pn: str) -> str:
    """DICOM PN (Family^Given^Middle^Prefix^Suffix, first component group) as XPN (Family^Given^Middle^Suffix^Prefix)."""
    parts = (pn.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
    return _components(family, given, middle, suffix, prefix)


def _sex(value: str) -> str:
    """DICOM M/F/O as HL7 table 0001 (M, F, O; anything else U)."""
    return value if value in ("M", "F", "O") else ("U" if value else "")


@dataclass(frozen=True)
class MessageHeader:
    """MSH-3 to MSH-6 and MSH-11 (an :class:`HL7Destination` gives them; these defaults for ``infer --outputs``)."""

    sending_application: str = "PETRIAGE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: str = "P"

    @classmethod
    def of(cls, dest: HL7Destination) -> MessageHeader:
        return cls(dest.sending_application, dest.sending_facility, dest.receiving_application,
                   dest.receiving_facility, dest.processing_id)


def _observation(order: Group, n: int, value_type: str, concept: str, value: str, when: str, units: str = "") -> None:
    obx = order.add_group("ORU_R01_OBSERVATION").obx
    obx.obx_1 = str(n)
    obx.obx_2 = value_type
    obx.obx_3 = concept
    obx.obx_5 = value
    if units:
        obx.obx_6 = units
    obx.obx_11 = RESULT_STATUS
    obx.obx_14 = when


def build_oru(record: ResultRecord, *, control_id: str, now: dt.datetime, header: MessageHeader | None = None) -> str:
    """The ORU^R01 message as ER7 text (segments separated by carriage returns); raises
    :class:`hl7apy.exceptions.HL7apyException` if it does not validate (a bug, never the data)."""
    header = header or MessageHeader()
    msg = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    msh = msg.msh
    msh.msh_3 = escape(header.sending_application)
    msh.msh_4 = escape(header.sending_facility)
    msh.msh_5 = escape(header.receiving_application)
    msh.msh_6 = escape(header.receiving_facility)
    msh.msh_7 = hl7_time(now)
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = escape(control_id)
    msh.msh_11 = header.processing_id
    msh.msh_12 = VERSION
    msh.msh_18 = CHARACTER_SET
    sft = msg.add_segment("SFT")
    sft.sft_1 = escape(identity.MANUFACTURER)
    sft.sft_2 = escape(identity.SOFTWARE_VERSION)
    sft.sft_3 = escape(identity.MANUFACTURER)
    sft.sft_4 = escape(identity.SOFTWARE_VERSION)

    result = msg.add_group("ORU_R01_PATIENT_RESULT")
    pid = result.add_group("ORU_R01_PATIENT").pid
    patient = record.patient
    pid.pid_1 = "1"
    pid.pid_3 = escape(patient.patient_id)
    if patient.patient_name:
        pid.pid_5 = person_name(patient.patient_name)
    if re.fullmatch(r"\d{8}", patient.birth_date):
        pid.pid_7 = patient.birth_date
    if patient.sex:
        pid.pid_8 = _sex(patient.sex)

    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    order_number = escape(patient.accession_number or record.study_instance_uid)
    priority_code, priority_text = PRIORITY_CODES[record.priority]
    when = hl7_time(record.created_at)
    orc = order.orc
    orc.orc_1 = "RE"
    orc.orc_2 = order_number
    orc.orc_3 = order_number
    orc.orc_7 = f"^^^^^{priority_code}"
    orc.orc_9 = when
    obr = order.obr
    obr.obr_1 = "1"
    obr.obr_2 = order_number
    obr.obr_3 = order_number
    obr.obr_4 = _code(sr.CT_ANGIOGRAPHY)
    study_time = dicom_datetime(patient.study_date, patient.study_time)
    if study_time:
        obr.obr_7 = study_time
    obr.obr_20 = record.study_instance_uid
    obr.obr_22 = when
    obr.obr_24 = "CT"
    obr.obr_25 = RESULT_STATUS
    obr.obr_27 = f"^^^^^{priority_code}"
    nte = order.add_segment("NTE")
    nte.nte_1 = "1"
    nte.nte_2 = "L"
    nte.nte_3 = escape(identity.disclaimer(record.meaningless))
    tq1 = order.add_group("ORU_R01_TIMING_QTY").tq1
    tq1.tq1_1 = "1"
    tq1.tq1_9 = _components(priority_code, priority_text, "HL70485")

    n = 0

    def add(value_type: str, concept: str, value: str, units: str = "") -> None:
        nonlocal n
        n += 1
        _observation(order, n, value_type, concept, value, when, units)

    study = codes.DCM.Study  # (113014, DCM, "Study")
    add("RP", _components(study.value, study.meaning, "DCM"), f"{record.study_instance_uid}^&{DICOM_ROOT}&ISO^Application^DICOM")
    impression = codes.DCM.Impression  # (121073, DCM, "Impression"): the headline, in the findings' wording
    add("ST", _components(impression.value, impression.meaning, "DCM"),
        escape(f"AI PE triage: {main_finding(record.findings.labels)} - priority {record.priority.value}"))
    for concept, value in sr.coded_findings(record.findings.labels):
        add("CE", _code(concept), _code(value))
    add("CE", _code(sr.private_code("TRIAGE-PRIORITY")), _code(sr.private_code(sr.PRIORITY_CODES[record.priority])))
    for _, concept, p in sr.coded_probabilities(record.findings):
        add("NM", _code(concept), f"{p:.6f}".rstrip("0").rstrip(".") or "0", _code(sr.NO_UNITS))
    add("ST", _components(codes.DCM.AlgorithmName.value, codes.DCM.AlgorithmName.meaning, "DCM"), escape(record.model_name))
    add("ST", _components(codes.DCM.AlgorithmVersion.value, codes.DCM.AlgorithmVersion.meaning, "DCM"), escape(record.model_version))

    msg.validate()
    return str(msg.to_er7())


# -- sending ------------------------------------------------------------------


def mllp_exchange(host: str, port: int, message: bytes, timeout_s: float) -> bytes:
    """Send one MLLP-framed message and return the peer's framed answer (its content), all within ``timeout_s``.

    Raises :class:`OSError` (refused, reset, closed before answering) or :class:`TimeoutError`.
    """
    deadline = time.monotonic() + timeout_s
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(MLLP_START + message + MLLP_END)
        buf = b""
        while MLLP_END not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no ACK within {timeout_s:g} s")
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the peer closed the connection without an ACK")
            buf += chunk
            if len(buf) > MAX_ACK_BYTES:
                raise ConnectionError("the peer's answer is too long for an ACK")
    start = buf.find(MLLP_START)
    return buf[start + 1 if start >= 0 else 0:buf.index(MLLP_END)]


@dataclass(frozen=True)
class Ack:
    """MSA-1 (AA, AE, AR or the enhanced-mode CA, CE, CR), MSA-2 and the peer's reason (MSA-3, ERR-8)."""

    code: str
    control_id: str
    reason: str


def _unescape(value: str) -> str:
    for seq, char in (("\\F\\", "|"), ("\\S\\", "^"), ("\\T\\", "&"), ("\\R\\", "~"), ("\\E\\", "\\")):
        value = value.replace(seq, char)
    return value


def parse_ack(raw: bytes) -> Ack:
    """The MSA (and ERR) of an ACK; raises :class:`ValueError` when there is none."""
    text = raw.decode("utf-8", errors="replace")
    segments = [s for s in re.split(r"\r\n|\r|\n", text) if s]
    if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 8:
        raise ValueError("the answer is not an HL7 message")
    encoding = {"FIELD": segments[0][3], "COMPONENT": segments[0][4], "REPETITION": segments[0][5],
                "ESCAPE": segments[0][6], "SUBCOMPONENT": segments[0][7]}
    found: dict[str, Segment] = {}
    for line in segments[1:]:
        name = line[:3]
        if name in ("MSA", "ERR") and name not in found:
            found[name] = parse_segment(line, version=VERSION, encoding_chars=encoding,
                                        validation_level=VALIDATION_LEVEL.TOLERANT)
    msa = found.get("MSA")
    if msa is None:
        raise ValueError("the answer has no MSA segment")
    reasons = [msa.msa_3.value if msa.msa_3.value else ""]
    err = found.get("ERR")
    if err is not None:
        reasons += [err.err_8.value or "", err.err_3.to_er7() or ""]
    reason = "; ".join(_unescape(str(r)) for r in reasons if r)
    return Ack(code=str(msa.msa_1.value or ""), control_id=str(msa.msa_2.value or ""), reason=reason[:500])


def ack_delivery(ack: Ack, control_id: str) -> Delivery:
    """AA/CA delivered; AE/CE retried; AR/CR dead; an ACK for another message retried."""
    if ack.control_id != control_id:
        return Delivery.retry(f"ACK {ack.code} answers message {ack.control_id!r}, not {control_id!r}")
    said = f"ACK {ack.code}" + (f": {ack.reason}" if ack.reason else "")
    if ack.code in ("AA", "CA"):
        return Delivery.delivered(said)
    if ack.code in ("AR", "CR"):
        return Delivery.dead(f"rejected, {said}")
    return Delivery.retry(said)


def send_oru(dest: HL7Destination, message: str, control_id: str) -> Delivery:
    """Send ``message`` to ``dest`` over MLLP and map its ACK (never raises for network trouble)."""
    try:
        raw = mllp_exchange(dest.host, dest.port, message.encode("utf-8"), dest.timeout_s)
        ack = parse_ack(raw)
    except (OSError, ValueError) as exc:
        log.warning("HL7 to %s: message %s not acknowledged (%s)", dest.name, control_id, type(exc).__name__)
        return Delivery.retry(f"{dest.name}: MLLP {dest.host}:{dest.port}: {type(exc).__name__}: {exc}"[:500])
    outcome = ack_delivery(ack, control_id)
    log.info("HL7 to %s: message %s answered %s (%s)", dest.name, control_id, ack.code, outcome.outcome.value)
    return Delivery(outcome.outcome, f"{dest.name}: {outcome.detail}")
