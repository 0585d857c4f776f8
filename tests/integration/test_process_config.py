"""Each of the node's processes refuses an invalid configuration with its reason and exit code 2
(the supervisor and systemd do not restart a process for that)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import node_support


@pytest.mark.parametrize(
    ("module", "args", "prog"),
    [
        ("pe_triage_node.services.receiver_main", [], "pe-triage-receiver"),
        ("pe_triage_node.services.node", ["worker"], "pe-triage worker"),
        ("pe_triage_node.services.node", ["exporter"], "pe-triage exporter"),
    ],
)
def test_invalid_configuration_exits_2_with_the_reason(tmp_path: Path, module: str, args: list[str], prog: str) -> None:
    bad = tmp_path / "node.toml"
    bad.write_text('[receiver]\nport = "eleven thousand"\n')
    proc = subprocess.run([sys.executable, "-m", module, *args, "--config", str(bad)],
                          cwd=node_support.PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"{prog}: invalid configuration") and "receiver.port" in proc.stderr
