"""``pe-triage users`` as a separate process without a terminal, and the console served by uvicorn in a thread."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pe_triage_node.config import NodeConfig
from pe_triage_node.db.migrate import upgrade
from pe_triage_node.db.models import WebUser
from pe_triage_node.db.session import make_engine
from pe_triage_node.web import cli as web_cli

ROOT = Path(__file__).resolve().parents[2]


def _users(config: Path, *args: str, stdin: int | None = None, given: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m pe_triage_node.cli users ...`` in a new session: no controlling terminal, stdin not a tty."""
    return subprocess.run([sys.executable, "-m", "pe_triage_node.cli", "users", *args, "--config", str(config)],
                          cwd=ROOT, stdin=stdin, input=given, capture_output=True, text=True, timeout=120,
                          start_new_session=True)


def test_users_add_without_a_terminal_says_to_use_password_stdin(tmp_path: Path) -> None:
    db = tmp_path / "node.db"
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nvar_dir = "{tmp_path / "var"}"\n[database]\nurl = "sqlite:///{db}"\n')
    for action in ("add", "passwd"):
        proc = _users(config, action, "bob", stdin=subprocess.DEVNULL)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr and "EOFError" not in proc.stderr
        assert "no terminal" in proc.stderr and f"users {action} NAME --password-stdin" in proc.stderr
    proc = _users(config, "add", "bob", "--password-stdin", given="a long enough secret\n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    engine = make_engine(f"sqlite:///{db}")
    try:
        with Session(engine) as s:
            assert s.scalar(select(func.count()).select_from(WebUser)) == 1
    finally:
        engine.dispose()


def test_make_server_serves_in_a_thread(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    cfg = NodeConfig(node={"var_dir": str(tmp_path / "var")})  # type: ignore[arg-type]
    upgrade(cfg.database_url)
    server = web_cli.make_server(cfg, port=port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert json.load(r) == {"status": "ok"}
    finally:
        server.should_exit = True
        thread.join(10)
    assert not thread.is_alive()
