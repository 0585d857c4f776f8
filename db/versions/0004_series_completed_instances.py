"""series.completed_instances: the instance count when the series completed

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 10:30:00

The assembler re-opens a series when more instances than this arrive after
completion. Until now the count was kept at the end of the human-readable
``completion_reason`` ("released and contiguous; 40 instances") and parsed back;
it is copied out of that text here, once.
"""
from __future__ import annotations

import re

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_COUNT = re.compile(r"; (\d+) instances?$")


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("completed_instances", sa.Integer(), nullable=True))
    series = sa.table("series", sa.column("id", sa.Integer), sa.column("completion_reason", sa.String),
                      sa.column("completed_instances", sa.Integer))
    conn = op.get_bind()
    for row in conn.execute(sa.select(series.c.id, series.c.completion_reason).where(series.c.completion_reason.is_not(None))):
        m = _COUNT.search(row.completion_reason)
        if m:
            conn.execute(series.update().where(series.c.id == row.id).values(
                completed_instances=int(m.group(1)), completion_reason=row.completion_reason[: m.start()]))


def downgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.drop_column("completed_instances")
