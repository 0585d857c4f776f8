"""C-STORE SCU: send the node's output files to one destination in one association (PS3.4 B.2, PS3.7 9.1.1).

Only the presentation contexts needed are proposed: one per SOP class sent,
offering the files' own transfer syntax plus Implicit VR Little Endian (the
default every SCP must accept, PS3.5 10.1). Statuses (PS3.4 B.2.3):

* 0x0000 success, and the warnings 0xB000 (coercion of data elements),
  0xB006 (elements discarded), 0xB007 (data set does not match SOP class):
  delivered, the warning recorded;
* anything else, or no answer at all: not delivered (the export job retries).

Never raises for network trouble: :func:`send_files` returns a report the
caller turns into the job's outcome. Logs carry AE titles, counts and statuses,
never patient data.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.presentation import PresentationContext

from pe_triage_node.config import DestinationSection

log = logging.getLogger(__name__)

SUCCESS = 0x0000
#: Warning statuses that still mean "stored" (PS3.4 Table B.2-1).
WARNING_DELIVERED = frozenset({0xB000, 0xB006, 0xB007})


@dataclass
class SendReport:
    """What happened to each file: delivered (with its status) or failed (with the reason)."""

    destination: str
    delivered: dict[str, int] = field(default_factory=dict)  # path -> status (0 or a warning)
    failed: dict[str, str] = field(default_factory=dict)  # path -> reason
    association_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.association_error is None and not self.failed

    @property
    def warnings(self) -> dict[str, int]:
        return {p: s for p, s in self.delivered.items() if s != SUCCESS}

    def summary(self) -> str:
        """One line for ``last_error`` / the job event (no patient data)."""
        if self.association_error:
            return f"{self.destination}: {self.association_error}"
        text = f"{self.destination}: {len(self.delivered)} delivered"
        if self.warnings:
            text += " (warnings " + ", ".join(sorted({f"0x{s:04X}" for s in self.warnings.values()})) + ")"
        if self.failed:
            text += f", {len(self.failed)} failed: " + "; ".join(sorted(set(self.failed.values())))[:500]
        return text


def is_delivered(status: int) -> bool:
    """True for success and the warnings that count as stored (0xB000, 0xB006, 0xB007)."""
    return status == SUCCESS or status in WARNING_DELIVERED


def tls_context(dest: DestinationSection) -> ssl.SSLContext:
    """Client TLS context for a destination (PS3.15 B.1): verify the peer; our certificate if configured."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(dest.ca_certificates) if dest.ca_certificates else None)
    if dest.certificate is not None and dest.private_key is not None:
        ctx.load_cert_chain(str(dest.certificate), str(dest.private_key))
    return ctx


def _contexts(datasets: Sequence[Dataset]) -> list[PresentationContext]:
    by_class: dict[str, list[str]] = {}
    for ds in datasets:
        syntaxes = by_class.setdefault(str(ds.SOPClassUID), [])
        ts = str(ds.file_meta.TransferSyntaxUID)
        if ts not in syntaxes:
            syntaxes.append(ts)
    contexts: list[PresentationContext] = []
    for sop_class, syntaxes in by_class.items():
        if ImplicitVRLittleEndian not in syntaxes:
            syntaxes.append(ImplicitVRLittleEndian)
        contexts.append(build_context(sop_class, syntaxes))
    return contexts


def send_files(
    dest: DestinationSection,
    paths: Sequence[Path],
    *,
    calling_ae_title: str,
    acse_timeout_s: float = 30.0,
    dimse_timeout_s: float = 60.0,
    network_timeout_s: float = 60.0,
) -> SendReport:
    """C-STORE every file in ``paths`` to ``dest`` over one association; returns the per-file outcome."""
    report = SendReport(destination=dest.name)
    datasets: list[tuple[str, Dataset]] = []
    for file in paths:
        try:
            datasets.append((str(file), pydicom.dcmread(file)))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            report.failed[str(file)] = f"unreadable output file: {type(exc).__name__}"
    if not datasets:
        if not report.failed:
            report.association_error = "nothing to send"
        return report
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = acse_timeout_s
    ae.dimse_timeout = dimse_timeout_s
    ae.network_timeout = network_timeout_s
    ae.connection_timeout = acse_timeout_s
    ae.requested_contexts = _contexts([ds for _, ds in datasets])
    tls_args = (tls_context(dest), dest.host) if dest.tls else None
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    except (OSError, ssl.SSLError) as exc:  # pragma: no cover - pynetdicom reports most failures as not established
        report.association_error = f"association failed: {type(exc).__name__}: {exc}"
        return report
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted (refused, unreachable or dropped)" if assoc.is_aborted else "not established"
        report.association_error = f"association {why} by {dest.ae_title}@{dest.host}:{dest.port}"
        log.warning("export to %s: association %s", dest.name, why)
        return report
    try:
        for path, ds in datasets:
            if not assoc.is_established:
                report.failed[path] = "association lost"
                continue
            try:
                rsp = assoc.send_c_store(ds)
            except (ValueError, RuntimeError) as exc:  # no accepted context / encoding problem
                report.failed[path] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
            if status is None:
                report.failed[path] = "no C-STORE response (timeout or abort)"
            elif is_delivered(status):
                report.delivered[path] = status
            else:
                report.failed[path] = f"C-STORE status 0x{status:04X}"
    finally:
        if assoc.is_established:
            assoc.release()
    log.info(
        "export to %s: %d delivered (%d with warning), %d failed",
        dest.name, len(report.delivered), len(report.warnings), len(report.failed),
    )
    return report
