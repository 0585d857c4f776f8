"""RIS/EHR peers on loopback for the HL7 and FHIR destination tests: built on libraries other than the sender's.

* :class:`MLLPListener` - python-hl7's asyncio MLLP server (the node builds with hl7apy):
  parses each message, checks its segments (:func:`oru_problems`) and answers
  AA, AE or AR as the test scripts it; a message that fails the checks is
  answered AR with the problems, so a test sees them in the job's last error.
* :class:`FHIRServer` - ``http.server`` that validates every resource of a
  posted Bundle with ``fhir.resources`` (R4B models, as R4) and checks the
  transaction (a request per entry, every ``urn:uuid`` reference resolved),
  then answers 200 (a transaction-response), 400 with an OperationOutcome, or 503.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
from collections.abc import Iterable
from typing import Any

import hl7
from hl7.mllp import start_hl7_server

from tests import peers

NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"


class _Script:
    """Answers taken in order; the last one repeats."""

    def __init__(self, answers: Iterable[Any]) -> None:
        self.answers = list(answers)
        self.lock = threading.Lock()

    def next(self) -> Any:
        with self.lock:
            return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


# -- HL7 v2 over MLLP ---------------------------------------------------------------


def oru_problems(msg: hl7.Message) -> list[str]:
    """What is wrong with an ORU^R01 v2.5.1 as the node must send it (empty: nothing)."""
    problems = []
    names = [str(seg[0]) for seg in msg]
    if str(msg.segment("MSH")[9]) != "ORU^R01^ORU_R01" or str(msg.segment("MSH")[12]) != "2.5.1":
        problems.append("not an ORU^R01 v2.5.1")
    for name in ("PID", "ORC", "OBR", "NTE", "TQ1", "OBX"):
        if name not in names:
            problems.append(f"no {name} segment")
    if problems:
        return problems
    if names.index("PID") > names.index("ORC") or names.index("ORC") > names.index("OBR") or names.index("OBR") > names.index("OBX"):
        problems.append("segments out of order")
    if not str(msg.segment("PID")[3]):
        problems.append("PID-3 (patient ID) empty")
    if str(msg.segment("OBR")[25]) != "P":
        problems.append("OBR-25 is not P (preliminary)")
    if str(msg.segment("TQ1")[9][0][0]) not in ("S", "A", "R"):
        problems.append("TQ1-9 priority is not S, A or R")
    if any(str(obx[11]) != "P" for obx in msg.segments("OBX")):
        problems.append("an OBX is not preliminary")
    if NOT_FOR_DIAGNOSTIC_USE not in str(msg.segment("NTE")[3]):
        problems.append("no not-for-diagnostic-use statement in NTE-3")
    return problems


class MLLPListener:
    """An MLLP server on loopback in its own thread and event loop; ``received``: every message parsed."""

    def __init__(self, answers: Iterable[str] = ("AA",), reason: str = "refused by the test", port: int | None = None) -> None:
        self.script = _Script(answers)
        self.reason = reason
        self.port = port or peers.free_port()
        self.received: list[hl7.Message] = []
        self.answered: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _client(self, reader: Any, writer: Any) -> None:
        try:
            while not reader.at_eof():
                try:
                    msg = await reader.readmessage()
                except asyncio.IncompleteReadError:
                    break
                self.received.append(msg)
                problems = oru_problems(msg)
                code = "AR" if problems else str(self.script.next())
                ack = msg.create_ack(code, application="RIS", facility="HOSPITAL")
                if code != "AA":
                    ack.segment("MSA").assign_field("; ".join(problems) or self.reason, 3)
                self.answered.append(code)
                writer.writemessage(ack)
                await writer.drain()
        finally:
            writer.close()

    def start(self) -> MLLPListener:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            start_hl7_server(self._client, "127.0.0.1", self.port, encoding="utf-8"), self._loop)
        self._server = future.result(10)
        peers.wait_for_port(self.port)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> MLLPListener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- FHIR -----------------------------------------------------------------------------


def bundle_problems(body: bytes) -> list[str]:
    """What is wrong with a posted transaction Bundle: every resource validated by ``fhir.resources``."""
    from fhir.resources.R4B.bundle import Bundle
    from pydantic import ValidationError

    try:
        bundle = Bundle.model_validate_json(body)
    except ValidationError as exc:
        return [f"invalid Bundle: {exc}"[:1000]]
    problems = []
    if bundle.type != "transaction":
        problems.append(f"Bundle.type is {bundle.type!r}, not transaction")
    entries = bundle.entry or []
    full_urls = {e.fullUrl for e in entries}
    for n, entry in enumerate(entries):
        if entry.request is None or entry.request.method != "POST":
            problems.append(f"entry {n} has no POST request")
        if entry.resource is None:
            problems.append(f"entry {n} has no resource")
    for reference in _references(json.loads(body)):
        if reference.startswith("urn:uuid:") and reference not in full_urls:
            problems.append(f"reference {reference} resolves to no entry")
    return problems


def _references(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["reference"]] if isinstance(node.get("reference"), str) else []
        return found + [r for v in node.values() for r in _references(v)]
    if isinstance(node, list):
        return [r for v in node for r in _references(v)]
    return []


def operation_outcome(text: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "processing", "details": {"text": text}}]}


class FHIRServer:
    """A FHIR endpoint on loopback: validates each POST, then answers as scripted (200, 400 or 503)."""

    def __init__(self, answers: Iterable[int] = (200,), reason: str = "refused by the test") -> None:
        self.script = _Script(answers)
        self.reason = reason
        self.bodies: list[bytes] = []
        self.authorizations: list[str | None] = []
        self.answered: list[int] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.bodies.append(body)
                server.authorizations.append(self.headers.get("Authorization"))
                problems = bundle_problems(body)
                status = 400 if problems else int(server.script.next())
                server.answered.append(status)
                if status == 200:
                    entries = json.loads(body).get("entry", [])
                    answer: dict[str, Any] = {"resourceType": "Bundle", "type": "transaction-response",
                                              "entry": [{"response": {"status": "201 Created"}} for _ in entries]}
                else:
                    answer = operation_outcome("; ".join(problems) or server.reason)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self._httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/fhir"

    def start(self) -> FHIRServer:
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FHIRServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def resources(self, index: int = -1) -> list[dict[str, Any]]:
        """The resources of the ``index``-th Bundle received, as JSON."""
        return [e["resource"] for e in json.loads(self.bodies[index])["entry"]]
