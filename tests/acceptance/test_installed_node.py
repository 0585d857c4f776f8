"""The node installed as the README's systemd guide installs it: a plain `pip install`, the units' own commands.

The wheel is built from this checkout and installed (not editable) into a
virtual environment laid out like ``/opt/pe-triage/.venv``; it borrows the
installed dependencies (torch is 5 GB: no download). Everything then runs from
folders outside the checkout: migrations and demo weights must come with the
package. The systemd units cannot be started here (no systemd), so their
``ExecStartPre``/``ExecStart`` lines are run as written, with the install
prefix, the configuration path and the state folder moved under the test's
temporary folder; a phantom CTPA sent with dcmtk comes back as an SR at a dcmtk
``storescp``.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import node_support, peers

pytestmark = pytest.mark.slow
ROOT = peers.PROJECT_ROOT
UNITS = ROOT / "systemd"


@pytest.fixture(scope="module")
def opt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<tmp>/opt/pe-triage`` with ``.venv`` holding the wheel of this checkout."""
    tmp = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(ROOT)],
                   check=True, cwd=tmp, timeout=900)
    wheel = next((tmp / "dist").glob("pe_triage_node-*.whl"))
    prefix = tmp / "opt" / "pe-triage"
    venv = prefix / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=900)
    # The console script as pip would write it into the venv's bin/.
    script = venv / "bin" / "pe-triage"
    script.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom pe_triage_node.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    return prefix


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PETRIAGE_", "PYTHON"))}
    env.update(extra)
    return env


def pe_triage(opt: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(opt / ".venv" / "bin" / "pe-triage"), *args], cwd=cwd, env=clean_env(),
                          capture_output=True, text=True, timeout=600)


def test_the_package_carries_its_migrations_and_weights(opt: Path, tmp_path: Path) -> None:
    probe = subprocess.run(
        [str(opt / ".venv" / "bin" / "python"), "-c",
         "import pe_triage_node, pe_triage_node.resources as r; print(pe_triage_node.__file__); "
         "print(r.migrations_dir()); print(r.demo_manifest().is_file())"],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, check=True,
    )
    package_file, migrations, has_weights = probe.stdout.split("\n")[:3]
    assert package_file.startswith(str(opt)), "the test must exercise the installed wheel, not the checkout"
    assert migrations.startswith(str(opt)) and has_weights == "True"
    upgraded = pe_triage(opt, tmp_path, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    current = pe_triage(opt, tmp_path, "db", "current")
    assert current.returncode == 0 and re.search(r"\b\d{4}\b", current.stdout), current.stdout + current.stderr


def unit_commands(unit: str, opt: Path, config: Path) -> list[list[str]]:
    """The unit's ExecStartPre/ExecStart lines, with the install prefix and configuration moved."""
    commands = []
    for line in (UNITS / unit).read_text().splitlines():
        key, _, value = line.partition("=")
        if key in ("ExecStartPre", "ExecStart"):
            value = value.replace("/opt/pe-triage", str(opt)).replace("/etc/pe-triage/node.toml", str(config))
            commands.append(shlex.split(value))
    assert commands, f"{unit} has no ExecStart"
    return commands


@pytest.fixture
def services(opt: Path, tmp_path: Path) -> Iterator[tuple[int, Path, Path]]:
    """The receiver, a CPU worker, the exporter and the web console as their units start them."""
    state = tmp_path / "var" / "lib" / "pe-triage"
    state.mkdir(parents=True)
    port, web_port, pacs_port = peers.free_port(), peers.free_port(), peers.free_port()
    pacs = peers.start_storescp(pacs_port, tmp_path / "pacs")
    text = (ROOT / "config" / "node.toml").read_text()
    text = text.replace('var_dir = "var"', f'var_dir = "{state}"').replace('host = "0.0.0.0"', 'host = "127.0.0.1"')
    text = text.replace("port = 11112", f"port = {port}").replace("port = 8080", f"port = {web_port}")
    text = re.sub(r"(?m)^destinations = \[\]$", "", text)  # the default: none; one is added below
    text += f'\n[[export.destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs_port}\n'
    config = tmp_path / "etc" / "pe-triage" / "node.toml"
    config.parent.mkdir(parents=True)
    config.write_text(text)
    log_path = tmp_path / "journal.log"
    procs: list[subprocess.Popen[bytes]] = []
    units = {"pe-triage-receiver.service": {}, "pe-triage-worker@.service": {"CUDA_VISIBLE_DEVICES": "cpu"},
             "pe-triage-exporter.service": {}, "pe-triage-web.service": {}}
    try:
        with open(log_path, "ab") as log:
            for unit, environment in units.items():
                *pre, start = unit_commands(unit, opt, config)
                for command in pre:
                    subprocess.run(command, cwd=state, env=clean_env(**environment), check=True, timeout=300)
                procs.append(subprocess.Popen(start, cwd=state, env=clean_env(PYTHONUNBUFFERED="1", **environment),
                                              stdout=log, stderr=subprocess.STDOUT))
        peers.wait_for_port(port, timeout=120, proc=procs[0])
        peers.wait_for_port(web_port, timeout=120, proc=procs[3])
        yield port, tmp_path / "pacs", log_path
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        # systemd counts an exit on SIGTERM as clean, as it does exit code 0.
        clean = [proc.wait(timeout=300) in (0, -signal.SIGTERM) for proc in procs]
        assert clean == [True] * 4, log_path.read_text()[-4000:]
        assert "Traceback" not in log_path.read_text(), log_path.read_text()[-4000:]
    finally:
        for proc in procs:
            peers.stop_process(proc)
        peers.stop_process(pacs)


def test_the_units_commands_run_the_node(opt: Path, services: tuple[int, Path, Path], tmp_path: Path) -> None:
    port, pacs_dir, log_path = services
    made = pe_triage(opt, tmp_path, "synth", str(tmp_path / "ctpa"), "--studies", "1", "--size", "full",
                     "--slices", "60", "--seed", "5")
    assert made.returncode == 0, made.stderr
    sent = peers.storescu(port, [tmp_path / "ctpa"])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    node_support.wait_until(lambda: list(pacs_dir.rglob("SR*")), 600, "the SR at the PACS", log_path=log_path)
