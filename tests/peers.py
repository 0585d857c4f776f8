"""Real DICOM peers on loopback for tests and benchmarks: dcmtk, Orthanc and the node's receiver.

dcmtk tools are called by their absolute path under ``/usr/bin`` and checked once
to be dcmtk's (:func:`dcmtk`): with the project's virtual environment active,
``storescu``, ``storescp`` and ``echoscu`` on the PATH are pynetdicom's console
scripts of the same name. Every dcmtk/Orthanc process gets ``TCP_NODELAY=1``
(PEERS.md: without it Nagle's algorithm caps storescp at ~22 images/s).
Readiness is awaited on the port, never with a fixed sleep. Processes are
stopped by the PID we started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REALDATA_DIR = PROJECT_ROOT.parent / "shared" / "realdata"
DCMTK_BIN = Path("/usr/bin")


@cache
def dcmtk(tool: str) -> str:
    """Absolute path of dcmtk's ``tool`` (``storescu``, ``storescp``, ...), checked with ``--version``."""
    path = DCMTK_BIN / tool
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        raise RuntimeError(f"dcmtk's {tool} not found at {path}: {exc}") from exc
    if "$dcmtk:" not in out.stdout + out.stderr:
        raise RuntimeError(f"{path} is not dcmtk's {tool}: --version said {(out.stdout + out.stderr)[:200]!r}")
    return str(path)


def realdata_dir() -> Path | None:
    """``../shared/realdata`` relative to the project root, or ``None`` when absent."""
    return REALDATA_DIR if REALDATA_DIR.is_dir() else None


def dcmtk_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    if extra:
        env.update(extra)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0, proc: subprocess.Popen[Any] | None = None) -> None:
    """Return once ``host:port`` accepts TCP connections; raise if ``proc`` dies or on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


def wait_for_port_closed(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                pass
        except OSError:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} still open after {timeout} s")


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 20.0) -> None:
    """SIGTERM, wait, then SIGKILL the process we started."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# -- dcmtk SCUs ------------------------------------------------------------------------
def storescu(
    port: int,
    paths: Sequence[Path],
    *,
    calling: str = "SCANNER",
    called: str = "PETRIAGE",
    extra: Sequence[str] = (),
    timeout: float = 300.0,
    host: str = "127.0.0.1",
) -> subprocess.CompletedProcess[str]:
    """Send files/folders in one association with dcmtk ``storescu`` (folders scanned for ``*.dcm``)."""
    cmd = [dcmtk("storescu"), "-aet", calling, "-aec", called, *extra]
    if any(p.is_dir() for p in paths):
        cmd += ["+sd", "+r", "+sp", "*.dcm"]
    cmd += [host, str(port), *[str(p) for p in paths]]
    return subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout)


def storescu_popen(
    port: int, paths: Sequence[Path], *, calling: str = "SCANNER", called: str = "PETRIAGE", extra: Sequence[str] = ()
) -> subprocess.Popen[str]:
    cmd = [dcmtk("storescu"), "-aet", calling, "-aec", called, *extra]
    if any(p.is_dir() for p in paths):
        cmd += ["+sd", "+r", "+sp", "*.dcm"]
    cmd += ["127.0.0.1", str(port), *[str(p) for p in paths]]
    return subprocess.Popen(cmd, env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def echoscu(
    port: int, *, calling: str = "SCANNER", called: str = "PETRIAGE", extra: Sequence[str] = (), timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    cmd = [dcmtk("echoscu"), "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port)]
    return subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout)


# -- reference SCPs ------------------------------------------------------------------------
def start_storescp(port: int, out_dir: Path, *, aet: str = "PACS") -> subprocess.Popen[bytes]:
    """dcmtk ``storescp`` writing every instance under ``out_dir`` (no fsync: its normal behaviour)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", aet, "-od", str(out_dir), str(port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, proc=proc)
    return proc


ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian's orthanc-dicomweb


def start_orthanc(
    tmp: Path, dicom_port: int, http_port: int, *, aet: str = "PACS", dicomweb: bool = False
) -> subprocess.Popen[bytes]:
    """Orthanc with its own JSON configuration under ``tmp`` (loopback only); ``dicomweb``: with its
    DICOMweb plugin, QIDO-RS / WADO-RS / STOW-RS under ``http://127.0.0.1:<http_port>/dicom-web/``."""
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = {
        "Name": "TestPACS",
        "StorageDirectory": str(tmp / "storage"),
        "IndexDirectory": str(tmp / "index"),
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {},
    }
    if dicomweb:
        if not ORTHANC_DICOMWEB_PLUGIN.is_file():
            raise RuntimeError(f"{ORTHANC_DICOMWEB_PLUGIN} missing: apt-get install orthanc-dicomweb")
        cfg.update({"Plugins": [str(ORTHANC_DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}})
    path = tmp / "orthanc.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        ["Orthanc", str(path)], env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_port(http_port, proc=proc, timeout=60)
    wait_for_port(dicom_port, proc=proc, timeout=60)
    return proc


# -- the node's receiver as a real process -------------------------------------------------------
def write_receiver_config(
    tmp: Path,
    port: int,
    *,
    database_url: str | None = None,
    receiver: Mapping[str, Any] | None = None,
    tls: Mapping[str, Any] | None = None,
    selection: Mapping[str, Any] | None = None,
) -> Path:
    """A node.toml for a receiver on loopback with all state under ``tmp``."""
    var = tmp / "var"
    lines = ["[node]", f"var_dir = {json.dumps(str(var))}", 'log_level = "INFO"', "", "[receiver]"]
    settings: dict[str, Any] = {"host": "127.0.0.1", "port": port, "min_free_mb": 0}
    settings.update(receiver or {})
    for key, value in settings.items():
        lines.append(f"{key} = {json.dumps(value)}")
    if tls:
        lines.append("")
        lines.append("[receiver.tls]")
        for key, value in tls.items():
            lines.append(f"{key} = {json.dumps(str(value) if isinstance(value, Path) else value)}")
    if selection:
        lines += ["", "[selection]"] + [f"{key} = {json.dumps(value)}" for key, value in selection.items()]
    if database_url:
        lines += ["", "[database]", f"url = {json.dumps(database_url)}"]
    path = tmp / "node.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_receiver(
    config: Path, port: int, *, log_path: Path | None = None, assembly: bool = False, timeout: float = 60.0
) -> subprocess.Popen[bytes]:
    """Start ``python -m pe_triage_node.services.receiver_main`` and wait for its port."""
    cmd = [sys.executable, "-m", "pe_triage_node.services.receiver_main", "--config", str(config)]
    if not assembly:
        cmd.append("--no-assembly")
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=log)
    wait_for_port(port, proc=proc, timeout=timeout)
    return proc
