"""Crash repair at the receiver's start-up: what an interrupted receive left behind.

A crash can leave temporary spool files (swept by :meth:`Spool.sweep_temporaries`)
and, with the overlapped commit on SQLite, an ``instances`` row committed while
its file was still being written: that instance was never acknowledged, so its
row goes. Associations the crash cut short are closed with outcome ``interrupted``.
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine, select, update

from pe_triage_node.dicom.index_writer import ASSOCIATIONS, INSTANCES, SERIES, utcnow
from pe_triage_node.dicom.spool import Spool

log = logging.getLogger(__name__)


def reconcile_interrupted(engine: Engine, spool: Spool) -> int:
    """Drop instance rows of unfinished associations whose file is missing; return how many.

    Call before any receiving process starts, on the node that owns the spool
    (SQLite deployments).
    """
    removed = 0
    with engine.begin() as conn:
        open_ids = [r[0] for r in conn.execute(select(ASSOCIATIONS.c.id).where(ASSOCIATIONS.c.released_at.is_(None)))]
        for assoc_id in open_ids:
            rows = conn.execute(
                select(INSTANCES.c.id, INSTANCES.c.series_id, INSTANCES.c.spool_path).where(
                    INSTANCES.c.association_id == assoc_id
                )
            ).all()
            stored = 0
            for inst_id, series_id, spool_path in rows:
                if spool.exists(spool_path):
                    stored += 1
                    continue
                conn.execute(INSTANCES.delete().where(INSTANCES.c.id == inst_id))
                conn.execute(
                    update(SERIES).where(SERIES.c.id == series_id).values(instance_count=SERIES.c.instance_count - 1)
                )
                removed += 1
            conn.execute(
                update(ASSOCIATIONS)
                .where(ASSOCIATIONS.c.id == assoc_id)
                .values(released_at=utcnow(), outcome="interrupted", instances_stored=stored)
            )
    if removed:
        log.warning("removed %d unacknowledged instance rows whose file was never completed", removed)
    return removed


def repair_after_crash(engine: Engine, spool: Spool) -> None:
    """Everything the receiver repairs before it accepts: temporaries, then (SQLite) unacknowledged rows."""
    spool.sweep_temporaries()
    if engine.dialect.name == "sqlite":
        reconcile_interrupted(engine, spool)
