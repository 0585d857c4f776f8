"""``pe-triage web`` (the console) and ``pe-triage users add|list|passwd``."""

from __future__ import annotations

import argparse
import getpass
import logging
import sys

from typing import TYPE_CHECKING

from pe_triage_node.cli import add_config_option, config_from_args
from pe_triage_node.config import NodeConfig

if TYPE_CHECKING:
    from collections.abc import Callable

    import uvicorn
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)


def _prepare(args: argparse.Namespace) -> NodeConfig:
    from pe_triage_node.db.migrate import upgrade

    cfg = config_from_args(args)
    cfg.node.var_dir.mkdir(parents=True, exist_ok=True)
    upgrade(cfg.database_url)
    return cfg


def make_server(cfg: NodeConfig, engine: Engine | None = None, host: str | None = None,
                port: int | None = None) -> uvicorn.Server:
    """The console's uvicorn server, for ``pe-triage run``: ``threading.Thread(target=server.run)``,
    stop with ``server.should_exit = True`` (signal handlers are only installed on the main thread)."""
    import uvicorn

    from pe_triage_node.web.app import create_app

    config = uvicorn.Config(create_app(cfg, engine), host=host or cfg.web.host, port=port or cfg.web.port,
                            log_level="warning", access_log=False, proxy_headers=False, server_header=False)
    return uvicorn.Server(config)


def serve_console(cfg: NodeConfig, host: str | None = None, port: int | None = None) -> int:
    """Serve the console in this process until SIGTERM/SIGINT (uvicorn's own handlers)."""
    log.info("web console on http://%s:%d (NOT FOR DIAGNOSTIC USE)", host or cfg.web.host, port or cfg.web.port)
    make_server(cfg, host=host, port=port).run()
    return 0


def _web(args: argparse.Namespace) -> int:
    from pe_triage_node.services.logs import configure_logging

    cfg = _prepare(args)
    configure_logging(cfg, "web")
    return serve_console(cfg, args.host, args.port)


NO_TERMINAL = (
    "pe-triage: no terminal to ask for the password; give it on standard input with --password-stdin, "
    "e.g.  printf '%s\\n' \"$PASSWORD\" | pe-triage users {action} NAME --password-stdin"
)


def _read_password(args: argparse.Namespace, action: str) -> str | None:
    """The new password from stdin (``--password-stdin``) or asked twice on the terminal; ``None``: no way to ask."""
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():  # a script, a pipe, a service: getpass would fail or read stray input
        print(NO_TERMINAL.format(action=action), file=sys.stderr)
        return None
    try:
        first = getpass.getpass("Password: ")
        again = getpass.getpass("Again: ")
    except EOFError:  # input closed (Ctrl-D)
        print(NO_TERMINAL.format(action=action), file=sys.stderr)
        return None
    if again != first:
        raise SystemExit("pe-triage: the passwords differ")
    return first


def _change_user(args: argparse.Namespace, action: str, change: Callable[[Session, str], None], done: str) -> int:
    """Read the password, apply ``change`` with its audit row in one transaction, print ``done``."""
    from sqlalchemy.orm import Session

    from pe_triage_node.db.session import make_engine
    from pe_triage_node.web.auth import UserError

    password = _read_password(args, action)
    if password is None:
        return 2
    cfg = _prepare(args)
    engine = make_engine(cfg.database_url)
    try:
        with Session(engine) as s, s.begin():
            change(s, password)
    except UserError as exc:
        print(f"pe-triage: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    print(done)
    return 0


def _users_add(args: argparse.Namespace) -> int:
    from pe_triage_node.web.auth import add_user, audit

    def change(s: Session, password: str) -> None:
        add_user(s, args.name, password, args.role)
        audit(s, "user-add", username=None, target=f"user {args.name}", detail=f"role {args.role} (command line)")

    return _change_user(args, "add", change, f"user {args.name} added ({args.role})")


def _users_passwd(args: argparse.Namespace) -> int:
    from pe_triage_node.web.auth import audit, set_password

    def change(s: Session, password: str) -> None:
        set_password(s, args.name, password)
        audit(s, "user-password", username=None, target=f"user {args.name}", detail="command line")

    return _change_user(args, "passwd", change, f"password of {args.name} changed; its sessions were signed out")


def _users_list(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from pe_triage_node.db.session import make_engine
    from pe_triage_node.web.auth import list_users

    cfg = _prepare(args)
    engine = make_engine(cfg.database_url)
    try:
        with Session(engine) as s:
            for u in list_users(s):
                last = u.last_sign_in_at.strftime("%Y-%m-%d %H:%M") if u.last_sign_in_at else "never"
                state = " (disabled)" if u.disabled else ""
                print(f"{u.username}\t{u.role}{state}\tlast sign-in {last}")
    finally:
        engine.dispose()
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("web", help="start the web console (worklist, rules, operations, /metrics)")
    add_config_option(p)
    p.add_argument("--host", default=None, help="interface (default: web.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default: web.port, 8080)")
    p.set_defaults(handler=_web)

    users = sub.add_parser("users", help="web console accounts")
    usub = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    p = usub.add_parser("add", help="create a user (password from a prompt or --password-stdin)")
    add_config_option(p)
    p.add_argument("name")
    p.add_argument("--role", choices=("viewer", "admin"), default="viewer")
    p.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    p.set_defaults(handler=_users_add)
    p = usub.add_parser("passwd", help="set a user's password (signs the user out everywhere)")
    add_config_option(p)
    p.add_argument("name")
    p.add_argument("--password-stdin", action="store_true")
    p.set_defaults(handler=_users_passwd)
    p = usub.add_parser("list", help="list users and roles")
    add_config_option(p)
    p.set_defaults(handler=_users_list)
