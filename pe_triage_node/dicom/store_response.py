"""The C-STORE-RSP (PS3.7 9.3.1.2) of the node's Storage SCP, encoded without pydicom.

pynetdicom turns each response primitive into a pydicom Dataset and encodes it
twice (the second time for the group length): about as much CPU as the rest of
an instance's handling in the node. A C-STORE response that carries only the
status, the message ID and the two affected UIDs (every response the node's
handler gives) is encoded here in implicit VR little endian, the bytes
pynetdicom sends (checked by a unit test); anything else, or an association with
an EVT_DIMSE_SENT handler bound, takes pynetdicom's path. Installed on each
association by :mod:`pe_triage_node.dicom.upper_layer`, which pins the code it replaces.
"""

from __future__ import annotations

import struct
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
_LAST_COMMAND_FRAGMENT = b"\x03"  # PS3.8 E.2: command, last fragment


def _element(element: int, value: bytes) -> bytes:
    """One command element (group 0000), implicit VR little endian."""
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def _uid(value: Any) -> bytes:
    encoded = str(value).encode("ascii")
    return encoded + b"\x00" if len(encoded) % 2 else encoded


def store_response_command(primitive: C_STORE) -> bytes | None:
    """The encoded command set of a plain C-STORE response; ``None`` for any other primitive."""
    if (
        primitive.MessageIDBeingRespondedTo is None
        or primitive.Status is None
        or primitive.AffectedSOPClassUID is None
        or primitive.AffectedSOPInstanceUID is None
        or primitive.ErrorComment is not None
        or primitive.OffendingElement is not None
        or primitive.DataSet is not None
        or getattr(primitive, "_dataset_path", None)
    ):
        return None
    try:
        body = b"".join(
            (
                _element(0x0002, _uid(primitive.AffectedSOPClassUID)),
                _element(0x0100, struct.pack("<H", _C_STORE_RSP)),
                _element(0x0120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)),
                _element(0x0800, struct.pack("<H", _NO_DATA_SET)),
                _element(0x0900, struct.pack("<H", primitive.Status)),
                _element(0x1000, _uid(primitive.AffectedSOPInstanceUID)),
            )
        )
    except (UnicodeError, struct.error):
        return None
    return _element(0x0000, struct.pack("<L", len(body))) + body


class StoreResponseDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, plain C-STORE responses encoded by :func:`store_response_command`."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        command = store_response_command(primitive) if isinstance(primitive, C_STORE) else None
        max_pdu = self.maximum_pdu_size
        if command is None or (max_pdu and len(command) + 6 > max_pdu) or self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, _LAST_COMMAND_FRAGMENT + command))
        self.dul.send_pdu(pdata)
