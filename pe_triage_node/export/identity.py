"""Who made an output and what it is called: deterministic UIDs, algorithm identity, the disclaimer.

Every object the node sends back to PACS (the TID 1500 SR, the Grad-CAM and
summary Secondary Captures, the Key Object Selection) gets Series and SOP Instance UIDs *derived* from
the analysed source series, its generation, the model version and the
object's kind (and index), never random ones: a re-run of the same model on
the same series generation (a retry, a worker that died) produces the same
UIDs, so a re-send is the same instance again, not a duplicate (PS3.3 C.12.1).

A *corrected* result gets new UIDs: late instances re-open a series (a new
generation) or a new model version analyses it. A PACS keeps the first copy
of a SOP instance it already holds (Orthanc's default ``OverwriteInstances:
false``), so re-using the UIDs would leave the superseded finding in place;
with new UIDs the new objects are stored beside the old ones, and the new SR
names the one it replaces in its Predecessor Documents Sequence (PS3.3
C.17.2.1).

The UIDs come from :func:`pydicom.uid.generate_uid` with ``entropy_srcs``:
a SHA-512 hash of the sources, turned into digits under our prefix (PS3.5 9.1,
at most 64 characters).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import generate_uid

from pe_triage_node import __version__
from pe_triage_node.dicom.uids import is_valid_uid

#: Root of every UID the node derives for its outputs: the project's branch under
#: pydicom's organisation root (the synthetic series use the same branch with
#: random digits and no further dot, so the two can never collide).
OUTPUT_UID_PREFIX = "1.2.826.0.1.3680043.10.1453.1."

#: The words burned into every image and written into every report.
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
DISCLAIMER_TEXT = (
    "NOT FOR DIAGNOSTIC USE. Automated triage by an AI algorithm (UNVERIFIED): "
    "it may miss or invent findings. The images must be read by a radiologist."
)
MEANINGLESS_TEXT = "RANDOM WEIGHTS: THE FINDINGS ARE MEANINGLESS (test output)"


def disclaimer(meaningless: bool) -> str:
    """The not-for-diagnostic-use statement, led by the random-weights warning for a meaningless result."""
    return f"{MEANINGLESS_TEXT}. {DISCLAIMER_TEXT}" if meaningless else DISCLAIMER_TEXT


MANUFACTURER = "pe-triage-node"
SOFTWARE_VERSION = __version__
DEVICE_NAME = "PE triage"

#: Series numbers of the node's outputs (high, so they sort after the scanner's).
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
KOS_SERIES_NUMBER = 9903

# Object kinds, part of each derived UID; never rename (that would change every UID).
KIND_SR_SERIES = "sr-series"
KIND_SR = "sr"
KIND_SC_SERIES = "sc-series"
KIND_SC_SUMMARY = "sc-summary"
KIND_SC_GRADCAM = "sc-gradcam"
KIND_TRACKING = "tracking"
KIND_KOS_SERIES = "kos-series"
KIND_KOS = "kos"


def derived_uid(
    source_series_uid: str, model_version: str, kind: str, index: int = 0, *, generation: int = 0,
    prefix: str = OUTPUT_UID_PREFIX,
) -> str:
    """The UID of output ``kind`` (``index``-th of that kind) for one source series generation and model version.

    Equal inputs give equal UIDs (a re-run is the same instance); any different
    input gives a different UID. Raises :class:`ValueError` for a source UID
    that is not a UID.
    """
    if not is_valid_uid(source_series_uid):
        raise ValueError(f"not a valid source Series Instance UID: {source_series_uid!r}")
    if not model_version:
        raise ValueError("model_version must not be empty")
    sources = ["pe-triage-output/1", source_series_uid, model_version, kind, str(int(index))]
    if generation:  # generation 0 keeps the UIDs the node derived before generations were part of them
        sources.append(f"generation {int(generation)}")
    return str(generate_uid(prefix, entropy_srcs=sources))


def device_uid(model_name: str, model_version: str, *, prefix: str = OUTPUT_UID_PREFIX) -> str:
    """The Device Observer UID (TID 1004) of one model version: the same on every report it writes."""
    return str(generate_uid(prefix, entropy_srcs=["pe-triage-device/1", model_name, model_version]))


@dataclass(frozen=True)
class OutputUIDs:
    """The UIDs of one output set (one source series generation, one model version): the SR and every SC."""

    source_series_uid: str
    model_version: str
    prefix: str = OUTPUT_UID_PREFIX
    generation: int = 0

    def _uid(self, kind: str, index: int = 0) -> str:
        return derived_uid(self.source_series_uid, self.model_version, kind, index, generation=self.generation, prefix=self.prefix)

    @property
    def tracking(self) -> str:
        """Tracking UID of the finding (TID 1501)."""
        return self._uid(KIND_TRACKING)

    @property
    def sr_series(self) -> str:
        return self._uid(KIND_SR_SERIES)

    @property
    def sr_instance(self) -> str:
        return self._uid(KIND_SR)

    @property
    def sc_series(self) -> str:
        return self._uid(KIND_SC_SERIES)

    @property
    def sc_summary(self) -> str:
        return self._uid(KIND_SC_SUMMARY)

    def sc_gradcam(self, index: int) -> str:
        """SOP Instance UID of the ``index``-th Grad-CAM overlay (in the result's order)."""
        return self._uid(KIND_SC_GRADCAM, index)

    @property
    def kos_series(self) -> str:
        return self._uid(KIND_KOS_SERIES)

    @property
    def kos_instance(self) -> str:
        """SOP Instance UID of the Key Object Selection (the key images)."""
        return self._uid(KIND_KOS)


def algorithm_parameters(thresholds: dict[str, float]) -> list[str]:
    """TID 4019 "Algorithm Parameters" values: one ``label >= threshold`` text per label."""
    return [f"threshold {name} >= {value:g}" for name, value in thresholds.items()]
