"""Shared database fixtures: every test that asks for them runs on SQLite *and* PostgreSQL.

``db_url``
    URL of a fresh, empty database, different for every test:
    ``sqlite`` — a file in the test's ``tmp_path``;
    ``postgres`` — a uniquely named database created on the server at
    ``$PETRIAGE_TEST_PG`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``,
    trust auth) and dropped afterwards (``WITH (FORCE)``, so engines left open
    do not block it). Postgres cases carry the ``postgres`` marker
    (``-m "not postgres"`` deselects them). When the server cannot be reached they
    FAIL with the reason: CI has PostgreSQL, so a silent skip would hide a gap.

``engine``
    A :func:`pe_triage_node.db.session.make_engine` engine on ``db_url``, migrated
    to head with :func:`pe_triage_node.db.migrate.upgrade`, disposed afterwards.

Test ids read ``test_x[sqlite]`` / ``test_x[postgres]``.

``procs``
    A list to append the processes a test starts; each is stopped (SIGTERM, then
    SIGKILL after its grace period) when the test ends.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from pe_triage_node.db.migrate import upgrade
from pe_triage_node.db.session import make_engine

PG_ADMIN_URL = os.environ.get(
    "PETRIAGE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@cache
def _pg_admin_error() -> str | None:
    """Why the PostgreSQL server cannot be used, or ``None``; probed once per session."""
    import psycopg

    url = make_url(PG_ADMIN_URL)
    try:
        with psycopg.connect(_pg_conninfo(url.database or "postgres"), connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return f"{type(exc).__name__}: {exc}".strip()


def _pg_conninfo(database: str) -> str:
    url = make_url(PG_ADMIN_URL)
    parts = {
        "host": url.host or "127.0.0.1",
        "port": str(url.port or 5432),
        "user": url.username or "postgres",
        "dbname": database,
    }
    if url.password:
        parts["password"] = url.password
    return " ".join(f"{k}='{v}'" for k, v in parts.items())


def _pg_admin(sql: str) -> None:
    import psycopg

    url = make_url(PG_ADMIN_URL)
    with psycopg.connect(_pg_conninfo(url.database or "postgres"), autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type,unused-ignore]  # generated names, no user input


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh empty database (SQLite file or a new PostgreSQL database)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'node.db'}"
        return
    error = _pg_admin_error()
    if error is not None:
        pytest.fail(
            f"PostgreSQL not reachable at {make_url(PG_ADMIN_URL).render_as_string()} ({error}). "
            "Start it (./dev.sh test does) or deselect with -m 'not postgres'; "
            "postgres tests fail instead of skipping because CI runs them.",
            pytrace=False,
        )
    name = f"pet_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """The process engine for ``db_url``, schema migrated to head."""
    upgrade(db_url)
    eng = make_engine(db_url)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    from tests import peers

    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        peers.stop_process(proc, timeout=150)
