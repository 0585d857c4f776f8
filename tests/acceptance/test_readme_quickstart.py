"""The README's shell blocks, run as a user runs them: a copy of the project, every line as written.

The project is copied the way a user has it (the files git knows, no state,
default configuration, relative ``var/``). Every line of the README's ```sh
blocks then runs through bash from the copy's folder, in order: `./dev.sh run`
starts the node in the background, `./dev.sh test` and `./dev.sh fast` run the
suite this test belongs to (skipped here), every other line must succeed. Only the ports differ
(through the documented `PETRIAGE_*` variables and the storescu port argument)
and `/tmp/` is the test's own folder, so that the test never collides with a
node or files already there. The copy borrows this checkout's virtual
environment (installing torch again would take minutes).

After the README's lines, the real plain chest CTs of ``../shared/realdata``
are sent the same way. Every study must end in a result or a rejection a person
can read; none may be dead-lettered for a path or loading problem, and no
patient identifier may reach the node's log.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from pe_triage_node.db.models import Job, JobState, Series, SeriesState, Study, TriageResult
from pe_triage_node.db.session import make_engine
from tests import node_support, peers

pytestmark = pytest.mark.slow

ROOT = peers.PROJECT_ROOT
VENV = ROOT / ".venv"


def readme_commands() -> list[str]:
    """Every line of the README's ```sh blocks, comments stripped."""
    text = (ROOT / "README.md").read_text()
    lines: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            command = line.split(" #", 1)[0].strip()
            if command:
                lines.append(command)
    return lines


def copy_as_cloned(dest: Path) -> Path:
    """The files a clone holds (tracked, and new ones git does not ignore), with their times."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / ".venv").symlink_to(VENV)
    # dev.sh reinstalls when pyproject.toml is newer than the venv's stamp: not into the borrowed venv.
    stamp = (VENV / ".installed").stat().st_mtime if (VENV / ".installed").exists() else 0
    os.utime(dest / "pyproject.toml", (stamp - 60, stamp - 60))
    return dest


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    if not (VENV / "bin" / "pe-triage").exists():
        pytest.fail(f"no virtual environment at {VENV}: run ./dev.sh test (it installs it)")
    return copy_as_cloned(tmp_path / "pe-triage-node")


@pytest.fixture
def node(clone: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    port, web_port = peers.free_port(), peers.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PETRIAGE_")}
    env.update(PETRIAGE_RECEIVER__PORT=str(port), PETRIAGE_WEB__PORT=str(web_port), PYTHONUNBUFFERED="1")
    log_path = tmp_path / "node.log"
    with open(log_path, "wb") as log:
        (start,) = [line for line in readme_commands() if line.startswith("./dev.sh run")]
        proc = subprocess.Popen(["bash", "-c", start], cwd=clone, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        peers.wait_for_port(port, timeout=180, proc=proc)
        yield proc, port, log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def run_line(line: str, clone: Path, tmp: Path, port: int) -> subprocess.CompletedProcess[str]:
    """One README line through bash in the copy, ``/tmp/`` and the DICOM port moved to the test's own."""
    line = line.replace("/tmp/", f"{tmp}/").replace(" 11112 ", f" {port} ")
    env = {k: v for k, v in peers.dcmtk_env().items() if not k.startswith("PETRIAGE_")}
    return subprocess.run(["bash", "-c", line], cwd=clone, env=env, capture_output=True, text=True, timeout=900)


def outcome(engine_url: str, study_uid: str) -> tuple[str, str] | None:
    """("result", priority) or ("rejected", reasons) once the study has one, else None; fails on a dead job."""
    engine = make_engine(engine_url)
    try:
        with Session(engine) as s:
            dead = s.scalars(select(Job).where(Job.study_instance_uid == study_uid, Job.state == JobState.dead)).all()
            assert not dead, [j.last_error for j in dead]
            result = s.scalars(select(TriageResult).where(TriageResult.study_instance_uid == study_uid)).first()
            if result is not None:
                return "result", result.priority
            series = s.scalars(select(Series).join(Study).where(Study.study_instance_uid == study_uid)).all()
            if series and all(se.state in (SeriesState.rejected, SeriesState.ignored) for se in series):
                return "rejected", " | ".join(se.state_reason or "" for se in series)
            return None
    finally:
        engine.dispose()


def test_every_readme_line_runs_and_every_study_gets_an_outcome(
    clone: Path, node: tuple[subprocess.Popen[bytes], int, Path], tmp_path: Path
) -> None:
    proc, port, log_path = node
    ran = []
    for line in readme_commands():
        if line.startswith(("./dev.sh run", "./dev.sh test", "./dev.sh fast")):
            continue  # the node this test started; the test suite, which runs this test
        done = run_line(line, clone, tmp_path, port)
        assert done.returncode == 0, f"README line failed: {line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        ran.append(line)
    assert any(line.startswith("/usr/bin/storescu") for line in ran), "the README no longer sends a study"

    storescu = next(line for line in ran if line.startswith("/usr/bin/storescu"))
    folders = [tmp_path / "ctpa"]
    realdata = peers.realdata_dir()
    if realdata is not None:
        for folder in sorted(p for p in (realdata / "lung-pet-ct-dx").iterdir() if p.is_dir()):
            sent = run_line(storescu.replace("/tmp/ctpa", str(folder)), clone, tmp_path, port)
            assert sent.returncode == 0, sent.stdout + sent.stderr
            folders.append(folder)
    identifiers: list[str] = []
    studies: dict[str, Path] = {}
    for folder in folders:
        first = pydicom.dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True)
        studies[first.StudyInstanceUID] = folder
        identifiers += [str(first.PatientName), str(first.PatientID), str(first.get("AccessionNumber", ""))]

    url = f"sqlite:///{clone / 'var' / 'node.db'}"
    outcomes = {
        uid: node_support.wait_until(lambda uid=uid: outcome(url, uid), 600, f"an outcome for {folder.name}",
                                     procs=[proc], log_path=log_path)
        for uid, folder in studies.items()
    }
    kind, priority = outcomes.pop(next(iter(studies)))  # the README's phantom CTPA
    assert kind == "result" and priority in ("STAT", "URGENT", "ROUTINE")
    for uid, (kind, reasons) in outcomes.items():  # the real plain chest CTs: thick, no contrast
        assert kind == "rejected", studies[uid]
        assert "not a CTPA: slice thickness" in reasons, reasons

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    log = log_path.read_text(errors="replace")
    for value in filter(lambda v: len(v) > 3, identifiers):
        assert value not in log, "a patient identifier reached the node's log"
