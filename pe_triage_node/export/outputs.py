"""Everything the node sends back for one analysed series: the SR, the Secondary Captures, the key images (KOS).

``render_outputs`` builds them in memory from the result and the loaded
volume (its headers, as :func:`~.source.source_header` copies them, and its
HU); ``write_outputs`` also writes them as DICOM Part 10 files (what the
export jobs send and what ``pe-triage infer --outputs`` leaves for
inspection), and PNG copies of the SCs for the web study page. File names are
the SOP Instance UIDs, which are derived (see
:mod:`pe_triage_node.export.identity`): a re-run of the same generation writes
the same files; a corrected result writes new ones.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from pe_triage_node.export import identity
from pe_triage_node.export.kos import build_kos, key_slices
from pe_triage_node.export.sc import build_gradcam_sc, build_summary_sc
from pe_triage_node.export.source import library_warnings_logged, slice_reference, source_header
from pe_triage_node.export.sr import build_sr
from pe_triage_node.inference.result import StudyResult
from pe_triage_node.inference.volume import CTVolume
from pe_triage_node.rules import PriorityDecision, Triage, parse_rules, triage

log = logging.getLogger(__name__)

#: Names of the PNG copies of the SCs (the web study page shows them).
SUMMARY_PNG = "summary.png"
GRADCAM_PNG = "gradcam-{n}.png"


def warm_up() -> None:
    """Load highdicom's tables of the standard (IODs, modules) now, not on the first study.

    They are parsed from JSON once per process (about 0.6 s); a worker calls this at start-up.
    """
    from highdicom import _standard_utils as standard

    for name in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
        loader = getattr(standard, name, None)
        if callable(loader):
            loader()


@dataclass(frozen=True)
class OutputSource:
    """What every output of one result is rendered from: the series' headers (as the outputs copy them) and the UIDs."""

    result: StudyResult
    volume: CTVolume
    decision: PriorityDecision
    headers: list[Dataset]
    uids: identity.OutputUIDs
    previous: identity.OutputUIDs | None

    @classmethod
    def of(
        cls,
        result: StudyResult,
        volume: CTVolume,
        decision: PriorityDecision,
        *,
        uid_prefix: str = identity.OUTPUT_UID_PREFIX,
        generation: int = 0,
        previous: identity.OutputUIDs | None = None,
    ) -> OutputSource:
        """``volume``: the analysed series, loaded with ``keep_datasets=True`` (its headers); the SCs
        take each slice's HU from it. ``generation``: the series generation analysed (part of every
        UID); ``previous``: the output set this result corrects, named by the SR as its predecessor."""
        if not volume.datasets:
            raise ValueError("the outputs need the series' headers: load the volume with keep_datasets=True")
        # Patient, study and equipment from the first slice and each Grad-CAM slice; UIDs and geometry of the rest.
        cam_sops = {gc.sop_instance_uid for gc in result.gradcam}
        full = {0} | {i for i, ds in enumerate(volume.datasets) if ds.SOPInstanceUID in cam_sops}
        headers = [source_header(ds) if i in full else slice_reference(ds) for i, ds in enumerate(volume.datasets)]
        uids = identity.OutputUIDs(result.series_instance_uid, result.model_version, uid_prefix, generation)
        return cls(result, volume, decision, headers, uids, previous)


def render_sr(source: OutputSource) -> Dataset:
    """The SR: what a reader needs first (the worker sends it before the images are rendered)."""
    r = source.result
    with library_warnings_logged(f"outputs of series={r.series_instance_uid}"):
        return build_sr(r, source.decision, source.headers, source.uids, previous=source.previous)


def render_images(source: OutputSource) -> list[Dataset]:
    """The summary SC, one Grad-CAM SC per map and, when there are maps, the KOS (last)."""
    r, decision, uids = source.result, source.decision, source.uids
    by_sop = {str(h.SOPInstanceUID): h for h in source.headers}
    slice_hu = source.volume.slice_hu
    with library_warnings_logged(f"outputs of series={r.series_instance_uid}"):
        out: list[Dataset] = [build_summary_sc(r, decision, source.headers, uids, slice_hu)]
        for index, gc in enumerate(r.gradcam):
            src = by_sop.get(gc.sop_instance_uid)
            if src is None:
                log.warning("grad-cam %d: source slice not in the series given, skipped series=%s", index, r.series_instance_uid)
                continue
            out.append(build_gradcam_sc(r, decision, gc, index, src, uids, slice_hu))
        slices = key_slices(r, by_sop)
        if slices:
            out.append(build_kos(r, decision, slices, uids))
    return out


def render_outputs(source: OutputSource) -> list[Dataset]:
    """The SR (first), the summary SC, one Grad-CAM SC per map and, when there are maps, the KOS (last)."""
    out = [render_sr(source), *render_images(source)]
    log.info("rendered %d output objects series=%s priority=%s", len(out), source.result.series_instance_uid,
             source.decision.priority.value)
    return out


def output_filename(ds: Dataset) -> str:
    """``SR_<UID>.dcm`` / ``KO_<UID>.dcm`` / ``SC_<UID>.dcm`` (the SOP Instance UID is ours: digits and dots)."""
    kind = ds.Modality if ds.Modality in ("SR", "KO") else "SC"
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


def write_pngs(datasets: list[Dataset], out_dir: Path) -> list[Path]:
    """PNG copies of the Secondary Captures (``datasets`` in :func:`render_outputs` order):
    :data:`SUMMARY_PNG`, then ``gradcam-1.png``, ..."""
    from PIL import Image

    paths = []
    scs = [ds for ds in datasets if "PixelData" in ds]
    for i, ds in enumerate(scs):
        arr = ds.pixel_array
        name = SUMMARY_PNG if i == 0 else GRADCAM_PNG.format(n=i)
        tmp = out_dir / f".tmp-{name}"
        Image.fromarray(arr, "RGB" if arr.ndim == 3 else "L").save(tmp, format="PNG")
        os.replace(tmp, out_dir / name)
        paths.append(out_dir / name)
    return paths


def write_datasets(datasets: list[Dataset], out_dir: Path, *, pngs: bool = False) -> list[Path]:
    """Write rendered outputs under ``out_dir`` (and PNGs of their SCs when ``pngs``); returns the paths, in order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = out_dir / output_filename(ds)
        save_atomically(ds, path)
        paths.append(path)
    if pngs:
        write_pngs(datasets, out_dir)
    return paths


def write_outputs(source: OutputSource, out_dir: Path, *, pngs: bool = False) -> list[Path]:
    """Render and write the outputs under ``out_dir`` (and their PNGs when ``pngs``); returns the DICOM paths, SR first."""
    return write_datasets(render_outputs(source), out_dir, pngs=pngs)


def standalone_triage(result: StudyResult, volume: CTVolume, rules_path: Path | None = None) -> Triage:
    """The priority from the rules in force without a database (``rules_path``, else
    ``config/rules.toml``, else the packaged defaults), decided as the worker decides it."""
    from pe_triage_node.rules.store import fallback_rules_text

    rules = parse_rules(*fallback_rules_text(rules_path))
    with library_warnings_logged(f"rules attributes of series={result.series_instance_uid}"):
        return triage(result, volume.datasets[0], rules)
