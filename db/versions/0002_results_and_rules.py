"""results and priority rule sets

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 01:30:00

``rule_sets``: every version of the priority rules with who/when/why and the
text it replaced (at most one active: partial unique index). ``results``: the
worker's stored inference results and triage decisions, replayable by
``pe-triage rules test``.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rule_sets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("author", sa.String(length=128), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("toml_text", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("previous_id", sa.Integer(), nullable=True),
        sa.Column("previous_toml_text", sa.Text(), nullable=True),
        sa.Column("previous_source", sa.String(length=512), nullable=True),
        sa.Column("restored_from_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["previous_id"], ["rule_sets.id"]),
        sa.ForeignKeyConstraint(["restored_from_id"], ["rule_sets.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_rule_sets_created_at", "rule_sets", ["created_at"], unique=False)
    op.create_index(
        "uq_rule_sets_active",
        "rule_sets",
        ["active"],
        unique=True,
        sqlite_where=sa.text("active"),
        postgresql_where=sa.text("active"),
    )

    op.create_table(
        "results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("labels", sa.Text(), nullable=False),
        sa.Column("probabilities", sa.Text(), nullable=False),
        sa.Column("attributes", sa.Text(), nullable=False),
        sa.Column("priority", sa.String(length=16), nullable=False),
        sa.Column("rule_name", sa.String(length=200), nullable=True),
        sa.Column("rule_set_id", sa.Integer(), nullable=True),
        sa.Column("flags", sa.Text(), nullable=False),
        sa.Column("explanation", sa.Text(), nullable=True),
        sa.Column("result_json", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["rule_set_id"], ["rule_sets.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_results_created_at", "results", ["created_at"], unique=False)
    op.create_index("ix_results_study_instance_uid", "results", ["study_instance_uid"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_results_study_instance_uid", table_name="results")
    op.drop_index("ix_results_created_at", table_name="results")
    op.drop_table("results")
    op.drop_index(
        "uq_rule_sets_active",
        table_name="rule_sets",
        sqlite_where=sa.text("active"),
        postgresql_where=sa.text("active"),
    )
    op.drop_index("ix_rule_sets_created_at", table_name="rule_sets")
    op.drop_table("rule_sets")
