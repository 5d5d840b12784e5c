"""A pynetdicom Storage SCP that stores nothing: the ceiling of the DICOM library as the node runs it, for P1.

``python -m bench.bare_scp PORT [AE_TITLE]``: accepts every storage SOP class (Explicit and Implicit VR Little
Endian), takes the encoded dataset like the node does, answers Success and keeps nothing. Its associations run
as the node's do (``dicom_node.reactor.waking``: the reactor waits for work instead of polling every
millisecond; ``dicom_node.dimse.store_responder``; pynetdicom's per-PDU log handlers unbound), so that the node's
CPU per image beyond it is the node's own work, not a difference in how the library is driven.
"""

from __future__ import annotations

import sys
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import RequestHandler

from dicom_node.dimse import quiet_library_handlers, store_responder
from dicom_node.reactor import waking
from dicom_node.scp import nodelay_on_open


class _AsTheNodeRunsIt(RequestHandler):
    def _create_association(self) -> Any:
        assoc = super()._create_association()
        waking(assoc)
        store_responder(assoc)
        return assoc


def _on_store(event: evt.Event) -> int:
    event.encoded_dataset(include_meta=True)
    return 0x0000


def main(argv: list[str]) -> int:
    port = int(argv[0])
    quiet_library_handlers()
    ae = AE(ae_title=argv[1] if len(argv) > 1 else "BARE_SCP")
    ae.maximum_pdu_size = 0
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = ae.make_server(("127.0.0.1", port), request_handler=_AsTheNodeRunsIt,
                            evt_handlers=[(evt.EVT_CONN_OPEN, nodelay_on_open), (evt.EVT_C_STORE, _on_store)])
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
