"""C-STORE responses encoded once, not three times.

pynetdicom turns a C-STORE response primitive into a command set :class:`~pydicom.dataset.Dataset` (one
``setattr`` per element, each validated), encodes it to measure the Command Group Length, then encodes it again
to send it: about 0.3 ms per response, a tenth of the node's CPU time per received image (bench P1). A response
is seven elements of two fixed VRs (UI and US) in Implicit VR Little Endian (PS3.7 Annex E, PS3.5 7.1.3), so
:func:`encode_store_response` writes those bytes directly; ``tests/test_dimse.py`` checks them byte for byte
against pynetdicom's own encoding.

:class:`StoreResponder` uses it only for what it covers: a C-STORE response without Offending Element or Error
Comment whose command set fits in one PDV, on an association where nothing listens to ``EVT_DIMSE_SENT``
(pynetdicom's own log handler is bound only when its INFO lines are kept: :func:`quiet_library_handlers`).
Everything else is pynetdicom's ``send_msg``.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from pynetdicom import _config as pynetdicom_config
from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

#: Command Field of a C-STORE-RSP, and Command Data Set Type "no data set" (PS3.7 E.1-1).
C_STORE_RSP_COMMAND = 0x8001
NO_DATA_SET = 0x0101
#: PDV header: message control header with the command bit and the last-fragment bit set (PS3.8 E.2).
_LAST_COMMAND_FRAGMENT = b"\x03"


def _ui(element: int, uid: str) -> bytes:
    """(0000,eeee) UI in Implicit VR Little Endian, padded with NUL to an even length (PS3.5 6.2)."""
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def _us(element: int, value: int) -> bytes:
    return struct.pack("<HHLH", 0x0000, element, 2, value)


def encode_store_response(message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int) -> bytes:
    """The command set of a C-STORE-RSP (Implicit VR Little Endian, elements in tag order, Command Group Length
    first)."""
    body = b"".join((
        _ui(0x0002, sop_class_uid),                   # Affected SOP Class UID
        _us(0x0100, C_STORE_RSP_COMMAND),             # Command Field
        _us(0x0120, message_id),                      # Message ID Being Responded To
        _us(0x0800, NO_DATA_SET),                     # Command Data Set Type
        _us(0x0900, status),                          # Status
        _ui(0x1000, sop_instance_uid),                # Affected SOP Instance UID
    ))
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


def _plain_store_response(primitive: Any) -> tuple[int, str, str, int] | None:
    """(message id, class, instance, status) of a C-STORE response :func:`encode_store_response` covers."""
    if type(primitive) is not C_STORE or primitive.MessageIDBeingRespondedTo is None:
        return None
    if primitive.OffendingElement is not None or primitive.ErrorComment is not None:
        return None
    sop_class, sop_instance, status = primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID, primitive.Status
    if sop_class is None or sop_instance is None or status is None:
        return None
    if not (str(sop_class).isascii() and str(sop_instance).isascii()):
        return None
    return int(primitive.MessageIDBeingRespondedTo), str(sop_class), str(sop_instance), int(status)


class StoreResponder(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, sending plain C-STORE responses as :func:`encode_store_response` encodes them."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        plain = _plain_store_response(primitive)
        if plain is None or self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            super().send_msg(primitive, context_id)
            return
        command = encode_store_response(*plain)
        if self.maximum_pdu_size and len(command) + 6 > self.maximum_pdu_size:  # never with the minimum of 4096
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, _LAST_COMMAND_FRAGMENT + command))
        self.dul.send_pdu(pdata)


def store_responder(assoc: Any) -> Any:
    """Make an accepted association's DIMSE provider a :class:`StoreResponder` (before its threads start)."""
    assoc.dimse.__class__ = StoreResponder
    return assoc


def quiet_library_handlers() -> None:
    """Bind pynetdicom's logging handlers (a formatted record per PDU and per DIMSE message) only when its INFO
    lines are kept (``[node] library_log_level``): otherwise they format lines nobody reads. Call before a
    server or association is made; pynetdicom reads the setting when it binds its defaults."""
    keep = logging.getLogger("pynetdicom").isEnabledFor(logging.INFO)
    pynetdicom_config.LOG_HANDLER_LEVEL = "standard" if keep else "none"
