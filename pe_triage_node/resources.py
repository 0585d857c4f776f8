"""Files that ship with the package: the Alembic migrations and the demo weights.

The repository keeps them at its top level (``db/``, ``models/``); pyproject.toml
installs them inside the package as ``pe_triage_node.migrations`` and
``pe_triage_node.shipped_models``, so a checkout, an editable install and a
plain ``pip install .`` find them the same way, whatever the working directory.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def _package_dir(package: str) -> Path:
    return Path(str(files(package)))


def migrations_dir() -> Path:
    """The Alembic environment (``env.py``, ``versions/``)."""
    return _package_dir("pe_triage_node.migrations")


def demo_manifest() -> Path:
    """``manifest.json`` of the shipped demo weights (NOT for clinical use)."""
    return _package_dir("pe_triage_node.shipped_models") / "demo" / "manifest.json"
