"""The package type-checks (mypy, DESIGN.md convention 9) and has no unused or undefined names (ruff F)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_on_the_whole_package() -> None:
    # The project's own cache (.mypy_cache, ignored by git): a second run checks only what changed.
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "pe_triage_node"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_pyflakes_rules() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "F,E9", "--output-format", "concise",
         "pe_triage_node", "tests", "training", "benchmarks"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
