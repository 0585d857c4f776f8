"""One long-lived engine per process; SQLite in WAL mode, PostgreSQL when shared.

On SQLite a transaction takes the database's single write lock when it begins
(``BEGIN IMMEDIATE``: no lock upgrade, so no deadlock between two writers).
Units of work that only read use :func:`read_only`: their transactions begin
deferred and read a WAL snapshot, never waiting for a writer nor making one wait.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

def make_engine(url: str, echo: bool = False) -> Engine:
    """Create the process's engine. SQLite gets WAL, a busy timeout and FULL sync."""
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"echo": echo, "future": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy own transactions: BEGIN IMMEDIATE avoids lock upgrade deadlocks.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            _set_wal(cur)
            cur.execute("PRAGMA synchronous=FULL")  # an acknowledged row survives power loss
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(_READ_ONLY) else "BEGIN IMMEDIATE")

        return engine
    kwargs["pool_pre_ping"] = True
    return create_engine(url, **kwargs)


_READ_ONLY = "petriage_read_only"


def read_only(engine: Engine) -> Engine:
    """``engine`` for units of work that only read (on SQLite, without the write lock; elsewhere the same)."""
    return engine.execution_options(**{_READ_ONLY: True})


def _set_wal(cur: Any, attempts: int = 50) -> None:
    """Switch to WAL; a brand-new file opened by two processes at once may be briefly locked."""
    for attempt in range(attempts):
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"
