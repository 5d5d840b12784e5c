"""A pynetdicom Storage SCP that stores nothing: the library's own ceiling for P1.

``python -m bench.bare_scp PORT [AE_TITLE]``: accepts every storage SOP class (Explicit and Implicit VR Little
Endian), takes the encoded dataset like the node does, answers Success and keeps nothing.
"""

from __future__ import annotations

import sys

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from dicom_node.scp import nodelay_on_open


def _on_store(event: evt.Event) -> int:
    event.encoded_dataset(include_meta=True)
    return 0x0000


def main(argv: list[str]) -> int:
    port = int(argv[0])
    ae = AE(ae_title=argv[1] if len(argv) > 1 else "BARE_SCP")
    ae.maximum_pdu_size = 0
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.start_server(("127.0.0.1", port), block=True,
                    evt_handlers=[(evt.EVT_CONN_OPEN, nodelay_on_open), (evt.EVT_C_STORE, _on_store)])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
