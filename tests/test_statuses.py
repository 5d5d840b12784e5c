"""Failure statuses for objects the node cannot file correctly: one case each, sent over C-STORE.

0xA900 (data set does not match SOP class) for an image that breaks its IOD (no pixels, a frame count
below one, a data set whose SOP class is not the request's); 0xC000 (cannot understand) for an
encoding the node cannot read (odd-length PixelData, an unknown VR)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, _config

from dicom_node.scp import STATUS_CANNOT_UNDERSTAND, STATUS_DATASET_MISMATCH, STATUS_SUCCESS
from tests.dicom_factory import make_mr_series
from tests.test_scp import NODE_AE, Node

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    node = Node(tmp_path / "node", [])
    yield node
    node.stop()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mr_series(tmp_path_factory.mktemp("series"), shape=(1, 8, 8))[0]


def _fresh(template: Path) -> Dataset:
    ds = dcmread(template)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _send(node: Node, path: Path, *, sop_class: str = MRImageStorage) -> Dataset:
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title=NODE_AE)
    assert assoc.is_established
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's data set as it is (pynetdicom would read it)
    try:
        return assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()


def _write(ds: Dataset, path: Path, patch: Callable[[bytes], bytes] | None = None) -> Path:
    import pydicom.config

    mode = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        ds.save_as(path, enforce_file_format=True)
    finally:
        pydicom.config.settings.writing_validation_mode = mode
    if patch is not None:
        path.write_bytes(patch(path.read_bytes()))
    return path


def _pixel_header(data: bytes) -> int:
    """Offset of PixelData's explicit VR LE element header."""
    offset = data.rfind(b"\xe0\x7f\x10\x00OW")
    assert offset > 0
    return offset


def _odd_pixel_data(data: bytes) -> bytes:
    at = _pixel_header(data)
    length = int.from_bytes(data[at + 8:at + 12], "little")
    return data[:at + 8] + (length - 1).to_bytes(4, "little") + data[at + 12:-1]


def _unknown_vr(data: bytes) -> bytes:
    at = data.find(b"\x08\x00\x60\x00CS")  # Modality
    assert at > 0
    return data[:at + 4] + b"ZZ" + data[at + 6:]


def _instance_number_1e999(data: bytes) -> bytes:
    at = data.find(b"\x20\x00\x13\x00IS")  # InstanceNumber, "1 " as the factory writes it
    assert at > 0
    length = int.from_bytes(data[at + 6:at + 8], "little")
    return data[:at + 6] + (6).to_bytes(2, "little") + b"1e999 " + data[at + 8 + length:]


def _text_as_doubles(data: bytes) -> bytes:
    at = data.find(b"\x08\x00\x05\x00CS")  # SpecificCharacterSet "ISO_IR 100": 10 bytes, not n x 8
    assert at > 0
    return data[:at + 4] + b"FD" + data[at + 6:]


CASES: dict[str, tuple[Callable[[Dataset], None], Callable[[bytes], bytes] | None, int, str]] = {
    "rows-zero": (lambda ds: setattr(ds, "Rows", 0), None, STATUS_DATASET_MISMATCH, "Rows"),
    "rows-and-columns-zero": (lambda ds: (setattr(ds, "Rows", 0), setattr(ds, "Columns", 0)), None,
                              STATUS_DATASET_MISMATCH, "Rows"),
    "bits-allocated-zero": (lambda ds: setattr(ds, "BitsAllocated", 0), None, STATUS_DATASET_MISMATCH,
                            "BitsAllocated"),
    "bits-allocated-12": (lambda ds: setattr(ds, "BitsAllocated", 12), None, STATUS_DATASET_MISMATCH,
                          "BitsAllocated"),
    "bits-allocated-inconsistent": (lambda ds: setattr(ds, "BitsAllocated", 8), None, STATUS_DATASET_MISMATCH,
                                    "PixelData has"),
    "pixel-data-too-long": (lambda ds: setattr(ds, "PixelData", ds.PixelData * 2), None,
                            STATUS_DATASET_MISMATCH, "PixelData has"),
    "negative-frames": (lambda ds: setattr(ds, "NumberOfFrames", -2), None, STATUS_DATASET_MISMATCH,
                        "NumberOfFrames"),
    "odd-length-pixel-data": (lambda ds: None, _odd_pixel_data, STATUS_CANNOT_UNDERSTAND, "odd length"),
    "unknown-vr": (lambda ds: None, _unknown_vr, STATUS_CANNOT_UNDERSTAND, "VR"),
    # found by the fuzzer: answered 0xC000 "unexpected error" with a traceback in the log
    "instance-number-not-a-number": (lambda ds: None, _instance_number_1e999, STATUS_CANNOT_UNDERSTAND,
                                     "cannot read the header"),
    "text-element-with-a-binary-vr": (lambda ds: None, _text_as_doubles, STATUS_CANNOT_UNDERSTAND, "cannot parse"),
    "invalid-frame-of-reference-uid": (lambda ds: setattr(ds, "FrameOfReferenceUID", "1.2.abc"), None,
                                       STATUS_DATASET_MISMATCH, "FrameOfReferenceUID"),
    # found by the fuzzer: a request UID with a non-ASCII character was answered 0xC000 "unexpected error"
    # (the file meta the node puts before the data set is ASCII)
    "non-ascii-sop-instance-uid": (lambda ds: setattr(ds, "SOPInstanceUID", "é1.2"), None,
                                   STATUS_DATASET_MISMATCH, "AffectedSOPInstanceUID"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_image_gets_a_failure_status(case: str, node: Node, template: Path, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    change, patch, status, comment = CASES[case]
    ds = _fresh(template)
    change(ds)
    rsp = _send(node, _write(ds, tmp_path / f"{case}.dcm", patch))
    assert rsp.Status == status, rsp
    assert comment in rsp.ErrorComment
    assert f"refused (status 0x{status:04X})" in caplog.text
    assert not list(node.spool.root.rglob("*.dcm"))


def test_sop_class_other_than_the_request_is_refused(node: Node, template: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = _write(_fresh(template), tmp_path / "mr.dcm")
    # the request says CT Image Storage, the data set is an MR image
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.network_timeout = 10
    ae.dimse_timeout = 60  # the response is awaited by hand below: room for a loaded CI machine
    ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        ds = dcmread(path)
        ds.SOPClassUID = CT_IMAGE_STORAGE  # lets pynetdicom pick the CT context ...
        context = assoc._get_valid_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian, "scu")
        from pynetdicom.dimse_primitives import C_STORE

        request = C_STORE()
        request.MessageID = 1
        request.AffectedSOPClassUID = CT_IMAGE_STORAGE
        request.AffectedSOPInstanceUID = ds.SOPInstanceUID
        request.Priority = 2
        raw = path.read_bytes()
        meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
        from io import BytesIO

        request.DataSet = BytesIO(raw[meta_end:])  # ... but sends the MR data set as it is
        request._context_id = context.context_id
        # pause the association's reactor, as pynetdicom's own send_*() do, or it may take the response off the
        # queue first ("unexpected C-STORE service message") and get_msg() below waits for nothing
        assoc._reactor_checkpoint.clear()
        deadline = time.monotonic() + 10
        while not assoc._is_paused and time.monotonic() < deadline:
            time.sleep(0.001)
        try:
            assoc.dimse.send_msg(request, context.context_id)
            _cx, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
    finally:
        assoc.release()
    assert rsp is not None and rsp.Status == STATUS_DATASET_MISMATCH
    assert "SOPClassUID" in rsp.ErrorComment
    assert "refused (status 0xA900)" in caplog.text


def test_broken_deflate_stream_cannot_be_parsed(template: Path, tmp_path: Path) -> None:
    """Found by the fuzzer: zlib's error was not among the parse errors (0xC000 "unexpected error")."""
    from dicom_node.scp import BadInstance, parse_instance

    path = _write(_fresh(template), tmp_path / "deflated.dcm")
    ds = dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    _write(ds, path)
    data = path.read_bytes()
    meta_end = 132 + 12 + int(dcmread(path, stop_before_pixels=True).file_meta.FileMetaInformationGroupLength)
    with pytest.raises(BadInstance, match="cannot parse") as refused:
        parse_instance(data[:meta_end] + bytes(range(7, 255)) * 8)  # not a Deflate stream
    assert refused.value.status == STATUS_CANNOT_UNDERSTAND


def test_well_formed_image_is_still_stored(node: Node, template: Path, tmp_path: Path) -> None:
    assert _send(node, _write(_fresh(template), tmp_path / "ok.dcm")).Status == STATUS_SUCCESS
