"""Tests for dicom_node.dimse: C-STORE responses byte for byte pynetdicom's, used only where they apply."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import MRImageStorage
from pynetdicom import _config
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from dicom_node.dimse import encode_store_response, quiet_library_handlers
from tests.dicom_factory import make_mr_series
from tests.test_scp import Node


def _pynetdicom_encoding(message_id: int, sop_class: str, sop_instance: str, status: int) -> bytes:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    (pdata,) = message.encode_msg(1, 16382)
    ((context_id, pdv),) = pdata.presentation_data_value_list
    assert context_id == 1 and pdv[:1] == b"\x03"  # one PDV: command, last fragment
    return pdv[1:]


@pytest.mark.parametrize("sop_instance", [
    "1.2.3",                                                   # odd length: padded
    "1.2.34",                                                  # even length
    "1.2.826.0.1.3680043.8.498." + "1" * 38,                   # 64 characters
])
@pytest.mark.parametrize(("message_id", "status"), [(0, 0x0000), (1, 0x0000), (65535, 0xB000), (7, 0xA700)])
def test_store_response_is_byte_for_byte_pynetdicoms(sop_instance: str, message_id: int, status: int) -> None:
    for sop_class in (MRImageStorage, "1.2.840.10008.5.1.4.1.1.66.4"):  # even and odd length
        assert encode_store_response(message_id, sop_class, sop_instance, status) == \
            _pynetdicom_encoding(message_id, sop_class, sop_instance, status)


@pytest.fixture
def restore_log_handler_level() -> Iterator[None]:
    before = _config.LOG_HANDLER_LEVEL
    yield
    _config.LOG_HANDLER_LEVEL = before


@pytest.mark.parametrize(("level", "expected"), [(logging.INFO, "standard"), (logging.DEBUG, "standard"),
                                                 (logging.WARNING, "none")])
def test_pynetdicom_log_handlers_only_when_its_lines_are_kept(restore_log_handler_level: None, level: int,
                                                              expected: str) -> None:
    logger = logging.getLogger("pynetdicom")
    before = logger.level
    logger.setLevel(level)
    try:
        quiet_library_handlers()
    finally:
        logger.setLevel(before)
    assert _config.LOG_HANDLER_LEVEL == expected


@pytest.mark.parametrize("pynetdicom_level", [logging.WARNING, logging.INFO])
def test_responses_reach_the_sender_and_only_plain_ones_skip_pynetdicom(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_log_handler_level: None,
        pynetdicom_level: int) -> None:
    """A plain success is encoded by the node (unless pynetdicom's log handlers listen); a refusal with an
    Error Comment is pynetdicom's. Either way the sender reads the status (and the comment)."""
    sent_by_pynetdicom: list[int] = []
    original = DIMSEServiceProvider.send_msg

    def counting(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
        if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None:
            sent_by_pynetdicom.append(int(primitive.Status))
        original(self, primitive, context_id)

    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", counting)
    logger = logging.getLogger("pynetdicom")
    level_before = logger.level
    logger.setLevel(pynetdicom_level)  # (setLevel: isEnabledFor caches)
    series = make_mr_series(tmp_path / "series", shape=(2, 16, 16), spacing=(1.0, 1.0, 4.0))
    try:
        node = Node(tmp_path / "node", [])
    finally:
        logger.setLevel(level_before)
    try:
        assoc = node.associate()
        assert assoc.is_established
        first = dcmread(series[0])
        assert assoc.send_c_store(first).Status == 0x0000
        conflicting = dcmread(series[1])
        conflicting.SOPInstanceUID = first.SOPInstanceUID  # same UID, other content: refused with a comment
        refused = assoc.send_c_store(conflicting)
        assoc.release()
    finally:
        node.stop()
    assert refused.Status == 0xC000 and "already stored with other content" in str(refused.ErrorComment)
    plain_by_node = pynetdicom_level > logging.INFO
    assert sent_by_pynetdicom == ([0xC000] if plain_by_node else [0x0000, 0xC000])


class _StubAssociation:
    def __init__(self, dimse_sent_handlers: list[Any], peer_max_pdu: int) -> None:
        self._handlers = dimse_sent_handlers
        self.is_requestor = False
        self.requestor = type("Requestor", (), {"maximum_length": peer_max_pdu})()
        self.dul = type("DUL", (), {"sent": [], "send_pdu": lambda self, pdata: self.sent.append(pdata)})()

    def get_handlers(self, event: Any) -> list[Any]:
        return self._handlers


@pytest.mark.parametrize(("handlers", "peer_max_pdu", "by_node"), [
    ([], 0, True),                       # no limit
    ([], 16384, True),
    ([], 64, False),                     # the command set does not fit one PDV: pynetdicom fragments it
    ([(print, None)], 16384, False),     # someone listens to EVT_DIMSE_SENT: pynetdicom's message for them
])
def test_store_responder_leaves_to_pynetdicom_what_it_does_not_cover(
        monkeypatch: pytest.MonkeyPatch, handlers: list[Any], peer_max_pdu: int, by_node: bool) -> None:
    from dicom_node.dimse import StoreResponder

    to_pynetdicom: list[Any] = []
    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", lambda self, primitive, cx: to_pynetdicom.append(primitive))
    responder = StoreResponder.__new__(StoreResponder)
    responder._assoc = _StubAssociation(handlers, peer_max_pdu)  # (DIMSEServiceProvider keeps it there)
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo, primitive.Status = 3, 0x0000
    primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID = MRImageStorage, "1.2.3.4"
    responder.send_msg(primitive, 5)
    sent = responder.assoc.dul.sent
    if by_node:
        assert to_pynetdicom == [] and len(sent) == 1
        ((context_id, pdv),) = sent[0].presentation_data_value_list
        assert context_id == 5 and pdv == b"\x03" + encode_store_response(3, MRImageStorage, "1.2.3.4", 0)
    else:
        assert to_pynetdicom == [primitive] and sent == []
