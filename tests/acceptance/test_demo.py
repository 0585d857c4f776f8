"""``pe-triage demo``: one command, a phantom with a central PE in, the SR's findings and the time out."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests import node_support

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("slices", [[], ["--slices", "40"]], ids=["default", "thick-slices"])
def test_self_contained_demo_prints_findings_priority_and_time(slices: list[str]) -> None:
    """The default phantom passes the node's default selection; a 40-slice one (5 mm) only because
    the demo widens its own node's limit, and says so."""
    cmd = [sys.executable, "-m", "pe_triage_node.cli", "demo", *slices, "--seed", "2", "--timeout", "240"]
    if not node_support.DEMO_MANIFEST.is_file():
        cmd.append("--random-weights")
    proc = subprocess.run(cmd, cwd=node_support.PROJECT_ROOT, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "AI PE TRIAGE:" in out  # the SR's series description
    assert "Pulmonary embolism: " in out and "AI triage priority: " in out
    assert "secondary capture(s)" in out and "s after the last instance was acknowledged" in out
    widened = "NOTE: 5.0 mm slices are thicker than a CTPA's" in out
    assert widened == bool(slices), out
