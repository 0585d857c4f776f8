"""Sub-commands that start the node's processes: ``run``, ``receiver``, ``db``."""

from __future__ import annotations

import argparse
import logging
import sys

from pe_triage_node.cli import add_config_option, config_from_args
from pe_triage_node.config import NodeConfig
from pe_triage_node.services.logs import configure_logging

log = logging.getLogger(__name__)


def prepare_state(cfg: NodeConfig) -> None:
    """Create the state folders and bring the database schema to the current revision."""
    from pe_triage_node.db.migrate import upgrade

    cfg.node.var_dir.mkdir(parents=True, exist_ok=True)
    cfg.spool_dir.mkdir(parents=True, exist_ok=True)
    upgrade(cfg.database_url)


def _receiver(args: argparse.Namespace) -> int:
    """The DICOM listener with series assembly and selection (no torch in this process)."""
    from pe_triage_node.services.receiver_main import run_receiver_service

    cfg = config_from_args(args)
    configure_logging(cfg, "receiver")
    prepare_state(cfg)
    run_receiver_service(cfg)
    return 0


def _run(args: argparse.Namespace) -> int:
    """Everything on one machine: receiver + assembly (and the later rooms as they land)."""
    from pe_triage_node.services.receiver_main import run_receiver_service

    cfg = config_from_args(args)
    configure_logging(cfg, "node")
    prepare_state(cfg)
    log.info(
        "pe-triage-node starting: AE %s on %s:%d, state under %s (NOT FOR DIAGNOSTIC USE)",
        cfg.receiver.ae_title,
        cfg.receiver.host,
        cfg.receiver.port,
        cfg.node.var_dir,
    )
    run_receiver_service(cfg)
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    from pe_triage_node.db.migrate import current

    cfg = config_from_args(args)
    configure_logging(cfg, "db")
    prepare_state(cfg)
    print(f"database at revision {current(cfg.database_url)}")
    return 0


def _db_current(args: argparse.Namespace) -> int:
    from pe_triage_node.db.migrate import current

    cfg = config_from_args(args)
    print(current(cfg.database_url) or "empty (run: pe-triage db upgrade)")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="start the whole node on this machine")
    add_config_option(p)
    p.set_defaults(handler=_run)

    p = sub.add_parser("receiver", help="start the DICOM listener (with series assembly) alone")
    add_config_option(p)
    p.set_defaults(handler=_receiver)

    db = sub.add_parser("db", help="database schema")
    dbsub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    p = dbsub.add_parser("upgrade", help="create or migrate the schema to the current revision")
    add_config_option(p)
    p.set_defaults(handler=_db_upgrade)
    p = dbsub.add_parser("current", help="print the schema revision")
    add_config_option(p)
    p.set_defaults(handler=_db_current)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(1)
