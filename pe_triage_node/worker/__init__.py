"""The inference worker: ``infer`` jobs from the SQL queue -> result, outputs, export jobs.

* :class:`~.inference_worker.InferenceWorker` - claims one job at a time, heartbeats
  from a thread, runs the engine (loaded once), stores the ``results`` row with the SR
  and queues it to each destination, then renders the Secondary Captures and the KOS
  and queues them to each DICOM / DICOMweb destination.
* :func:`~.inference_worker.run_worker_service` - the ``pe-triage worker`` process
  (signals, the claim loop woken by new jobs, polling as the fallback).

Sub-modules import torch only when the engine is built, so importing this package is cheap.
"""

from __future__ import annotations

from pe_triage_node.worker.inference_worker import (
    InferenceWorker,
    JobOutcome,
    run_worker_service,
)

__all__ = ["InferenceWorker", "JobOutcome", "run_worker_service"]
