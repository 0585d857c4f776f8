"""The receiver's upper layer in-process with a pynetdicom SCU: pynetdicom's events all still fire."""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pe_triage_node.dicom.upper_layer import BoundedAssociationServer, WakingDUL

EVENTS = [
    evt.EVT_CONN_OPEN,
    evt.EVT_DATA_RECV,
    evt.EVT_PDU_RECV,
    evt.EVT_REQUESTED,
    evt.EVT_ACCEPTED,
    evt.EVT_DIMSE_RECV,
    evt.EVT_RELEASED,
    evt.EVT_CONN_CLOSE,
]


@pytest.fixture
def server() -> Iterator[tuple[BoundedAssociationServer, dict[str, list[Any]]]]:
    seen: dict[str, list[Any]] = collections.defaultdict(list)
    lock = threading.Lock()

    def record(event: evt.Event) -> None:
        with lock:
            seen[event.event.name].append(getattr(event, "pdu", None))
            seen["dul classes"].append(type(event.assoc.dul))

    ae = AE(ae_title="PETRIAGE")
    ae.maximum_pdu_size = 16384
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    handlers: list[Any] = [(e, record) for e in EVENTS]
    handlers.append((evt.EVT_C_STORE, lambda event: 0x0000))
    srv = ae.make_server(("127.0.0.1", 0), evt_handlers=handlers, server_class=BoundedAssociationServer)
    ae._servers.append(srv)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, seen
    srv.shutdown()


def _ct(rows: int = 128) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated = 16
    ds.PixelData = np.zeros((rows, rows), np.uint16).tobytes()  # 32 KiB: more than one 16 KiB PDU
    return ds


def test_events_fire_for_every_pdu_through_the_gate(server: tuple[BoundedAssociationServer, dict[str, list[Any]]]) -> None:
    srv, seen = server
    scu = AE(ae_title="SCANNER")
    scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = scu.associate("127.0.0.1", srv.server_address[1], ae_title="PETRIAGE")
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 16384
    status = assoc.send_c_store(_ct())
    assert int(status.Status) == 0x0000
    assoc.release()
    for _ in range(100):
        if seen["EVT_CONN_CLOSE"]:
            break
        threading.Event().wait(0.05)
    for event in EVENTS:
        assert seen[event.name], f"{event.name} never fired"
    pdu_types = [pdu.pdu_type for pdu in seen["EVT_PDU_RECV"]]
    assert pdu_types[0] == 0x01  # the A-ASSOCIATE-RQ the gate read, decoded by pynetdicom
    assert pdu_types.count(0x04) >= 3  # the C-STORE in several P-DATA-TF PDUs
    assert pdu_types[-1] == 0x05  # A-RELEASE-RQ
    assert set(seen["dul classes"]) == {WakingDUL}  # bounded reads, waits instead of polls


def test_associations_share_the_servers_contexts_unchanged(server: tuple[BoundedAssociationServer, dict[str, list[Any]]]) -> None:
    """Each association gets a copy of the list, not of the contexts (SharedContexts); negotiation leaves
    them as they were, so a later association that proposes other transfer syntaxes negotiates afresh."""
    import copy

    from pydicom.uid import ImplicitVRLittleEndian

    srv, _seen = server
    before = [(cx.context_id, cx.abstract_syntax, list(cx.transfer_syntax), cx.scu_role, cx.scp_role) for cx in srv.contexts]
    copied = copy.deepcopy(srv.contexts)
    assert copied is not srv.contexts and all(a is b for a, b in zip(copied, srv.contexts, strict=True))
    for proposed, accepted in ((ExplicitVRLittleEndian, True), (ImplicitVRLittleEndian, False), (ExplicitVRLittleEndian, True)):
        scu = AE(ae_title="SCANNER")
        scu.add_requested_context(CTImageStorage, proposed)
        assoc = scu.associate("127.0.0.1", srv.server_address[1], ae_title="PETRIAGE")
        assert assoc.is_established is accepted  # no context accepted: pynetdicom's SCU aborts
        if accepted:
            assert int(assoc.send_c_store(_ct()).Status) == 0x0000
            assoc.release()
    after = [(cx.context_id, cx.abstract_syntax, list(cx.transfer_syntax), cx.scu_role, cx.scp_role) for cx in srv.contexts]
    assert after == before
