"""The inference worker: ``infer`` jobs from the SQL queue -> result, outputs, export jobs.

* :class:`~.inference_worker.InferenceWorker` - claims one job at a time, heartbeats
  from a thread, runs the engine (loaded once), stores the ``results`` row, renders
  the SR and Secondary Captures, queues one export job per destination.
* :func:`~.inference_worker.run_worker_service` - the ``pe-triage worker`` process
  (signals, polling loop).

Sub-modules import torch only when the engine is built, so importing this package is cheap.
"""

from __future__ import annotations

from pe_triage_node.worker.inference_worker import (
    InferenceWorker,
    JobOutcome,
    run_worker_service,
)

__all__ = ["InferenceWorker", "JobOutcome", "run_worker_service"]
