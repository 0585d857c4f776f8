"""A plain (not editable) `pip install .` runs: migrations and demo weights come with the package.

The wheel is built from this checkout and installed into a fresh virtual
environment that borrows the installed dependencies (torch is 5 GB: no
download). Everything then runs from a folder outside the checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests import peers

pytestmark = pytest.mark.slow
ROOT = peers.PROJECT_ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(ROOT)],
        check=True, cwd=tmp, timeout=600,
    )
    wheel = next((tmp / "dist").glob("pe_triage_node-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # Dependencies from the test's own environment, after the wheel's own files.
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True, timeout=600,
    )
    return venv


def _run(venv: Path, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PETRIAGE_", "PYTHON"))}
    code = "import sys; from pe_triage_node.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", code, *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_wheel_carries_migrations_and_weights(installed: Path, tmp_path: Path) -> None:
    where = _run(installed, tmp_path, "check-config")
    assert where.returncode == 0, where.stderr
    probe = subprocess.run(
        [str(installed / "bin" / "python"), "-c",
         "import pe_triage_node, pe_triage_node.resources as r; print(pe_triage_node.__file__); "
         "print(r.migrations_dir()); print(r.demo_manifest().is_file())"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )
    package_file, migrations, has_weights = probe.stdout.split("\n")[:3]
    assert str(installed) in package_file, "the test must exercise the wheel, not the checkout"
    assert str(installed) in migrations and has_weights == "True"

    upgraded = _run(installed, tmp_path, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert (tmp_path / "var" / "node.db").is_file()
    current = _run(installed, tmp_path, "db", "current")
    assert current.returncode == 0 and "0" in current.stdout, current.stdout + current.stderr


def test_wheel_infers_with_the_shipped_weights(installed: Path, tmp_path: Path) -> None:

    series = tmp_path / "series"
    made = _run(installed, tmp_path, "synth", str(series), "--studies", "1", "--seed", "7", "--slices", "40")
    assert made.returncode == 0, made.stderr
    folder = next(p.parent for p in series.rglob("*.dcm"))
    inferred = _run(installed, tmp_path, "infer", str(folder))
    assert inferred.returncode == 0, inferred.stderr
    assert "NOT FOR DIAGNOSTIC USE" in (inferred.stdout + inferred.stderr).upper()
