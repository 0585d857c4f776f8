"""The node's C-STORE-RSP encoding sends the bytes pynetdicom's own encoding sends."""

from __future__ import annotations

import pytest
from pydicom.uid import CTImageStorage
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from pe_triage_node.dicom.store_response import store_response_command


def _response(status: int, sop_instance: str = "1.2.826.0.1.3680043.10.1453.1", message_id: int = 7) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    return rsp


def _pynetdicom_bytes(rsp: C_STORE, context_id: int = 3) -> bytes:
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    (pdata,) = list(msg.encode_msg(context_id, 16384))
    ((cx, value),) = pdata.presentation_data_value_list
    assert cx == context_id
    return bytes(value)


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xC210, 0x0110, 0xB000])
@pytest.mark.parametrize("sop_instance", ["1.2.826.0.1.3680043.10.1453.1", "1.2.826.0.1.3680043.10.1453.12"])
@pytest.mark.parametrize("message_id", [1, 65535])
def test_plain_responses_are_the_bytes_pynetdicom_sends(status: int, sop_instance: str, message_id: int) -> None:
    rsp = _response(status, sop_instance, message_id)
    command = store_response_command(rsp)
    assert command is not None
    assert b"\x03" + command == _pynetdicom_bytes(rsp)


def test_responses_with_more_than_a_status_take_pynetdicoms_path() -> None:
    commented = _response(0xC210)
    commented.ErrorComment = "cannot understand"
    offending = _response(0xA900)
    offending.OffendingElement = [0x00080016]
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = "1.2.3"
    request.Priority = 2
    no_uid = _response(0x0000)
    no_uid.AffectedSOPInstanceUID = None
    for primitive in (commented, offending, request, no_uid):
        assert store_response_command(primitive) is None
