"""Tests for dicom_node.scp: admission, C-ECHO and C-STORE into spool + journal, in process on loopback."""

from __future__ import annotations

import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from dicom_node.config import NodeConfig, NodeSettings, Peer
from dicom_node.headers import InstanceHeader, SeriesAttributes, describe
from dicom_node.journal import Journal
from dicom_node.scp import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    Admission,
    BadInstance,
    StorageSCP,
    parse_instance,
    stored_digest,
)
from dicom_node.spool import Spool
from tests.dicom_factory import make_mr_series
from tests.e2e.peers import free_port

NODE_AE = "TEST_NODE"


class Node:
    """A StorageSCP on a free loopback port with its spool, journal and released series."""

    def __init__(self, tmp_path: Path, peers: list[Peer], port: int | None = None, reuse_port: bool = False) -> None:
        config = NodeConfig(
            node=NodeSettings(ae_title=NODE_AE, host="127.0.0.1", port=port or free_port(), data_dir=tmp_path / "data",
                              fsync=False, network_timeout_s=10, reuse_port=reuse_port),
            peers=peers,
        )
        self.journal = Journal(tmp_path / "data" / "journal.sqlite3", fsync=False)
        self.spool = Spool(tmp_path / "data" / "spool", fsync=False)
        self.released: list[set[str]] = []
        self.scp = StorageSCP(config, self.spool, self.journal, on_released=self.released.append)
        self.scp.start()

    def associate(self, calling: str = "SCANNER", called: str = NODE_AE, **kwargs: Any) -> Association:
        ae = AE(ae_title=calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(Verification)
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        return ae.associate("127.0.0.1", self.scp.port, ae_title=called, **kwargs)

    def stop(self) -> None:
        self.scp.stop()
        self.journal.close()


NodeFactory = Callable[..., Node]


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[NodeFactory]:
    nodes: list[Node] = []

    def make(peers: list[Peer] | None = None, **kwargs: Any) -> Node:
        node = Node(tmp_path / f"node{len(nodes)}", peers or [], **kwargs)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()


@pytest.fixture
def node(node_factory: NodeFactory) -> Node:
    return node_factory()


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_mr_series(tmp_path_factory.mktemp("series"), shape=(3, 16, 16), spacing=(1.0, 1.0, 4.0))


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# -- C-ECHO and C-STORE ------------------------------------------------------------------------

def test_echo(node: Node) -> None:
    assoc = node.associate()
    assert assoc.is_established
    status = assoc.send_c_echo()
    assoc.release()
    assert status.Status == 0x0000
    assert node.released == []  # nothing stored, nothing to assemble


def test_store_is_in_spool_and_journal_before_the_response(node: Node, series: list[Path]) -> None:
    source = dcmread(series[0])
    assoc = node.associate()
    assert assoc.is_established
    status = assoc.send_c_store(source)
    assert status.Status == 0x0000
    # the response has arrived: file and row must exist now, without waiting
    rows = node.journal.instances(str(source.SeriesInstanceUID))
    assert [r.sop_instance_uid for r in rows] == [str(source.SOPInstanceUID)]
    stored_path = Path(rows[0].path)
    assert stored_path.is_file() and node.spool.root in stored_path.parents
    stored = dcmread(stored_path)
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert stored.PixelData == source.PixelData and stored.SOPInstanceUID == source.SOPInstanceUID
    assert rows[0].transfer_syntax == ExplicitVRLittleEndian
    assert rows[0].header.image_position == tuple(float(v) for v in source.ImagePositionPatient)
    record = node.journal.series(str(source.SeriesInstanceUID))
    assert record.calling_ae == "SCANNER" and record.description == "t1_fl2d_sag" and record.modality == "MR"
    assert record.attributes.series_number == 2 and record.attributes.image_type[0] == "ORIGINAL"
    assoc.release()
    assert _wait_for(lambda: node.released == [{str(source.SeriesInstanceUID)}])


def test_whole_series_then_released(node: Node, series: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node.scp")
    assoc = node.associate()
    statuses = [assoc.send_c_store(dcmread(p)).Status for p in series]
    bad = dcmread(series[0])
    bad.SOPInstanceUID = "1.2.3.999"
    del bad.SeriesInstanceUID
    statuses.append(assoc.send_c_store(bad).Status)
    assoc.release()
    assert statuses[:3] == [0, 0, 0] and statuses[3] != 0
    uid = str(dcmread(series[0], stop_before_pixels=True).SeriesInstanceUID)
    assert node.journal.series(uid).n_instances == 3
    assert _wait_for(lambda: node.released == [{uid}])
    # the one line IT reads for an association: who, from where, what was stored and refused (no patient data)
    assert _wait_for(lambda: any(
        r.getMessage() == "association from SCANNER (127.0.0.1) released: 1 series received, 3 instance(s) stored, "
                          "1 refused" for r in caplog.records)), [r.getMessage() for r in caplog.records]


def test_duplicate_instance_is_idempotent(node: Node, series: list[Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    results: list[bool] = []
    add_instance = node.journal.add_instance

    def spy(*args: Any, **kwargs: Any) -> bool:
        results.append(add_instance(*args, **kwargs))
        return results[-1]

    writes: list[Path] = []
    spool_write = node.spool.write

    def spool_spy(*args: Any, **kwargs: Any) -> Path:
        writes.append(spool_write(*args, **kwargs))
        return writes[-1]

    monkeypatch.setattr(node.journal, "add_instance", spy)
    monkeypatch.setattr(node.spool, "write", spool_spy)
    source = dcmread(series[0])
    assoc = node.associate()
    first = assoc.send_c_store(source)
    second = assoc.send_c_store(source)
    assoc.release()
    assert (first.Status, second.Status) == (0x0000, 0x0000)
    # the re-send is recognised by its content digest before anything is written or journaled again
    assert results == [True] and len(writes) == 1
    assert len(node.journal.instances(str(source.SeriesInstanceUID))) == 1
    assert node.journal.counts()["instances"] == {"total": 1}


def test_two_receivers_of_one_data_directory_file_a_uid_once(tmp_path: Path, series: list[Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: receivers sharing a data directory each found no row for a UID sent to both at once with
    other content, both wrote its spool path and both answered Success (the file one object, the row the other's
    digest). The UID's lock holds across them: the second finds the first's row and refuses a conflict."""
    first, second = Node(tmp_path / "shared", []), Node(tmp_path / "shared", [])
    try:
        lookup = first.journal.instance

        def slow(uid: str) -> Any:  # the first's look-up, then a pause before it files
            found = lookup(uid)
            time.sleep(0.5)
            return found

        monkeypatch.setattr(first.journal, "instance", slow)
        one, other = dcmread(series[0]), dcmread(series[0])
        other.PixelData = b"\x07" * len(other.PixelData)  # the same UID, other content
        statuses: dict[str, int] = {}

        def send(node: Node, ds: Any, key: str) -> None:
            assoc = node.associate()
            statuses[key] = int(assoc.send_c_store(ds).Status)
            assoc.release()

        sending = threading.Thread(target=send, args=(first, one, "first"))
        sending.start()
        time.sleep(0.2)  # the first is inside its pause
        send(second, other, "second")
        sending.join()
        assert statuses == {"first": STATUS_SUCCESS, "second": STATUS_CANNOT_UNDERSTAND}
        row = second.journal.instance(str(one.SOPInstanceUID))
        assert row is not None and stored_digest(Path(row.path)) == row.sha256
    finally:
        first.stop()
        second.stop()


def test_aborted_association_does_not_trigger_assembly(node: Node, series: list[Path]) -> None:
    assoc = node.associate()
    assert assoc.send_c_store(dcmread(series[0])).Status == 0
    assoc.abort()
    time.sleep(0.3)
    assert node.released == []
    assert node.journal.counts()["instances"] == {"total": 1}  # acknowledged instance kept


def test_truncated_file_gets_a_failure_status(node: Node, series: list[Path], tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    data = series[1].read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[:-100])  # the end of PixelData is missing
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's bytes as they are
    caplog.set_level(logging.ERROR, logger="dicom_node.scp")
    assoc = node.associate()
    status = assoc.send_c_store(truncated)
    assoc.release()
    assert status.Status == STATUS_CANNOT_UNDERSTAND
    assert "PixelData is truncated" in status.ErrorComment
    assert any("refused (status 0xC000)" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    assert node.journal.counts()["instances"] == {"total": 0}
    assert not any(node.spool.root.rglob("*.dcm"))


def _store_first(node: Node, series: list[Path]) -> Dataset:
    """The status of the series' first object sent to the node in an association of its own."""
    assoc = node.associate()
    status = assoc.send_c_store(dcmread(series[0]))
    assoc.release()
    return status


def test_spool_failure_is_out_of_resources(node: Node, series: list[Path], monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    def full(*args: object, **kwargs: object) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(node.spool, "write", full)
    caplog.set_level(logging.ERROR, logger="dicom_node.scp")
    status = _store_first(node, series)
    assert status.Status == STATUS_OUT_OF_RESOURCES
    assert "No space left" in status.ErrorComment
    assert node.journal.counts()["instances"] == {"total": 0}
    assert node.released == []


def test_low_disk_refuses_with_out_of_resources_and_recovers(node: Node, series: list[Path],
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    import dicom_node.disk as disk

    free = {"mb": 5000}
    monkeypatch.setattr(disk, "free_bytes", lambda path: free["mb"] * disk.MB)
    node.scp.disk.cache_s = 0  # the test moves the free space between C-STOREs
    caplog.set_level(logging.DEBUG, logger="dicom_node")
    assoc = node.associate()
    first = assoc.send_c_store(dcmread(series[0]))
    free["mb"] = 1000  # below [limits] min_free_mb (1024 by default)
    refused = [assoc.send_c_store(dcmread(p)) for p in series[1:]]
    free["mb"] = 1500  # between the watermarks: still refused
    again = assoc.send_c_store(dcmread(series[1]))
    assert node.scp.disk.state().refusing and node.scp.disk.state().free_bytes == 1500 * disk.MB
    free["mb"] = 2048  # [limits] resume_free_mb
    resent = [assoc.send_c_store(dcmread(p)) for p in series[1:]]
    assoc.release()
    assert first.Status == 0x0000
    assert [r.Status for r in refused + [again]] == [STATUS_OUT_OF_RESOURCES] * 3
    assert refused[0].ErrorComment == "out of disk space: 1000 MB free, the node needs 1024 MB"
    assert [r.Status for r in resent] == [0x0000, 0x0000]
    # nothing refused was written; everything acknowledged is in the spool and the journal
    uid = str(dcmread(series[0], stop_before_pixels=True).SeriesInstanceUID)
    rows = node.journal.instances(uid)
    assert len(rows) == 3 and all(Path(r.path).is_file() for r in rows)
    assert len(list(node.spool.root.rglob("*.dcm"))) == 3
    # one WARNING when refusing began and one INFO when it ended, not one per object
    changes = [r for r in caplog.records if r.name == "dicom_node.disk"]
    assert [r.levelname for r in changes] == ["WARNING", "INFO"]
    assert "(3 refused meanwhile)" in changes[1].getMessage()
    assert not [r for r in caplog.records if r.name == "dicom_node.scp" and r.levelno >= logging.WARNING]


def test_journal_failure_is_not_acknowledged(node: Node, series: list[Path], monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: object, **kwargs: object) -> bool:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(node.journal, "add_instance", broken)
    caplog.set_level(logging.ERROR, logger="dicom_node.scp")
    status = _store_first(node, series)
    # out of resources, not "cannot understand": most senders take 0xC000 as final, and try 0xA700 again later
    assert status.Status == STATUS_OUT_OF_RESOURCES
    assert "journal is unavailable" in str(status.ErrorComment)
    assert any("the journal cannot record it: OperationalError: disk I/O error" in r.getMessage()
               for r in caplog.records)


def test_out_of_memory_is_out_of_resources(node: Node, series: list[Path], monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """The machine, not the object: the sender is told to try again (0xA700), not that the object cannot be
    understood (0xC000, final for most senders); nothing is kept."""
    def exhausted(*args: object, **kwargs: object) -> bool:
        raise MemoryError

    monkeypatch.setattr(node.journal, "add_instance", exhausted)
    caplog.set_level(logging.ERROR, logger="dicom_node.scp")
    status = _store_first(node, series)
    assert status.Status == STATUS_OUT_OF_RESOURCES
    assert str(status.ErrorComment) == "cannot store: out of memory"
    assert any("failed: out of memory" in r.getMessage() for r in caplog.records)


def test_a_journal_error_of_the_object_itself_is_not_out_of_resources(node: Node, series: list[Path],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the journal being unavailable is worth a retry (0xA700); an error about what was written (here an
    integrity error) would come back at every re-send, and some senders hold their whole queue on a retry."""
    def broken(*args: object, **kwargs: object) -> bool:
        raise sqlite3.IntegrityError("NOT NULL constraint failed")

    monkeypatch.setattr(node.journal, "add_instance", broken)
    assoc = node.associate()
    status = assoc.send_c_store(dcmread(series[0]))
    assoc.release()
    assert status.Status == STATUS_CANNOT_UNDERSTAND


# -- admission ---------------------------------------------------------------------------------

def test_unknown_calling_ae_is_rejected(node_factory: NodeFactory, caplog: pytest.LogCaptureFixture) -> None:
    node = node_factory([Peer(ae_title="SCANNER", host="127.0.0.1")])
    caplog.set_level(logging.WARNING, logger="dicom_node.scp")
    assoc = node.associate(calling="INTRUDER")
    assert assoc.is_rejected and not assoc.is_established
    assert _wait_for(lambda: any("'INTRUDER' is not a configured peer" in r.getMessage() for r in caplog.records))
    ok = node.associate(calling="SCANNER")
    assert ok.is_established
    ok.release()


def test_known_ae_from_the_wrong_host_is_rejected(node_factory: NodeFactory,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    node = node_factory([Peer(ae_title="SCANNER", host="10.255.255.1"), Peer(ae_title="ANYWHERE")])
    caplog.set_level(logging.WARNING, logger="dicom_node.scp")
    assoc = node.associate(calling="SCANNER")
    assert assoc.is_rejected
    assert _wait_for(lambda: any("is a peer, but not from host 127.0.0.1" in r.getMessage() for r in caplog.records))
    anywhere = node.associate(calling="ANYWHERE")  # no host: any host
    assert anywhere.is_established
    anywhere.release()


def test_a_peer_host_that_cannot_be_resolved_admits_no_one_under_its_ae_title(
        node_factory: NodeFactory, caplog: pytest.LogCaptureFixture) -> None:
    """Found in review: a typo in a peer's host ("pacs..lan") made the look-up raise UnicodeError, which pynetdicom
    swallowed in the handler and then accepted the association: that AE title from any host."""
    node = node_factory([Peer(ae_title="SCANNER", host="pacs..lan")])
    caplog.set_level(logging.WARNING, logger="dicom_node.scp")
    assoc = node.associate(calling="SCANNER")
    assert assoc.is_rejected and not assoc.is_established


def test_an_admission_check_that_fails_rejects(node_factory: NodeFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    node = node_factory([Peer(ae_title="SCANNER")])
    monkeypatch.setattr(node.scp.admission, "allows", lambda *a: 1 / 0)
    assoc = node.associate(calling="SCANNER")
    assert assoc.is_rejected and not assoc.is_established


def test_peer_host_name_is_resolved(node_factory: NodeFactory) -> None:
    node = node_factory([Peer(ae_title="SCANNER", host="localhost")])
    assoc = node.associate(calling="SCANNER")
    assert assoc.is_established
    assoc.release()


def test_called_ae_mismatch_is_rejected(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dicom_node.scp")
    assoc = node.associate(called="OTHER_NODE")
    assert assoc.is_rejected
    assert _wait_for(lambda: any("called AE title 'OTHER_NODE'" in r.getMessage() for r in caplog.records))


def test_receivers_sharing_a_port_each_take_associations(node_factory: NodeFactory, series: list[Path]) -> None:
    port = free_port()
    first = node_factory(port=port, reuse_port=True)
    second = node_factory(port=port, reuse_port=True)  # binds: SO_REUSEPORT on both listeners
    for _ in range(24):
        assoc = first.associate()
        assert assoc.is_established
        assert assoc.send_c_store(series[0]).Status == 0x0000
        assoc.release()
    assert _wait_for(lambda: len(first.released) + len(second.released) == 24)
    assert first.released and second.released  # the kernel spread them (all on one: p = 2**-23)


def test_a_port_is_not_shared_without_reuse_port(node_factory: NodeFactory) -> None:
    port = free_port()
    node_factory(port=port)
    with pytest.raises(OSError):
        node_factory(port=port)


def test_tcp_nodelay_on_the_accepted_socket(node: Node) -> None:
    assoc = node.associate()
    assert assoc.is_established
    try:
        server_side = node.scp._server.active_associations
        assert server_side
        for acceptor in server_side:
            sock = acceptor.dul.socket.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()


def test_admission_rules() -> None:
    assert Admission([]).allows("ANY", "10.0.0.1")[0]
    admission = Admission([("MR1", "127.0.0.1"), ("MR1", "10.0.0.9"), ("PACS", None)])
    assert admission.allows("MR1", "10.0.0.9") == (True, "known peer")
    assert admission.allows("PACS", "192.168.1.1")[0]
    assert not admission.allows("MR1", "10.0.0.8")[0]
    assert not admission.allows("mr1", "127.0.0.1")[0]  # AE titles are case-sensitive
    # a dual-stack listener ([node] host "::") sees an IPv4 peer as ::ffff:a.b.c.d: it was refused
    assert admission.allows("MR1", "::ffff:10.0.0.9") == (True, "known peer")
    assert not admission.allows("MR1", "::ffff:10.0.0.8")[0]


# -- parsing -----------------------------------------------------------------------------------

def test_native_pixel_bytes_labelled_compressed_are_refused(node: Node, series: list[Path]) -> None:
    """Found in review: PixelData of defined length (native bytes) sent under JPEG Lossless was acknowledged, and
    its job failed only when it decoded them. Encapsulated pixel data is items of undefined length (PS3.5 A.4)."""
    from pydicom.uid import JPEGLosslessSV1

    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(MRImageStorage, JPEGLosslessSV1)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title=NODE_AE)
    assert assoc.is_established
    ds = dcmread(series[0])
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1  # the native bytes as they are, labelled JPEG Lossless
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == STATUS_CANNOT_UNDERSTAND
    assert "not encapsulated" in status.ErrorComment
    assert node.journal.instance(str(ds.SOPInstanceUID)) is None


def test_pixel_data_read_as_a_sequence_is_refused_not_an_unexpected_error() -> None:
    """Found in review: PixelData with the explicit VR SQ under a compressed transfer syntax reached the new check as
    a Sequence, and the check's bytes() raised TypeError: 0xC000 as "unexpected error", with a traceback."""
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import JPEGLosslessSV1

    from dicom_node.scp import _check_pixel_data

    ds = Dataset()
    ds.Rows, ds.Columns, ds.BitsAllocated = 8, 8, 16
    ds.add_new(0x7FE00010, "SQ", DicomSequence([Dataset()]))
    ds[0x7FE00010].is_undefined_length = True
    with pytest.raises(BadInstance, match="not encapsulated"):
        _check_pixel_data(ds, JPEGLosslessSV1)


def _with_private_items(data: bytes, items: int) -> bytes:
    """A Part 10 file's bytes (Explicit VR Little Endian) with a private sequence of ``items`` empty items (undefined
    lengths) put just before its PixelData."""
    import struct

    at = data.rindex(b"\xe0\x7f\x10\x00")  # (7FE0,0010): the last element
    creator = b"\xdf\x7f\x10\x00" + b"LO" + struct.pack("<H", 4) + b"TEST"
    sequence = (b"\xdf\x7f\x00\x10" + b"SQ\x00\x00" + b"\xff\xff\xff\xff"
                + (b"\xfe\xff\x00\xe0" + b"\xff\xff\xff\xff" + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00") * items
                + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    return data[:at] + creator + sequence + data[at:]


def test_a_data_set_of_very_many_sequence_items_is_refused_before_it_is_parsed(series: list[Path]) -> None:
    """Found in review: pydicom builds an object per sequence item as it parses, so a private sequence of 16 MB of
    empty items took 644 MB of memory: one object within the size limit could have the node killed for memory (and
    its receipt record again at every start). Counted first; refused past MAX_ITEMS; a normal number parses."""
    import resource

    from dicom_node.scp import MAX_ITEMS

    data = series[0].read_bytes()
    assert parse_instance(_with_private_items(data, 1000)).get((0x7FDF, 0x1000)) is not None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(BadInstance, match=f"more than {MAX_ITEMS} sequence items") as caught:
        parse_instance(_with_private_items(data, MAX_ITEMS + 1))
    assert caught.value.status == STATUS_CANNOT_UNDERSTAND
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: nothing was parsed


def test_parse_instance_checks_structure(series: list[Path]) -> None:
    data = series[0].read_bytes()
    ds = parse_instance(data)
    assert ds.SOPInstanceUID == dcmread(series[0]).SOPInstanceUID
    with pytest.raises(BadInstance) as info:
        parse_instance(b"not dicom at all" * 20)
    assert info.value.status == STATUS_CANNOT_UNDERSTAND
    with pytest.raises(BadInstance) as info:
        parse_instance(data[:-1])
    assert info.value.status == STATUS_CANNOT_UNDERSTAND and "truncated" in str(info.value)


@pytest.mark.parametrize("sop_uid", ["1.2.3", "1.2.34", "2.25.123456789012345678901234567890"])
@pytest.mark.parametrize("transfer_syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.91"])
def test_file_meta_is_byte_for_byte_what_pynetdicom_writes(sop_uid: str, transfer_syntax: str) -> None:
    from pydicom.uid import UID
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from dicom_node.scp import file_meta

    expected = b"\x00" * 128 + b"DICM" + encode_file_meta(create_file_meta(
        sop_class_uid=UID(MRImageStorage), sop_instance_uid=UID(sop_uid), transfer_syntax=UID(transfer_syntax)))
    assert file_meta(MRImageStorage, sop_uid, transfer_syntax) == expected


def test_parse_instance_needs_the_uids(series: list[Path], tmp_path: Path) -> None:
    ds = dcmread(series[0])
    del ds.SeriesInstanceUID
    path = tmp_path / "no-series.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(BadInstance) as info:
        parse_instance(path.read_bytes())
    assert info.value.status == STATUS_DATASET_MISMATCH and "SeriesInstanceUID" in str(info.value)


def test_describe(series: list[Path]) -> None:
    ds = dcmread(series[1], stop_before_pixels=True)
    received = describe(ds)
    geometry, attrs = received.header, received.series
    assert geometry.image_orientation == tuple(float(v) for v in ds.ImageOrientationPatient)
    assert (geometry.rows, geometry.columns, geometry.number_of_frames, geometry.instance_number) == (16, 16, 1, 2)
    assert geometry.slice_thickness == (4.0,) and geometry.images_in_acquisition == 0
    assert attrs.image_type == ("ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D")
    assert attrs.slice_thickness == 4.0 and attrs.mr_acquisition_type == "2D"
    assert attrs.manufacturer == "SIEMENS" and attrs.sop_class_uid == MRImageStorage
    ds.ImageType = "ORIGINAL"  # a single value is a list of one
    assert describe(ds).series.image_type == ("ORIGINAL",)
    del ds.ImagePositionPatient, ds.SliceThickness
    received = describe(ds)
    geometry, attrs = received.header, received.series
    assert geometry.image_position is None and attrs.slice_thickness is None
    # filed as JSON with the journal's keys, read back the same
    assert InstanceHeader.from_json(geometry.to_json()) == geometry
    assert SeriesAttributes.from_json(attrs.to_json()) == attrs
    assert geometry.to_json()["cols"] == 16 and attrs.to_json()["SeriesNumber"] == 2


def test_parse_instance_finds_truncation_anywhere(series: list[Path]) -> None:
    data = series[0].read_bytes()
    pixel_start = data.rindex(b"\xe0\x7f\x10\x00")  # (7FE0,0010) PixelData tag, little endian
    failures = 0
    cuts = [*range(400, pixel_start, 37), *range(pixel_start, pixel_start + 12)]  # also inside PixelData's header
    for cut in cuts:  # an element or PixelData goes missing, or an element header is cut
        with pytest.raises(BadInstance) as info:
            parse_instance(data[:cut])
        assert info.value.status in (STATUS_CANNOT_UNDERSTAND, STATUS_DATASET_MISMATCH)
        failures += 1
    assert failures > 10


# -- one SOP Instance UID is one object; hostile UIDs ------------------------------------------

def _stored_files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.suffix == ".dcm"}


@pytest.mark.parametrize(("keyword", "value"), [
    ("StudyInstanceUID", ".."), ("StudyInstanceUID", "../../../../tmp"), ("SeriesInstanceUID", ".."),
    ("SeriesInstanceUID", "a/b"), ("SOPInstanceUID", "1+1"), ("SOPInstanceUID", "1_1"), ("SOPInstanceUID", "/"),
    ("SOPInstanceUID", "1.2..3"),
])
def test_invalid_uids_are_refused_and_nothing_is_written(node: Node, series: list[Path], tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture,
                                                         keyword: str, value: str) -> None:
    before = sorted(p for p in tmp_path.rglob("*"))
    ds = dcmread(series[0])
    setattr(ds, keyword, value)
    caplog.set_level(logging.ERROR, logger="dicom_node.scp")
    assoc = node.associate()
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == STATUS_DATASET_MISMATCH
    # (a SOP Instance UID is the request's too: refused as the request's AffectedSOPInstanceUID, before the parse)
    assert status.ErrorComment.startswith((f"{keyword} ", f"Affected{keyword} "))
    assert "is not a valid UID" in status.ErrorComment
    assert any("refused (status 0xA900)" in r.getMessage() and "not a valid UID" in r.getMessage()
               for r in caplog.records)
    assert node.journal.counts()["instances"] == {"total": 0}
    assert _stored_files(node.spool.root) == {}
    after = sorted(p for p in tmp_path.rglob("*") if not p.name.startswith("journal.sqlite3"))
    assert [p for p in after if p not in before] == [], "something was written"


def test_hostile_uid_pairs_that_mapped_to_one_file_are_both_refused(node: Node, series: list[Path]) -> None:
    statuses = []
    assoc = node.associate()
    for sop in ("1.2.3.1+1", "1.2.3.1_1", "1.2.3.1/1"):
        ds = dcmread(series[0])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        statuses.append(assoc.send_c_store(ds).Status)
    assoc.release()
    assert statuses == [STATUS_DATASET_MISMATCH] * 3  # never "both acknowledged, second overwrites first"
    assert _stored_files(node.spool.root) == {}


def test_resend_with_other_content_is_refused_and_the_original_kept(node: Node, series: list[Path],
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    source = dcmread(series[0])
    assoc = node.associate()
    assert assoc.send_c_store(source).Status == 0x0000
    (stored,) = node.journal.instances(str(source.SeriesInstanceUID))
    original = Path(stored.path).read_bytes()
    assert len(stored.sha256) == 64

    caplog.set_level(logging.WARNING, logger="dicom_node.scp")
    changed = dcmread(series[0])
    changed.PatientName = "Other^Patient"
    status = assoc.send_c_store(changed)
    assert status.Status == STATUS_CANNOT_UNDERSTAND
    assert status.ErrorComment == "SOP Instance UID already stored with other content"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "refused" in r.getMessage()]
    assert warnings and "content differs" in warnings[0].getMessage() and str(source.SOPInstanceUID) in \
        warnings[0].getMessage()

    # the same UID in another series (of another study): refused too, nothing written there
    elsewhere = dcmread(series[0])
    elsewhere.SeriesInstanceUID = "1.2.3.4.5.6.7"
    elsewhere.StudyInstanceUID = "1.2.3.4.5.6"
    assert assoc.send_c_store(elsewhere).Status == STATUS_CANNOT_UNDERSTAND

    assert assoc.send_c_store(source).Status == 0x0000  # the original again: still idempotent
    assoc.release()
    assert Path(stored.path).read_bytes() == original
    assert _stored_files(node.spool.root) == {Path(stored.path): original}
    assert node.journal.counts()["instances"] == {"total": 1}
    assert node.journal.series("1.2.3.4.5.6.7") is None


def test_instances_journaled_without_a_digest_are_compared_with_the_stored_file(
        node: Node, series: list[Path]) -> None:
    source = dcmread(series[1])
    assoc = node.associate()
    assert assoc.send_c_store(source).Status == 0x0000
    db = sqlite3.connect(node.journal.path)  # as a journal from before digests were kept
    db.execute("UPDATE instances SET sha256=''")
    db.commit()
    db.close()
    assert node.journal.instance(str(source.SOPInstanceUID)).sha256 == ""
    assert assoc.send_c_store(source).Status == 0x0000
    changed = dcmread(series[1])
    changed.PatientID = "OTHER"
    assert assoc.send_c_store(changed).Status == STATUS_CANNOT_UNDERSTAND
    assoc.release()


def test_parse_instance_refuses_a_sop_class_uid_that_is_no_uid(series: list[Path], tmp_path: Path) -> None:
    ds = dcmread(series[0])
    ds.SOPClassUID = "MR/../x"
    path = tmp_path / "bad-class.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(BadInstance) as info:
        parse_instance(path.read_bytes())
    assert info.value.status == STATUS_DATASET_MISMATCH and "SOPClassUID 'MR/../x' is not a valid UID" in str(
        info.value)


def test_concurrent_conflicting_sends_store_exactly_one(node: Node, series: list[Path]) -> None:
    import threading

    from dicom_node.scp import stored_digest

    for round_ in range(4):
        variants = []
        for k in range(2):
            ds = dcmread(series[2])
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.3.99.{round_}"
            ds.PatientID = f"VARIANT{k}"
            variants.append(ds)
        statuses: list[int] = []
        barrier = threading.Barrier(2)

        def send(ds: Any, barrier: threading.Barrier = barrier, statuses: list[int] = statuses) -> None:
            assoc = node.associate()
            barrier.wait()
            statuses.append(assoc.send_c_store(ds).Status)
            assoc.release()

        threads = [threading.Thread(target=send, args=(v,)) for v in variants]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(statuses) == [0x0000, STATUS_CANNOT_UNDERSTAND]
        record = node.journal.instance(f"1.2.3.99.{round_}")
        assert record is not None and stored_digest(Path(record.path)) == record.sha256  # file == journal


@pytest.fixture
def series_reads(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The data sets SeriesAttributes.from_dataset reads from, in order."""
    read: list[Any] = []
    original = SeriesAttributes.from_dataset.__func__  # type: ignore[attr-defined]

    def recording(cls: type[SeriesAttributes], ds: Any) -> SeriesAttributes:
        read.append(ds)
        return original(cls, ds)

    monkeypatch.setattr(SeriesAttributes, "from_dataset", classmethod(recording))
    return read


def test_series_attributes_are_read_from_one_instance_per_series(node: Node, series: list[Path],
                                                                 tmp_path: Path, series_reads: list[Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Routing's series attributes are read from a series' first instance only (the journal keeps no other),
    for the latest SERIES_READ_KEPT series."""
    import dicom_node.scp as scp_module

    monkeypatch.setattr(scp_module, "SERIES_READ_KEPT", 1)
    other = make_mr_series(tmp_path / "other", shape=(1, 16, 16), spacing=(1.0, 1.0, 4.0))
    assoc = node.associate()
    for path in (series[0], series[1], other[0], series[2]):
        assert assoc.send_c_store(dcmread(path)).Status == 0x0000
    assoc.release()
    first, second = str(dcmread(series[0]).SeriesInstanceUID), str(dcmread(other[0]).SeriesInstanceUID)
    read = [str(ds.SeriesInstanceUID) for ds in series_reads]
    assert read == [first, second, first]  # the other series pushed the first out of the one kept
    assert node.journal.series(first).attributes.sop_instance_uid == str(dcmread(series[0]).SOPInstanceUID)


def test_a_refused_instance_lends_its_series_attributes_to_no_one(node: Node, series: list[Path],
                                                                  series_reads: list[Any]) -> None:
    """Only instances that were filed are remembered: the first instance of a series that is refused (here a
    SOP Instance UID already stored with other content) does not become the series row's source."""
    stored = dcmread(series[0])
    refused, kept = dcmread(series[1]), dcmread(series[2])
    new_series = "1.2.826.0.1.3680043.8.498.424242"
    refused.SOPInstanceUID, refused.SeriesInstanceUID, refused.SeriesDescription = \
        stored.SOPInstanceUID, new_series, "refused"
    kept.SeriesInstanceUID, kept.SeriesDescription = new_series, "kept"
    assoc = node.associate()
    statuses = [assoc.send_c_store(ds).Status for ds in (stored, refused, kept)]
    assoc.release()
    assert statuses == [0x0000, STATUS_CANNOT_UNDERSTAND, 0x0000]
    assert [str(ds.SeriesDescription) for ds in series_reads] == ["t1_fl2d_sag", "refused", "kept"]
    record = node.journal.series(new_series)
    assert record.description == "kept" and record.attributes.sop_instance_uid == str(kept.SOPInstanceUID)


def test_the_same_image_resent_in_another_transfer_syntax_is_idempotent(node: Node, series: list[Path],
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Found in review: the duplicate check compares the bytes as received, so a PACS forwarding an image it had
    stored in another encoding (Implicit VR, Deflate, compressed) got 0xC000 "other content" for every instance of a
    study the node already held. The same series, instance number and geometry in another transfer syntax is the
    same image: Success, the stored copy kept. Other content in another syntax is still refused."""
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ae.add_requested_context(MRImageStorage, syntax)  # a context each: each object goes in its own
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title=NODE_AE)
    assert assoc.is_established
    source = dcmread(series[0])
    assert assoc.send_c_store(source).Status == 0x0000
    (stored,) = node.journal.instances(str(source.SeriesInstanceUID))
    original = Path(stored.path).read_bytes()
    caplog.set_level(logging.INFO, logger="dicom_node.scp")
    def encoded_as(syntax: str) -> Dataset:
        ds = Dataset(dcmread(series[0]))  # a new data set: encoded as the context says, not as it was read
        ds.file_meta = dcmread(series[0]).file_meta
        ds.file_meta.TransferSyntaxUID = syntax
        return ds

    for syntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        assert assoc.send_c_store(encoded_as(syntax)).Status == 0x0000, syntax
    assert any("received now in another transfer syntax" in r.getMessage() for r in caplog.records)
    moved = encoded_as(ImplicitVRLittleEndian)
    moved.ImagePositionPatient = [float(v) + 5.0 for v in moved.ImagePositionPatient]
    assert assoc.send_c_store(moved).Status == STATUS_CANNOT_UNDERSTAND  # another image under the same UID
    merged = encoded_as(ImplicitVRLittleEndian)  # a patient merge or identity correction: not the same object
    merged.PatientID = "MERGED-1"
    assert assoc.send_c_store(merged).Status == STATUS_CANNOT_UNDERSTAND
    assoc.release()
    assert Path(stored.path).read_bytes() == original


def test_a_resend_restores_the_lost_file_of_a_row_without_a_digest(node: Node, series: list[Path]) -> None:
    """A row from before digests were kept, its file gone: every re-send was refused 0xC000 "the stored object is
    kept" although nothing was; it is written in its place."""
    source = dcmread(series[1])
    assoc = node.associate()
    try:
        assert assoc.send_c_store(source).Status == 0
        uid = str(source.SOPInstanceUID)
        known = node.journal.instance(uid)
        assert known is not None
        with node.journal._tx() as db:
            db.execute("UPDATE instances SET sha256='' WHERE sop_instance_uid=?", (uid,))
        Path(known.path).unlink()
        elsewhere = dcmread(series[1])
        elsewhere.SeriesInstanceUID = "1.2.826.0.1.3680043.10.999.77"
        assert assoc.send_c_store(elsewhere).Status != 0  # another series: not filed under another path
        assert not Path(known.path).exists()
        assert assoc.send_c_store(source).Status == 0
    finally:
        assoc.release()
    assert Path(known.path).is_file() and dcmread(known.path).SOPInstanceUID == uid
    assert node.journal.instance(uid).series_uid == str(source.SeriesInstanceUID)
