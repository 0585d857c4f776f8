"""Key images: a Key Object Selection document (PS3.3 A.35.4, PS3.16 TID 2010) naming the source slices
behind the Grad-CAM overlays, so a viewer that shows key images opens the study at the clot.

Title (113000, DCM, "Of Interest"), the CID 7010 title that IHE Key Image Note viewers show as
key images; the Key Object Description (113012, DCM) says they are for review, what the AI found and
"NOT FOR DIAGNOSTIC USE"; the observer is the algorithm (the SR's device observer). The slices are
listed highest Grad-CAM peak first, each once, and the evidence names the original series (Current
Requested Procedure Evidence Sequence). A result without Grad-CAM maps (no positive finding) has no
key images and no KOS. UIDs are derived like the SR's (:mod:`~pe_triage_node.export.identity`).
"""

from __future__ import annotations

from collections.abc import Mapping

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from pe_triage_node.export import identity
from pe_triage_node.export.findings import main_finding, series_description
from pe_triage_node.export.sr import device_observer
from pe_triage_node.inference.result import StudyResult
from pe_triage_node.rules import PriorityDecision

#: The document title (CID 7010).
KOS_TITLE = codes.cid7010.OfInterest


def key_slices(result: StudyResult, by_sop: Mapping[str, Dataset]) -> list[Dataset]:
    """The source slices behind the Grad-CAM maps, highest peak first, each once (those in ``by_sop``)."""
    out: dict[str, Dataset] = {}
    for gc in sorted(result.gradcam, key=lambda g: -g.peak_value):
        ds = by_sop.get(gc.sop_instance_uid)
        if ds is not None and gc.sop_instance_uid not in out:
            out[gc.sop_instance_uid] = ds
    return list(out.values())


def key_object_description(result: StudyResult, decision: PriorityDecision) -> str:
    """``For review: AI PE triage key images - STAT - central PE. NOT FOR DIAGNOSTIC USE ...``"""
    text = f"For review: AI PE triage key images - {decision.priority.value} - {main_finding(result.labels)}. "
    return (text + identity.disclaimer(result.meaningless))[:1024]


def build_kos(
    result: StudyResult, decision: PriorityDecision, slices: list[Dataset], uids: identity.OutputUIDs
) -> hd.ko.KeyObjectSelectionDocument:
    """The KOS referencing ``slices`` (source headers as :func:`~.source.source_header` copies them).

    Raises :class:`ValueError` when ``slices`` is empty.
    """
    if not slices:
        raise ValueError("a Key Object Selection needs at least one key image")
    content = hd.ko.KeyObjectSelection(
        document_title=KOS_TITLE,
        referenced_objects=slices,
        observer_device_context=device_observer(result, uids.prefix),
        description=key_object_description(result, decision),
    )
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=slices,
        content=content,
        series_instance_uid=uids.kos_series,
        series_number=identity.KOS_SERIES_NUMBER,
        sop_instance_uid=uids.kos_instance,
        instance_number=1,
        manufacturer=identity.MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    kos.SeriesDescription = series_description(decision, result.labels, " (key images)")
    return kos
