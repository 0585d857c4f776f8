"""The ``pe-triage`` console command.

Each room registers its own sub-commands through a ``register(subparsers)``
function; heavy imports (torch) happen inside the handlers, so that the
receiver never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pe_triage_node.config import NodeConfig, load_config
from pe_triage_node.errors import ConfigError

# Modules that contribute sub-commands (each has ``register(subparsers)``).
_ROOMS = (
    "pe_triage_node.services.cli",
    "pe_triage_node.inference.cli",
    "pe_triage_node.synth.cli",
    "pe_triage_node.rules.cli",
    "pe_triage_node.web.cli",
    "pe_triage_node.evaluation",
)


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """Load the configuration named by ``--config`` (exits with the reason when invalid)."""
    try:
        return load_config(args.config)
    except ConfigError as exc:
        print(f"pe-triage: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="node configuration (default: ./config/node.toml if present, else built-in defaults under ./var/)",
    )


def _check_config(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    print(json.dumps(cfg.masked(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pe-triage",
        description="PE triage node: CTPA triage for suspected pulmonary embolism. NOT FOR DIAGNOSTIC USE.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("check-config", help="validate the configuration and print it (secrets masked)")
    add_config_option(p)
    p.set_defaults(handler=_check_config)
    for name in _ROOMS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
