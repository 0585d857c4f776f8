"""Alembic environment and migrations, installed as ``pe_triage_node.migrations``."""
