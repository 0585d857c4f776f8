"""The ``pe-triage run`` supervisor: restarts a child that dies, leaves a child without weights down, stops all on request."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from pe_triage_node.config import NodeConfig
from pe_triage_node.services.node import NodeSupervisor, child_command


def test_child_commands_name_the_role_config_and_random_weights(tmp_path: Path) -> None:
    cmd = child_command("worker", tmp_path / "node.toml", random_weights=True)
    assert cmd[1:4] == ["-m", "pe_triage_node.services.node", "worker"]
    assert cmd[-3:] == ["--config", str(tmp_path / "node.toml"), "--random-weights"]
    assert "--random-weights" not in child_command("receiver", None, random_weights=True)


def test_supervisor_restarts_crashes_gives_up_on_missing_weights_and_stops(tmp_path: Path) -> None:
    cfg = NodeConfig(node={"var_dir": tmp_path}, worker={"processes": 1, "run_web": False})
    sup = NodeSupervisor(cfg, None)
    assert [c.role for c in sup.children] == ["receiver", "worker", "exporter"]
    starts = tmp_path / "starts"
    starts.mkdir()
    # receiver: crashes at once (restarted); worker: "no weights" (exit 3, left down); exporter: runs until SIGTERM
    crash = f"import pathlib,uuid,sys; pathlib.Path({str(starts)!r}, uuid.uuid4().hex).touch(); sys.exit(1)"
    sup.children[0].command = [sys.executable, "-c", crash]
    sup.children[1].command = [sys.executable, "-c", "import sys; sys.exit(3)"]
    sup.children[2].command = [sys.executable, "-c", "import time\nwhile True: time.sleep(0.1)"]

    def stop_when_restarted() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(starts.iterdir())) < 2:
            time.sleep(0.05)
        sup.stop.set()

    watcher = threading.Thread(target=stop_when_restarted)
    watcher.start()
    assert sup.run() == 0
    watcher.join()
    assert len(list(starts.iterdir())) >= 2, "the crashed receiver was started again"
    assert sup.children[1].given_up, "a worker without weights is not restarted"
    exporter = sup.children[2].proc
    assert exporter is not None and exporter.poll() is not None, "SIGTERM stopped the long-running child"
