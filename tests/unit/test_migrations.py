"""Alembic migrations run programmatically on SQLite and PostgreSQL (pe_triage_node.db.migrate)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect

from pe_triage_node.db import migrate
from pe_triage_node.db.models import Base
from pe_triage_node.db.session import make_engine


def test_upgrade_from_empty_reaches_head(db_url: str) -> None:
    assert migrate.current(db_url) is None
    migrate.upgrade(db_url)
    assert migrate.current(db_url) == migrate.head()
    engine = make_engine(db_url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert set(Base.metadata.tables) <= tables
    migrate.upgrade(db_url)  # idempotent
    assert migrate.current(db_url) == migrate.head()


def test_models_match_migrations(engine: Engine) -> None:
    """Autogenerate finds nothing to add: models.py and db/versions/ agree."""
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_ensure_schema_with_engine_or_url(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        assert migrate.ensure_schema(engine) == migrate.head()
    finally:
        engine.dispose()
    assert migrate.ensure_schema(db_url) == migrate.head()


def test_concurrent_upgrades_from_empty(db_url: str) -> None:
    """Services starting together all migrate safely (BEGIN IMMEDIATE / advisory lock)."""
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def run() -> None:
        try:
            start.wait()
            migrate.upgrade(db_url)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert migrate.current(db_url) == migrate.head()


def test_current_does_not_create_a_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "absent" / "node.db"
    assert migrate.current(f"sqlite:///{path}") is None
    assert not path.exists()


def test_missing_migrations_folder_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "db").mkdir()  # an installation that lost its versions/ folder
    monkeypatch.setattr(migrate, "migrations_dir", lambda: tmp_path / "db")
    with pytest.raises(migrate.MigrationError, match="migrations incomplete"):
        migrate.upgrade(f"sqlite:///{tmp_path / 'node.db'}")


def test_completion_counts_move_out_of_the_reason_text(tmp_path: Path) -> None:
    """0004 copies the instance count that 0003 kept at the end of completion_reason into its own column."""
    url = f"sqlite:///{tmp_path / 'node.db'}"
    migrate.upgrade(url, "0003")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO studies (id, study_instance_uid, first_received_at, last_received_at) VALUES (1, '1.2', '2026-01-01', '2026-01-01')"
        )
        conn.exec_driver_sql(
            "INSERT INTO series (id, study_id, series_instance_uid, state, instance_count, first_received_at, "
            "last_received_at, completion_reason, generation) VALUES "
            "(1, 1, '1.2.1', 'selected', 40, '2026-01-01', '2026-01-01', 'released and contiguous; 40 instances', 0), "
            "(2, 1, '1.2.2', 'receiving', 3, '2026-01-01', '2026-01-01', NULL, 0)"
        )
    migrate.upgrade(url)
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT id, completion_reason, completed_instances FROM series ORDER BY id").all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [(1, "released and contiguous", 40), (2, None, None)]
