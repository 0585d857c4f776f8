"""Sub-commands that start the node's processes: ``run``, ``receiver``, ``worker``, ``exporter``, ``demo``, ``db``."""

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
    """Everything on one machine: receiver, worker(s), exporter (and the web console), one process each."""
    from pe_triage_node.services.node import NodeSupervisor

    cfg = config_from_args(args)
    configure_logging(cfg, "node")
    prepare_state(cfg)
    log.info(
        "pe-triage-node starting: AE %s on %s:%d, %d worker(s), %d destination(s), state under %s "
        "(NOT FOR DIAGNOSTIC USE)",
        cfg.receiver.ae_title,
        cfg.receiver.host,
        cfg.receiver.port,
        cfg.worker.processes,
        len(cfg.export.destinations),
        cfg.node.var_dir,
    )
    supervisor = NodeSupervisor(
        cfg, args.config, random_weights=args.random_weights, web=False if args.no_web else None
    )
    return supervisor.run()


def _worker(args: argparse.Namespace) -> int:
    """One inference worker (the model is loaded once; GPU chosen by CUDA_VISIBLE_DEVICES / inference.device)."""
    from pe_triage_node.worker import run_worker_service

    cfg = config_from_args(args)
    configure_logging(cfg, "worker")
    return run_worker_service(cfg, random_weights=args.random_weights)


def _exporter(args: argparse.Namespace) -> int:
    """The exporter: C-STORE of the results to every destination, retries, webhook."""
    from pe_triage_node.services.node import quiet_libraries, run_exporter_service

    cfg = config_from_args(args)
    configure_logging(cfg, "exporter")
    quiet_libraries()
    return run_exporter_service(cfg)


def _demo(args: argparse.Namespace) -> int:
    from pe_triage_node.services.demo import run_demo

    return run_demo(args)


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


def _add_random_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--random-weights", action="store_true",
                   help="workers use random weights: MEANINGLESS results (smoke tests without a model)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="start the whole node on this machine (receiver, worker, exporter, web)")
    add_config_option(p)
    p.add_argument("--no-web", action="store_true", help="do not start the web console")
    _add_random_weights(p)
    p.set_defaults(handler=_run)

    p = sub.add_parser("receiver", help="start the DICOM listener (with series assembly) alone")
    add_config_option(p)
    p.set_defaults(handler=_receiver)

    p = sub.add_parser("worker", help="start one inference worker (claims inference jobs)")
    add_config_option(p)
    _add_random_weights(p)
    p.set_defaults(handler=_worker)

    p = sub.add_parser("exporter", help="start the exporter (sends results to the destinations)")
    add_config_option(p)
    p.set_defaults(handler=_exporter)

    from pe_triage_node.services.demo import add_demo_arguments

    p = sub.add_parser(
        "demo",
        help="send a phantom CTPA (--case central|left|right|negative) to a node and print the result that comes back",
        description="Generate a phantom CTPA (--case: a central PE by default, a left- or right-sided PE, or no PE), "
        "send it to the node, wait for the SR "
        "to come back to a local C-STORE receiver and print the findings, the priority and the time. "
        "Without --node a node is started for the demo (temporary state, this receiver as its "
        "destination). With --node the node must list this receiver (--listen-ae, --listen-port, "
        "this machine's address) in [[export.destinations]].",
    )
    add_demo_arguments(p)
    p.set_defaults(handler=_demo)

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
