"""SQLite: writers take the write lock when they begin; read-only units of work never wait for it."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from pe_triage_node.db.migrate import upgrade
from pe_triage_node.db.models import Study
from pe_triage_node.db.session import make_engine, read_only


def test_reads_go_on_while_a_writer_holds_the_lock(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    engine = make_engine(url)
    writer = sqlite3.connect(tmp_path / "node.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO studies (study_instance_uid, first_received_at, last_received_at) "
                   "VALUES ('1.2.3', '2026-01-01 00:00:00', '2026-01-01 00:00:00')")
    try:
        started = time.monotonic()
        with Session(read_only(engine)) as s, s.begin():
            assert s.scalars(select(Study)).all() == []  # the snapshot before the writer's commit
        assert time.monotonic() - started < 5  # it did not sit out the 30 s busy timeout

        with engine.connect() as conn:
            conn.connection.driver_connection.execute("PRAGMA busy_timeout=100")  # type: ignore[union-attr]
            with pytest.raises(OperationalError, match="locked"):
                with conn.begin():  # a unit of work that may write waits for the lock
                    conn.execute(text("SELECT 1"))
    finally:
        writer.execute("COMMIT")
        writer.close()
    with Session(read_only(engine)) as s:
        assert [st.study_instance_uid for st in s.scalars(select(Study))] == ["1.2.3"]
    engine.dispose()
