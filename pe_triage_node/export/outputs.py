"""Everything the node sends back for one analysed series: the SR and the Secondary Captures.

``render_outputs`` builds them in memory; ``write_outputs`` also writes them as
DICOM Part 10 files (what the export jobs send and what ``pe-triage infer
--outputs`` leaves for inspection). File names are the SOP Instance UIDs, which
are derived (see :mod:`pe_triage_node.export.identity`): a re-run overwrites
the same files.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pe_triage_node.errors import InputRejected
from pe_triage_node.export import identity
from pe_triage_node.export.sc import SliceHU, build_gradcam_sc, build_summary_sc, hu_image
from pe_triage_node.export.sr import build_sr
from pe_triage_node.inference.result import StudyResult
from pe_triage_node.rules import PriorityDecision

log = logging.getLogger(__name__)

SourceLike = Path | str | Sequence[Dataset]


def warm_up() -> None:
    """Load highdicom's tables of the standard (IODs, modules) now, not on the first study.

    They are parsed from JSON once per process (about 0.6 s); a worker calls this at start-up.
    """
    from highdicom import _standard_utils as standard

    for name in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
        loader = getattr(standard, name, None)
        if callable(loader):
            loader()


def load_source_series(source: SourceLike, series_instance_uid: str) -> list[Dataset]:
    """The datasets of ``series_instance_uid``: from a folder (searched recursively) or a given list.

    Raises :class:`InputRejected` when none is found.
    """
    if isinstance(source, (str, Path)):
        found: list[Dataset] = []
        for path in sorted(Path(source).rglob("*")):
            if not path.is_file():
                continue
            try:
                ds = pydicom.dcmread(path)
            except (InvalidDicomError, OSError):
                continue
            if getattr(ds, "SeriesInstanceUID", None) == series_instance_uid and "PixelData" in ds:
                found.append(ds)
    else:
        found = [ds for ds in source if getattr(ds, "SeriesInstanceUID", None) == series_instance_uid]
    if not found:
        raise InputRejected(f"no instance of series {series_instance_uid} in the source given")
    return found


def render_outputs(
    result: StudyResult,
    source: SourceLike,
    decision: PriorityDecision,
    *,
    uid_prefix: str = identity.OUTPUT_UID_PREFIX,
    institution_name: str | None = None,
    gradcam: bool = True,
    summary: bool = True,
    hu_of: SliceHU = hu_image,
) -> list[Dataset]:
    """The SR (first), the summary SC and one Grad-CAM SC per map, for one result.

    ``source``: the analysed series (a folder or its datasets). The SCs take each
    slice's HU from ``hu_of``: by default decoded from the dataset's pixel data;
    the worker passes the loaded volume's (:meth:`CTVolume.slice_hu`), so that
    its datasets need no pixel data.
    """
    datasets = load_source_series(source, result.series_instance_uid)
    by_sop = {ds.SOPInstanceUID: ds for ds in datasets}
    uids = identity.OutputUIDs(result.series_instance_uid, result.model_version, uid_prefix)
    out: list[Dataset] = [build_sr(result, decision, datasets, prefix=uid_prefix, institution_name=institution_name)]
    if summary:
        out.append(build_summary_sc(result, decision, datasets, uids, hu_of))
    if gradcam:
        for index, gc in enumerate(result.gradcam):
            src = by_sop.get(gc.sop_instance_uid)
            if src is None:
                log.warning("grad-cam %d: source slice not in the series given, skipped series=%s", index, result.series_instance_uid)
                continue
            out.append(build_gradcam_sc(result, decision, gc, index, src, uids, hu_of))
    log.info("rendered %d output objects series=%s priority=%s", len(out), result.series_instance_uid, decision.priority.value)
    return out


def output_filename(ds: Dataset) -> str:
    """``SR_<SOPInstanceUID>.dcm`` / ``SC_<SOPInstanceUID>.dcm`` (the UID is ours: digits and dots)."""
    kind = "SR" if ds.Modality == "SR" else "SC"
    return f"{kind}_{ds.SOPInstanceUID}.dcm"


def save_atomically(ds: Dataset, path: Path) -> None:
    """Write a Part 10 file through a temporary file and a rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are for inspection too
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_outputs(
    result: StudyResult,
    source: SourceLike,
    decision: PriorityDecision,
    out_dir: Path,
    *,
    uid_prefix: str = identity.OUTPUT_UID_PREFIX,
    institution_name: str | None = None,
) -> list[Path]:
    """Render and write the outputs under ``out_dir``; returns the file paths (SR first)."""
    paths = []
    for ds in render_outputs(result, source, decision, uid_prefix=uid_prefix, institution_name=institution_name):
        path = Path(out_dir) / output_filename(ds)
        save_atomically(ds, path)
        paths.append(path)
    return paths


def standalone_decision(result: StudyResult, datasets: Sequence[Dataset], rules_path: Path | None = None) -> PriorityDecision:
    """The priority from the rules file in force without a database (``rules_path``, else
    ``config/rules.toml``, else the packaged defaults), for ``pe-triage infer --outputs``."""
    from pe_triage_node.rules import STORED_ATTRIBUTES, parse_rules, priority_for
    from pe_triage_node.rules.store import fallback_rules_text

    text, where = fallback_rules_text(rules_path)
    rules = parse_rules(text, where)
    first = datasets[0]
    attributes = {k: str(v) for k in STORED_ATTRIBUTES if (v := first.get(k)) not in (None, "")}
    return priority_for(result, attributes, rules)


def write_standalone_outputs(
    result: StudyResult,
    dicom_dir: Path,
    out_dir: Path,
    *,
    rules_path: Path | None = None,
    uid_prefix: str = identity.OUTPUT_UID_PREFIX,
) -> tuple[PriorityDecision, list[Path]]:
    """What ``pe-triage infer DICOM_DIR --outputs OUT_DIR`` does: decide the priority and write the SR and SCs."""
    datasets = load_source_series(dicom_dir, result.series_instance_uid)
    decision = standalone_decision(result, datasets, rules_path)
    return decision, write_outputs(result, datasets, decision, out_dir, uid_prefix=uid_prefix)
