"""pyproject.toml lists every package, so a plain `pip install .` carries all of the node."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_is_listed() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "pe_triage_node").rglob("__init__.py")
    }
    assert on_disk - listed == set(), "packages missing from [tool.setuptools] packages in pyproject.toml"


def test_migrations_and_demo_weights_are_found_from_the_package() -> None:
    from pe_triage_node.resources import demo_manifest, migrations_dir

    assert (migrations_dir() / "env.py").is_file()
    assert demo_manifest().is_file()
