"""``pe-triage users add|list|passwd`` and ``pe-triage web`` argument wiring, in process (the processes: tests/integration/test_web_cli_process.py)."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from pe_triage_node.cli import add_config_option
from pe_triage_node.db.models import AuditEvent, WebUser
from pe_triage_node.db.session import make_engine
from pe_triage_node.web import cli as web_cli
from pe_triage_node.web.auth import verify_password


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pe-triage")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-config")
    add_config_option(p)
    web_cli.register(sub)
    args = parser.parse_args(argv)
    result: int = args.handler(args)
    return result


def test_users_add_list_passwd(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nvar_dir = "{tmp_path / "var"}"\n[database]\nurl = "{db_url}"\n')
    monkeypatch.setattr("sys.stdin", io.StringIO("a long enough secret\n"))
    assert _run(["users", "add", "bob", "--role", "admin", "--password-stdin", "--config", str(config)]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert _run(["users", "add", "carol", "--password-stdin", "--config", str(config)]) == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("another good secret\n"))
    assert _run(["users", "add", "bob", "--password-stdin", "--config", str(config)]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert _run(["users", "list", "--config", str(config)]) == 0
    assert "bob\tadmin" in capsys.readouterr().out
    engine = make_engine(db_url)
    try:
        with Session(engine) as s, s.begin():
            user = s.scalars(select(WebUser)).one()
            assert user.password_hash.startswith("$argon2id$") and "secret" not in user.password_hash
            assert verify_password(s, "bob", "a long enough secret") is not None
            assert [a.action for a in s.scalars(select(AuditEvent))] == ["user-add"]
        monkeypatch.setattr("sys.stdin", io.StringIO("a brand new secret\n"))
        assert _run(["users", "passwd", "bob", "--password-stdin", "--config", str(config)]) == 0
        with Session(engine) as s, s.begin():
            assert verify_password(s, "bob", "a brand new secret") is not None
            assert verify_password(s, "bob", "a long enough secret") is None
    finally:
        engine.dispose()


def test_web_command_uses_configured_bind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake_run(server: object) -> None:  # uvicorn.Server.run: what it would bind, without serving
        cfg = server.config  # type: ignore[attr-defined]
        seen.update(host=cfg.host, port=cfg.port)

    monkeypatch.setattr("uvicorn.Server.run", fake_run)
    monkeypatch.setattr("pe_triage_node.services.logs.configure_logging", lambda cfg, name: None)
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nvar_dir = "{tmp_path / "var"}"\n')
    assert _run(["web", "--config", str(config)]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8080
    assert _run(["web", "--config", str(config), "--port", "9090"]) == 0
    assert seen["port"] == 9090
