"""Running the node: the operations page (queue, workers, associations, rejections, disk, model),
the probes ``/healthz`` and ``/readyz`` and the Prometheus ``/metrics`` (no sign-in for these three)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import Engine, func, or_, select, text
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pe_triage_node.config import Destination, NodeConfig
from pe_triage_node.db.models import Association, Instance, Job, JobKind, JobState, Rejection, Series, Study, TriageResult
from pe_triage_node.db.session import read_only
from pe_triage_node.queue import JobView, list_jobs, queue_counts
from pe_triage_node.web import auth
from pe_triage_node.web.handlers import current_user, db_engine, node_config, render, signed_in
from pe_triage_node.web.text import format_duration, json_value


@dataclass
class DestinationRow:
    """One configured export destination and its export jobs by state (succeeded: the last 24 hours)."""

    name: str
    kind: str
    target: str
    min_priority: str
    counts: dict[str, int]


@dataclass
class OpsPage:
    counts: dict[JobKind, dict[JobState, int]]
    oldest_queued: dict[JobKind, str]
    running: list[JobView]
    dead: list[JobView]
    associations: list[Association]
    rejections: list[Rejection]
    spool_total: int | None
    spool_free: int | None
    spool_path: Path
    model_version: str | None
    model_name: str | None
    device: str | None
    destinations: list[DestinationRow]


def disk_usage(path: Path) -> tuple[int, int] | None:
    """(total, free) bytes of the file system holding ``path`` (or its nearest existing parent)."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return None
    return usage.total, usage.free


def manifest_path(cfg: NodeConfig) -> Path:
    return cfg.inference.manifest


def read_manifest_cheaply(cfg: NodeConfig) -> tuple[dict[str, Any] | None, str]:
    """The weights manifest as JSON, checked without loading torch: (data, problem or "")."""
    path = manifest_path(cfg)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"weights manifest not found: {path}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"weights manifest unreadable: {exc}"
    if not isinstance(data, dict) or not data.get("model_version") or not isinstance(data.get("files"), list):
        return None, "weights manifest lacks model_version or files"
    for entry in data["files"]:
        rel = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(rel, str) or not (path.parent / rel).is_file():
            return None, f"weights file missing: {rel!r}"
    return data, ""


def destination_target(dest: Destination) -> str:
    """Where a destination is, without credentials: ``AE@host:port``, ``MLLP host:port`` or the URL's scheme, host and path."""
    if dest.kind == "dicom":
        return f"{dest.ae_title}@{dest.host}:{dest.port}" + (" (TLS)" if dest.tls else "")
    if dest.kind == "hl7":
        return f"MLLP {dest.host}:{dest.port}"
    url = urlsplit(dest.url)
    return f"{url.scheme}://{url.hostname or ''}{f':{url.port}' if url.port else ''}{url.path}"


def destination_rows(session: Session, cfg: NodeConfig, now: dt.datetime) -> list[DestinationRow]:
    """The configured destinations with their export jobs: every unfinished or dead one, the succeeded of the last day."""
    since = now - dt.timedelta(days=1)
    counts: dict[str, dict[str, int]] = {d.name: dict.fromkeys(("queued", "running", "dead", "succeeded"), 0)
                                         for d in cfg.export.destinations}
    rows = session.execute(
        select(Job.payload, Job.state).where(
            Job.kind == JobKind.export,
            or_(Job.state.in_([JobState.queued, JobState.running, JobState.dead]), Job.finished_at >= since),
        )
    )
    for payload, state in rows:
        name = json_value(payload, {}).get("destination")
        if isinstance(name, str) and name in counts and state.value in counts[name]:
            counts[name][state.value] += 1
    return [DestinationRow(d.name, d.kind, destination_target(d), d.min_priority, counts[d.name])
            for d in cfg.export.destinations]


def load_ops_page(session: Session, cfg: NodeConfig) -> OpsPage:
    now = dt.datetime.now(dt.timezone.utc)
    oldest: dict[JobKind, str] = {}
    for kind in JobKind:
        queued = list_jobs(session, kind=kind, states=[JobState.queued], limit=10_000)
        if queued:
            first = min(j.created_at for j in queued)
            oldest[kind] = format_duration((now - first).total_seconds())
    latest = session.scalars(select(TriageResult).order_by(TriageResult.id.desc()).limit(1)).first()
    latest_data = json_value(latest.result_json, {}) if latest is not None else {}
    manifest, _problem = read_manifest_cheaply(cfg)
    usage = disk_usage(cfg.spool_dir)
    return OpsPage(
        counts=queue_counts(session),
        oldest_queued=oldest,
        running=list_jobs(session, states=[JobState.running], limit=200),
        dead=list_jobs(session, states=[JobState.dead], limit=20),
        associations=list(session.scalars(select(Association).order_by(Association.started_at.desc()).limit(20))),
        rejections=list(session.scalars(select(Rejection).order_by(Rejection.id.desc()).limit(20))),
        spool_total=usage[0] if usage else None,
        spool_free=usage[1] if usage else None,
        spool_path=cfg.spool_dir,
        model_version=(manifest or {}).get("model_version") or (latest.model_version if latest else None),
        model_name=(manifest or {}).get("model_name") or latest_data.get("model_name"),
        device=latest_data.get("device") or cfg.inference.device,
        destinations=destination_rows(session, cfg, now),
    )


def counts_for_metrics(session: Session) -> dict[str, Any]:
    """Raw counts the /metrics collector exposes (computed at scrape time)."""
    series_by_state = {str(s.value if hasattr(s, "value") else s): int(n) for s, n in session.execute(
        select(Series.state, func.count()).group_by(Series.state)
    )}
    return {
        "instances": int(session.scalar(select(func.count()).select_from(Instance)) or 0),
        "studies": int(session.scalar(select(func.count()).select_from(Study)) or 0),
        "series_by_state": series_by_state,
        "series_completed": int(session.scalar(select(func.count()).select_from(Series).where(Series.completed_at.is_not(None))) or 0),
        "rejections_by_stage": {str(st): int(n) for st, n in session.execute(
            select(Rejection.stage, func.count()).group_by(Rejection.stage)
        )},
        "jobs": queue_counts(session),
        "results_by_priority": {str(p): int(n) for p, n in session.execute(
            select(TriageResult.priority, func.count()).group_by(TriageResult.priority)
        )},
    }


def readiness(cfg: NodeConfig, engine: Engine) -> dict[str, dict[str, Any]]:
    """Cheap checks: database answers, spool folder writable, weights manifest and files present."""
    checks: dict[str, dict[str, Any]] = {}
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = {"ok": True}
    except Exception as exc:  # reported, not raised
        checks["database"] = {"ok": False, "detail": type(exc).__name__}
    try:
        with tempfile.NamedTemporaryFile(dir=cfg.spool_dir, prefix=".readyz-"):
            pass
        checks["spool"] = {"ok": True}
    except OSError as exc:
        checks["spool"] = {"ok": False, "detail": f"spool not writable: {exc.strerror or exc}"}
    manifest, problem = read_manifest_cheaply(cfg)
    checks["model"] = {"ok": manifest is not None,
                       **({"model_version": manifest.get("model_version")} if manifest else {"detail": problem})}
    return checks


# -- endpoints ----------------------------------------------------------------


@signed_in()
async def ops_page(request: Request) -> Response:
    user = current_user(request)

    def work() -> tuple[OpsPage, list[Any]]:
        with Session(read_only(db_engine(request))) as s:
            page = load_ops_page(s, node_config(request))
            audit_rows = auth.recent_audit(s, 50) if user.is_admin else []
            s.expunge_all()
        return page, audit_rows

    page, audit_rows = await run_in_threadpool(work)
    return render(request, "ops.html", {"o": page, "audit": audit_rows, "kinds": list(JobKind), "states": list(JobState)})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    checks = await run_in_threadpool(readiness, node_config(request), db_engine(request))
    ok = all(c["ok"] for c in checks.values())
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    body = await run_in_threadpool(generate_latest, request.app.state.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


ROUTES = [
    Route("/ops", ops_page, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
