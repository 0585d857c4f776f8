"""``pe-triage demo``: a phantom CTPA in (``--case central|left|right|negative``; central PE by default),
the node's SR back, findings and time printed beside what a correct answer would be.

Two ways to run it:

* ``pe-triage demo`` (self-contained): starts a node (``pe-triage run``) with a
  temporary state folder and a configuration whose only export destination is
  the demo's own C-STORE receiver, sends the phantom, waits for the SR, prints,
  stops the node. Uses the shipped demo weights (``models/demo/manifest.json``);
  without them it runs with random weights and says that the findings mean nothing.
* ``pe-triage demo --node HOST:PORT --ae PETRIAGE``: sends to a running node. That
  node must have this machine's receiver as a destination::

      [[export.destinations]]
      name = "demo"
      ae_title = "DEMO"           # --listen-ae
      host = "<this machine>"
      port = 11113                # --listen-port

The time printed is from the C-STORE response to the last instance to the SR's
arrival at the demo receiver (assembly, queue, inference, rendering, export).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SR_MODALITY = "SR"


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """The ``pe-triage demo`` options."""
    p.add_argument("--node", default=None, metavar="HOST:PORT",
                   help="a running node to send to (default: start one for the demo)")
    p.add_argument("--ae", default="PETRIAGE", help="the node's AE title (default PETRIAGE)")
    p.add_argument("--calling-ae", default="DEMO-SCANNER", help="our AE title as the sender")
    p.add_argument("--listen-ae", default="DEMO", help="AE title of the demo's receiver (the node's destination)")
    p.add_argument("--listen-host", default=None, help="interface of the demo's receiver (default: 0.0.0.0 with --node, else 127.0.0.1)")
    p.add_argument("--listen-port", type=int, default=None, help="port of the demo's receiver (default: 11113 with --node, else a free one)")
    p.add_argument("--case", choices=sorted(DEMO_CASES), default="central",
                   help="the phantom to send: " + "; ".join(f"{k}: {c.description}" for k, c in DEMO_CASES.items()) + " (default central)")
    p.add_argument("--slices", type=int, default=64,
                   help="slices of the phantom (small phantom, 128 x 128; more when needed for slices of at most 3 mm)")
    p.add_argument("--seed", type=int, default=None, help="phantom seed (default: new each run)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the SR")
    p.add_argument("--random-weights", action="store_true", help="self-contained node with random weights (meaningless findings)")
    p.add_argument("--keep", type=Path, default=None, help="keep the phantom and the received objects in this folder")
    p.add_argument("--config", type=Path, default=None,
                   help="(self-contained) node configuration to start from; state, ports and destination are overridden")


# -- a local Storage SCP -----------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One object that arrived at the demo receiver."""

    at: float  # time.monotonic()
    dataset: Any


class DemoReceiver:
    """A pynetdicom Storage SCP (in this process) that keeps what it receives in a queue."""

    def __init__(self, ae_title: str, host: str, port: int, keep: Path | None = None) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        verification = "1.2.840.10008.1.1"  # Verification SOP Class (PS3.4 A.4)

        self.received: queue.SimpleQueue[Received] = queue.SimpleQueue()
        self.keep = keep
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(verification)
        ae.maximum_associations = 4
        self._ae = ae
        server = ae.start_server((host, port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        if server is None:  # pragma: no cover - block=False always returns the server
            raise RuntimeError("the demo receiver did not start")
        self._server = server

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        if self.keep is not None:
            self.keep.mkdir(parents=True, exist_ok=True)
            ds.save_as(self.keep / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        self.received.put(Received(time.monotonic(), ds))
        return 0x0000

    def wait_for_sr(self, study_uid: str, timeout: float) -> tuple[Received, list[Received]]:
        """The SR for ``study_uid`` and every other object of that study received so far."""
        deadline = time.monotonic() + timeout
        others: list[Received] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no SR came back within {timeout:.0f} s")
            try:
                item = self.received.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if str(item.dataset.get("StudyInstanceUID", "")) != study_uid:
                continue
            if item.dataset.get("Modality") == SR_MODALITY:
                # the SCs travel in the same association: collect those that follow shortly
                end = time.monotonic() + 3.0
                while time.monotonic() < end:
                    try:
                        more = self.received.get(timeout=max(0.05, end - time.monotonic()))
                    except queue.Empty:
                        break
                    if str(more.dataset.get("StudyInstanceUID", "")) == study_uid:
                        others.append(more)
                return item, others
            others.append(item)

    def close(self) -> None:
        self._server.shutdown()


# -- the phantom -------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoCase:
    """One kind of phantom the demo can send, and what a correct node answers."""

    description: str
    category: str  # the generator's study category
    sides: frozenset[str] | None  # embolus sides the phantom must show (None: no embolus)
    expected: str  # what the SR should say, printed beside the answer
    only: bool = True  # those sides and no other

    def matches(self, sides: set[str]) -> bool:
        if self.sides is None:
            return not sides
        return sides == self.sides if self.only else self.sides <= sides


DEMO_CASES: dict[str, DemoCase] = {
    "central": DemoCase("acute central PE", "positive", frozenset({"central"}), "PE present, central; STAT", only=False),
    "left": DemoCase("acute PE, left lung only", "positive", frozenset({"left"}), "PE present, left-sided"),
    "right": DemoCase("acute PE, right lung only", "positive", frozenset({"right"}), "PE present, right-sided"),
    "negative": DemoCase("no pulmonary embolism", "negative", None, "no PE; ROUTINE"),
}


# The node's default selection refuses reconstructions thicker than 3 mm as CTPA
# (selection.max_slice_thickness_mm): the demo's phantom stays within it.
DEMO_MAX_SLICE_MM = 3.0


def demo_phantom(case: str, out_dir: Path, *, slices: int, seed: int | None) -> tuple[Path, str, int]:
    """Write a small phantom CTPA of ``case`` (:data:`DEMO_CASES`); returns (series folder, study UID, seed).

    The phantom is rendered and its labels checked (an embolus too small for the grid is dropped
    by the renderer), so the case is what the labels say; the candidates are
    ``study_seed(seed, k)``, k = 0, 1, ..., so different seeds give different phantoms."""
    from pe_triage_node.synth.phantom import render_phantom, sample_spec, study_seed
    from pe_triage_node.synth.rspect import write_phantom_study

    want = DEMO_CASES[case]
    start = seed if seed is not None else int.from_bytes(os.urandom(3), "big")
    # candidates study_seed(seed, 0), (seed, 1), ...: each --seed its own phantom, even for rare cases
    for s in (study_seed(start, k) for k in range(500)):
        spec = sample_spec(
            s, size="small", slices=slices, category=want.category, pe_type="acute" if want.sides else None,  # type: ignore[arg-type]
            max_slice_spacing_mm=DEMO_MAX_SLICE_MM,
        )
        if not want.matches({e.side for e in spec.emboli}):
            continue
        phantom = render_phantom(spec)
        if not want.matches({e.side for e in phantom.emboli}) or phantom.pe_positive != (want.sides is not None):
            continue
        written = write_phantom_study(phantom, out_dir, split="demo")
        return written.series_dir, written.study_instance_uid, s
    raise RuntimeError(f"no {want.description} phantom found among 500 seeds")


def send_series(folder: Path, host: str, port: int, *, called_ae: str, calling_ae: str) -> float:
    """C-STORE every file of ``folder`` in one association; returns ``time.monotonic()`` at the last response."""
    import pydicom
    from pydicom.uid import CTImageStorage
    from pynetdicom import AE

    files = sorted(folder.glob("*.dcm"))
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise ConnectionError(f"the node at {host}:{port} ({called_ae}) refused or did not answer the association")
    last = 0.0
    try:
        for path in files:
            status = assoc.send_c_store(pydicom.dcmread(path))
            code = int(getattr(status, "Status", -1))
            if code not in (0x0000, 0xB000, 0xB006, 0xB007):
                raise RuntimeError(f"the node answered C-STORE with status 0x{code:04X}")
            last = time.monotonic()
    finally:
        assoc.release()
    return last


# -- reading the SR ----------------------------------------------------------------------


_SKIP_CONTAINERS = {"Image Library"}
_SKIP_NAMES = {"Language of Content Item and Descendants", "Procedure reported", "Tracking Identifier",
               "Observer Type", "Algorithm Parameters"}


def sr_lines(ds: Any) -> list[str]:
    """The SR's coded findings, probabilities, priority and statement as ``name: value`` lines (TID 1500 content)."""
    lines: list[str] = []

    def walk(items: Any, depth: int) -> None:
        for item in items or []:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            vt = item.get("ValueType", "")
            if name in _SKIP_CONTAINERS or name in _SKIP_NAMES:
                continue
            if vt == "CODE" and "ConceptCodeSequence" in item:
                lines.append(f"{'  ' * depth}{name}: {item.ConceptCodeSequence[0].CodeMeaning}")
            elif vt == "NUM" and "MeasuredValueSequence" in item and name.startswith("Probability"):
                mv = item.MeasuredValueSequence[0]
                lines.append(f"{'  ' * depth}{name}: {float(mv.NumericValue):.3f}")
            elif vt == "TEXT" and "TextValue" in item and ("diagnostic" in name.lower() or "rule" in name.lower()):
                lines.append(f"{'  ' * depth}{name}: {item.TextValue}")
            walk(item.get("ContentSequence"), depth)

    walk(ds.get("ContentSequence"), 0)
    return lines


# -- a node for the demo -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the demo node exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"the demo node did not listen on port {port} within {timeout:.0f} s")


def demo_environment(tmp: Path, node_port: int, listen_ae: str, listen_port: int) -> dict[str, str]:
    """``PETRIAGE_*`` overrides for the self-contained demo node (they beat any configuration file):
    state under ``tmp``, loopback only, short quiet period, the demo receiver as the only destination."""
    dest = [{"name": "demo", "ae_title": listen_ae, "host": "127.0.0.1", "port": listen_port}]
    return {
        "PETRIAGE_NODE__VAR_DIR": str(tmp / "var"),
        "PETRIAGE_DATABASE__URL": "sqlite:///{var_dir}/node.db",
        "PETRIAGE_RECEIVER__HOST": "127.0.0.1",
        "PETRIAGE_RECEIVER__PORT": str(node_port),
        "PETRIAGE_RECEIVER__MIN_FREE_MB": "0",
        "PETRIAGE_ASSEMBLY__QUIET_PERIOD_S": "5",
        "PETRIAGE_ASSEMBLY__CHECK_INTERVAL_S": "0.5",
        "PETRIAGE_QUEUE__POLL_INTERVAL_S": "0.2",
        "PETRIAGE_EXPORT__POLL_INTERVAL_S": "0.2",
        "PETRIAGE_EXPORT__DESTINATIONS": json.dumps(dest),
        "PETRIAGE_WORKER__PROCESSES": "1",
        "PETRIAGE_WORKER__RUN_WEB": "false",
    }


def run_demo(args: argparse.Namespace) -> int:
    """The ``pe-triage demo`` command."""
    self_contained = args.node is None
    listen_host = args.listen_host or ("127.0.0.1" if self_contained else "0.0.0.0")
    listen_port = args.listen_port or (_free_port() if self_contained else 11113)
    tmp = Path(tempfile.mkdtemp(prefix="pe-triage-demo-"))
    keep_tmp = False
    node: subprocess.Popen[bytes] | None = None
    receiver = DemoReceiver(args.listen_ae, listen_host, listen_port, keep=(args.keep / "received") if args.keep else None)
    try:
        case = DEMO_CASES[args.case]
        series_dir, study_uid, seed = demo_phantom(args.case, args.keep or tmp, slices=args.slices, seed=args.seed)
        print(f"phantom CTPA ({case.description}, seed {seed}): {len(list(series_dir.glob('*.dcm')))} slices")
        if self_contained:
            from pe_triage_node.config import load_config
            from pe_triage_node.inference.weights import default_manifest_path

            node_port = _free_port()
            env = {**os.environ, **demo_environment(tmp, node_port, args.listen_ae, listen_port)}
            cmd = [sys.executable, "-m", "pe_triage_node.cli", "run", "--no-web"]
            if args.config is not None:
                cmd += ["--config", str(args.config)]
            manifest = load_config(args.config).inference.weights_manifest if args.config else None
            has_weights = (manifest or default_manifest_path()).is_file()
            if args.random_weights or not has_weights:
                print("NOTE: no demo weights (models/demo/manifest.json): the node runs RANDOM weights, "
                      "the findings below are meaningless")
                cmd.append("--random-weights")
            with open(tmp / "node.log", "wb") as node_log:
                node = subprocess.Popen(cmd, stdout=node_log, stderr=subprocess.STDOUT, env=env)
            print(f"node started for the demo (port {node_port}, log {tmp / 'node.log'})")
            _wait_for_port(node_port, node, timeout=120)
            host, port = "127.0.0.1", node_port
        else:
            host, _, port_text = args.node.rpartition(":")
            host, port = host or "127.0.0.1", int(port_text)
            print(f"sending to {args.ae}@{host}:{port}; the node must list {args.listen_ae} "
                  f"(this machine, port {listen_port}) as an export destination")
        last_ack = send_series(series_dir, host, port, called_ae=args.ae, calling_ae=args.calling_ae)
        print("sent; waiting for the structured report...")
        sr, others = receiver.wait_for_sr(study_uid, args.timeout)
        took = sr.at - last_ack
        print()
        print(f"  {sr.dataset.get('SeriesDescription', '')}")
        for line in sr_lines(sr.dataset):
            print(f"  {line}")
        print(f"  + {sum(1 for o in others if o.dataset.get('Modality') != SR_MODALITY)} secondary capture(s)")
        print(f"  (the phantom: {case.description}; a correct answer: {case.expected})")
        print()
        print(f"SR back {took:.1f} s after the last instance was acknowledged. NOT FOR DIAGNOSTIC USE.")
        return 0
    except (TimeoutError, ConnectionError, RuntimeError) as exc:
        print(f"pe-triage demo: {exc}", file=sys.stderr)
        if node is not None:
            print(f"node log: {tmp / 'node.log'} (kept)", file=sys.stderr)
            keep_tmp = True  # the log is worth a look
        return 1
    finally:
        receiver.close()
        if node is not None and node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(timeout=150)
            except subprocess.TimeoutExpired:
                node.kill()
        if not keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
