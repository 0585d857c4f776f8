"""Reference receiver for ``benchmarks/ingest.py``: stock pynetdicom, a C-STORE handler that does nothing.

    python benchmarks/noop_scp.py PORT [AE_TITLE]

It answers 0x0000 without writing anything (stock pynetdicom: none of the node's
upper layer, its own logging handlers bound): the speed of pynetdicom's own
protocol path on this machine, the ceiling of any receiver built on it in one
process. It advertises the node's default maximum PDU length (dcmtk's storescu
sends 128 KiB PDUs to either).
"""

from __future__ import annotations

import sys

from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

ALL_TRANSFER_SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]


def main() -> int:
    port = int(sys.argv[1])
    ae = AE(ae_title=sys.argv[2] if len(sys.argv) > 2 else "PETRIAGE")
    ae.maximum_pdu_size = 131072
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
