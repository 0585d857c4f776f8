"""DICOMweb STOW-RS (PS3.18 10.5): the SR, SCs and KOS to an archive's DICOMweb service, with ``dicomweb-client``.

One POST of all the files (multipart/related; type="application/dicom") to
``<url>/studies``. 200 stored; 202 with a Failed SOP Sequence (some refused)
retried, the reasons recorded; other answers by their HTTP status (4xx dead,
5xx retried); network trouble retried. The client's own retries are off: the
export queue retries with its backoff. Logs carry the destination and status,
never patient data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from pe_triage_node.config import DicomWebDestination
from pe_triage_node.export.delivery import Delivery, http_outcome

log = logging.getLogger(__name__)


def client_for(dest: DicomWebDestination) -> DICOMwebClient:
    """A DICOMweb client for ``dest``: its CA bundle, bearer token and timeout; no retries of its own."""
    session = requests.Session()
    if dest.ca_certificates is not None:
        session.verify = str(dest.ca_certificates)
    headers = {"Authorization": f"Bearer {dest.bearer_token.get_secret_value()}"} if dest.bearer_token else None
    client = DICOMwebClient(url=dest.url.rstrip("/"), session=session, headers=headers, timeout=dest.timeout_s)
    client.set_http_retry_params(retry=False)
    return client


def _failures(response: pydicom.Dataset) -> list[str]:
    failed = response.get("FailedSOPSequence") or []
    return [f"{item.get('ReferencedSOPInstanceUID', '?')}: failure reason 0x{int(item.get('FailureReason', 0)):04X}"
            for item in failed]


def stow(dest: DicomWebDestination, paths: Sequence[Path]) -> Delivery:
    """STOW-RS every file in ``paths`` in one request; returns the outcome (never raises for network trouble)."""
    datasets = [pydicom.dcmread(p) for p in paths]
    try:
        response = client_for(dest).store_instances(datasets)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        log.warning("STOW-RS to %s: HTTP %d", dest.name, status)
        body = exc.response.text[:300] if exc.response is not None else ""
        return Delivery(http_outcome(status), f"{dest.name}: STOW-RS HTTP {status}" + (f": {body}" if body else ""))
    except (requests.RequestException, OSError) as exc:
        log.warning("STOW-RS to %s: not sent (%s)", dest.name, type(exc).__name__)
        return Delivery.retry(f"{dest.name}: STOW-RS {type(exc).__name__}: {exc}"[:500])
    failures = _failures(response)
    if failures:
        log.warning("STOW-RS to %s: %d of %d refused", dest.name, len(failures), len(datasets))
        return Delivery.retry(f"{dest.name}: STOW-RS refused {len(failures)} of {len(datasets)}: " + "; ".join(failures)[:400])
    log.info("STOW-RS to %s: %d stored", dest.name, len(datasets))
    return Delivery.delivered(f"{dest.name}: STOW-RS {len(datasets)} stored")
