"""Run the Alembic migrations in the repository's top-level ``db/`` folder from Python.

Every service calls :func:`ensure_schema` at start-up and ``pe-triage db upgrade``
calls :func:`upgrade`; both are safe to run from several processes at once:

* SQLite: the whole upgrade is one ``BEGIN IMMEDIATE`` transaction (see
  :func:`pe_triage_node.db.session.make_engine`), so a second process waits for
  the first and then finds the schema already at head.
* PostgreSQL: the upgrade transaction first takes a transaction-scoped advisory
  lock, so two nodes starting together do not both try to create the tables.

DDL is transactional on both databases: a failed migration leaves the schema
at the revision it had before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from pe_triage_node.db.session import make_engine
from pe_triage_node.errors import PETriageError
from pe_triage_node.resources import migrations_dir

log = logging.getLogger(__name__)

# Arbitrary constant ("PETR") naming the advisory lock that serialises PostgreSQL upgrades.
_PG_MIGRATION_LOCK = 0x50455452
_SQLITE_LOCK_RETRIES = 6

T = TypeVar("T")


class MigrationError(PETriageError):
    """The migrations cannot be found or cannot be applied; the message says why."""


def script_location() -> Path:
    """The Alembic environment: the repository's ``db/`` folder, installed as ``pe_triage_node.migrations``.

    Raises :class:`MigrationError` when it is incomplete.
    """
    try:
        location = migrations_dir()
    except ModuleNotFoundError as exc:
        raise MigrationError(f"Alembic migrations not installed with the package ({exc})") from exc
    if not (location / "env.py").is_file() or not (location / "versions").is_dir():
        raise MigrationError(f"Alembic migrations incomplete at {location} (expected env.py and versions/)")
    return location


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    return cfg


def head() -> str:
    """The revision the code expects (the single head of the migration history)."""
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    if revision is None:
        raise MigrationError(f"no migrations in {script_location() / 'versions'}")
    return revision


def _upgrade_connection(connection: Connection, revision: str) -> None:
    """Upgrade inside the caller's (already begun) transaction on ``connection``."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
    cfg = _config()
    # env.py uses this connection (and our transaction) instead of opening its own.
    cfg.attributes["connection"] = connection
    before = MigrationContext.configure(connection).get_current_revision()
    try:
        command.upgrade(cfg, revision)
    except CommandError as exc:
        raise MigrationError(
            f"cannot upgrade the database from revision {before!r} to {revision!r}: {exc} "
            "(a revision unknown to this code usually means a newer pe-triage-node migrated it)"
        ) from exc
    after = MigrationContext.configure(connection).get_current_revision()
    if after != before:
        log.info("database schema upgraded from %s to %s", before or "empty", after)


def _retry_sqlite_lock(engine: Engine, work: Callable[[], T]) -> T:
    """Run ``work``, retrying a few times when SQLite reports "database is locked".

    On a brand-new SQLite file, ``PRAGMA journal_mode=WAL`` (run on every connect by
    :func:`~pe_triage_node.db.session.make_engine`) fails at once, without waiting
    for the busy timeout, when another process is switching the same file to WAL
    at the same moment: services starting together on a fresh install hit this.
    Once the file is in WAL mode the race is gone. The work is one transaction,
    so a retry starts from a clean state.
    """
    for attempt in range(_SQLITE_LOCK_RETRIES - 1):
        try:
            return work()
        except OperationalError as exc:
            if engine.dialect.name != "sqlite" or "database is locked" not in str(exc.orig):
                raise
            log.info("SQLite database locked while opening it, retrying")
            time.sleep(0.05 * 2**attempt)
    return work()  # last try: let the error through


def _upgrade_engine(engine: Engine, revision: str) -> None:
    def work() -> None:
        with engine.begin() as connection:
            _upgrade_connection(connection, revision)

    _retry_sqlite_lock(engine, work)


def _current_engine(engine: Engine) -> str | None:
    def work() -> str | None:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    return _retry_sqlite_lock(engine, work)


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (default: the latest).

    Works on SQLite files and PostgreSQL; creates the schema on an empty database.
    Raises :class:`MigrationError` when the migrations are missing or do not apply.
    """
    engine = make_engine(url)
    try:
        _upgrade_engine(engine, revision)
    finally:
        engine.dispose()


def current(url: str) -> str | None:
    """The database's schema revision, or ``None`` for an empty (never migrated) database.

    A SQLite file that does not exist yet is reported as empty and not created.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        if not Path(parsed.database).exists():
            return None
    engine = make_engine(url)
    try:
        return _current_engine(engine)
    finally:
        engine.dispose()


def ensure_schema(engine_or_url: Engine | str) -> str:
    """Upgrade to head at service start-up and return the revision now in place.

    Given an :class:`~sqlalchemy.Engine`, the process's own engine is used (no
    second engine is created); given a URL, a short-lived engine is.
    """
    if isinstance(engine_or_url, str):
        upgrade(engine_or_url)
        revision = current(engine_or_url)
    else:
        _upgrade_engine(engine_or_url, "head")
        revision = _current_engine(engine_or_url)
    if revision is None:  # pragma: no cover - upgrade to head always stamps a revision
        raise MigrationError("database has no schema revision after upgrade")
    return revision
