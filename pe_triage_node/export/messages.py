"""The HL7 and FHIR payloads of one result as files, for a site to read before it connects anything
(``pe-triage infer --outputs``): exactly what the exporter would build for the same result."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from pe_triage_node.export import identity
from pe_triage_node.export.fhir import build_bundle, bundle_json
from pe_triage_node.export.hl7 import build_oru
from pe_triage_node.export.record import ResultRecord

#: MSH-10 of a message written for reading (the exporter numbers the ones it sends by job).
PREVIEW_CONTROL_ID = "PREVIEW"


def write_messages(record: ResultRecord, out_dir: Path, *, uid_prefix: str = identity.OUTPUT_UID_PREFIX) -> list[Path]:
    """Write ``hl7/ORU_<SR UID>.hl7`` (ER7, MSH-3 to MSH-6 at their defaults) and ``fhir/Bundle_<SR UID>.json``
    under ``out_dir``; returns their paths."""
    name = record.output_uids(uid_prefix).sr_instance
    oru = out_dir / "hl7" / f"ORU_{name}.hl7"
    bundle = out_dir / "fhir" / f"Bundle_{name}.json"
    for path in (oru, bundle):
        path.parent.mkdir(parents=True, exist_ok=True)
    oru.write_bytes(build_oru(record, control_id=PREVIEW_CONTROL_ID, now=dt.datetime.now(dt.UTC)).encode("utf-8"))
    bundle.write_text(bundle_json(build_bundle(record, uid_prefix=uid_prefix), indent=1) + "\n", encoding="utf-8")
    return [oru, bundle]
