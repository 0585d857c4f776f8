"""``pe-triage demo``: one command, a phantom (central PE, or no PE) in, the SR's findings and the time out."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests import node_support

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("case", ["central", "negative"])
def test_self_contained_demo_prints_findings_priority_and_time(case: str) -> None:
    cmd = [sys.executable, "-m", "pe_triage_node.cli", "demo", "--case", case, "--slices", "40", "--seed", "2", "--timeout", "240"]
    if not node_support.DEMO_MANIFEST.is_file():
        cmd.append("--random-weights")
    proc = subprocess.run(cmd, cwd=node_support.PROJECT_ROOT, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "AI PE TRIAGE:" in out  # the SR's series description
    assert "Pulmonary embolism: " in out and "AI triage priority: " in out
    assert "secondary capture(s)" in out and "s after the last instance was acknowledged" in out
    assert ("acute central PE" if case == "central" else "no pulmonary embolism") in out  # the case sent, said
