"""``/metrics``: Prometheus text exposition computed from the database at scrape time.

A custom collector queries counts on every scrape, so several console processes
(or a restart) always report the same numbers. Inference durations come from
``results.result_json`` (``timings_s``); each result's duration is read once
and kept in memory, later scrapes only read the new rows.
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from pe_triage_node.db.models import JobKind, JobState, TriageResult
from pe_triage_node.db.session import read_only
from pe_triage_node.web.operations import counts_for_metrics

log = logging.getLogger(__name__)

INFERENCE_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, float("inf"))
_EXPORT_OUTCOME = {
    JobState.succeeded: "delivered",
    JobState.dead: "failed",
    JobState.queued: "pending",
    JobState.running: "pending",
    JobState.failed: "retrying",
}


def inference_seconds(result_json: str) -> float | None:
    """Wall time of one analysis: ``timings_s.total`` when present, else the sum of its parts."""
    try:
        data = json.loads(result_json or "{}")
    except json.JSONDecodeError:
        return None
    timings = data.get("timings_s") if isinstance(data, dict) else None
    if not isinstance(timings, dict):
        return None
    values = {k: v for k, v in timings.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if "total" in values:
        return float(values["total"])
    return float(sum(values.values())) if values else None


class NodeCollector(Collector):
    """Everything the node exposes, read from its database on each scrape."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._last_result_id = 0
        self._bucket_counts = [0] * len(INFERENCE_BUCKETS)
        self._sum = 0.0

    def _update_inference(self, session: Session) -> None:
        rows = session.execute(
            select(TriageResult.id, TriageResult.result_json)
            .where(TriageResult.id > self._last_result_id)
            .order_by(TriageResult.id)
            .limit(50_000)
        ).all()
        for result_id, text in rows:
            seconds = inference_seconds(text)
            self._last_result_id = max(self._last_result_id, result_id)
            if seconds is None:
                continue
            self._bucket_counts[bisect.bisect_left(INFERENCE_BUCKETS, seconds)] += 1
            self._sum += seconds

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("petriage_database_up", "1 when the database answered this scrape")
        try:
            with Session(read_only(self.engine)) as session:
                counts = counts_for_metrics(session)
                with self._lock:
                    self._update_inference(session)
                    buckets = list(self._bucket_counts)
                    total = self._sum
        except Exception:  # a scrape reports the outage instead of failing
            log.warning("metrics: database unavailable", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        c = CounterMetricFamily("petriage_instances_received", "DICOM instances received and stored")
        c.add_metric([], counts["instances"])
        yield c
        c = CounterMetricFamily("petriage_studies_received", "Studies seen by the receiver")
        c.add_metric([], counts["studies"])
        yield c
        c = CounterMetricFamily("petriage_series_completed", "Series assembled as complete")
        c.add_metric([], counts["series_completed"])
        yield c
        c = CounterMetricFamily("petriage_series_rejected", "Series not analysed (selection or assembly)")
        c.add_metric([], counts["series_by_state"].get("rejected", 0))
        yield c
        g = GaugeMetricFamily("petriage_series", "Series by state", labels=["state"])
        for state, n in sorted(counts["series_by_state"].items()):
            g.add_metric([state], n)
        yield g
        c = CounterMetricFamily("petriage_rejections", "Rejections recorded, by stage", labels=["stage"])
        for stage, n in sorted(counts["rejections_by_stage"].items()):
            c.add_metric([stage], n)
        yield c
        g = GaugeMetricFamily("petriage_jobs", "Jobs by kind and state", labels=["kind", "state"])
        for kind, by_state in counts["jobs"].items():
            for state, n in by_state.items():
                g.add_metric([kind.value, state.value], n)
        yield g
        c = CounterMetricFamily("petriage_results", "Triage results stored, by priority", labels=["priority"])
        for priority, n in sorted(counts["results_by_priority"].items()):
            c.add_metric([priority], n)
        yield c
        exports: dict[str, int] = {"delivered": 0, "failed": 0, "pending": 0, "retrying": 0}
        for state, n in counts["jobs"][JobKind.export].items():
            exports[_EXPORT_OUTCOME[state]] += n
        c = CounterMetricFamily("petriage_exports", "Export jobs by outcome", labels=["outcome"])
        for outcome, n in exports.items():
            c.add_metric([outcome], n)
        yield c
        h = HistogramMetricFamily("petriage_inference_seconds", "Wall time of one study's analysis (results.timings_s)")
        cumulative, running = [], 0
        for bound, n in zip(INFERENCE_BUCKETS, buckets):
            running += n
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
        h.add_metric([], cumulative, total)
        yield h


def make_registry(engine: Engine) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(engine))
    return registry
