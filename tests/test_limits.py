"""What one peer may cost the node: object size, Deflate inflation, receive memory, slow and idle peers.

In process (a StorageSCP on loopback) for statuses and timing; one test runs ``dicom-node serve`` in a
subprocess and reads its peak RSS (VmHWM) while a Deflate bomb and an oversized object arrive.
"""

from __future__ import annotations

import copy
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from dicom_node.config import LimitSettings, NodeConfig, NodeSettings
from dicom_node.guard import CopiedContexts, MiB, ReceiveBudget, inflated_size_exceeds
from dicom_node.journal import Journal
from dicom_node.scp import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS, StorageSCP
from dicom_node.spool import Spool
from tests.dicom_factory import make_mr_series
from tests.e2e.peers import free_port

NODE_AE = "TEST_NODE"


class LimitedNode:
    def __init__(self, tmp_path: Path, *, node: dict[str, Any] | None = None, **limits: Any) -> None:
        config = NodeConfig(
            node=NodeSettings(ae_title=NODE_AE, host="127.0.0.1", port=free_port(), data_dir=tmp_path / "data",
                              fsync=False, network_timeout_s=10, **(node or {})),
            limits=LimitSettings(**limits),
        )
        self.journal = Journal(tmp_path / "data" / "journal.sqlite3", fsync=False)
        self.spool = Spool(tmp_path / "data" / "spool", fsync=False)
        self.scp = StorageSCP(config, self.spool, self.journal, on_released=lambda uids: None)
        self.scp.start()

    def associate(self, *, transfer_syntax: str = ExplicitVRLittleEndian, timeout: float = 10) -> Association:
        ae = AE(ae_title="SCANNER")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.add_requested_context(Verification)
        ae.add_requested_context(MRImageStorage, transfer_syntax)
        return ae.associate("127.0.0.1", self.scp.port, ae_title=NODE_AE)

    def stop(self) -> None:
        self.scp.stop()
        self.journal.close()


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[LimitedNode]]:
    made: list[LimitedNode] = []
    yield made
    for node in made:
        node.stop()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mr_series(tmp_path_factory.mktemp("series"), shape=(1, 16, 16))[0]


def instance(template: Path, side: int, *, fill: bytes = b"\x01\x02") -> Dataset:
    """An MR instance of ``side`` x ``side`` 16-bit pixels (2 * side**2 bytes) with fresh UIDs."""
    ds = dcmread(template)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = side
    ds.PixelData = fill * (side * side * 2 // len(fill))
    return ds


def deflate_file(ds: Dataset, path: Path) -> Path:
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def spooled(node: LimitedNode) -> list[Path]:
    return list(node.spool.root.rglob("*.dcm"))


# -- object size and memory ---------------------------------------------------------------------

def test_oversized_object_is_refused_and_the_association_goes_on(nodes: list[LimitedNode], tmp_path: Path,
                                                                 template: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    node = LimitedNode(tmp_path, max_object_mb=1, receive_memory_mb=4)
    nodes.append(node)
    assoc = node.associate()
    assert assoc.is_established
    try:
        big = assoc.send_c_store(instance(template, 1024))  # 2 MiB of pixels
        small = assoc.send_c_store(instance(template, 256))  # 128 KiB
    finally:
        assoc.release()
    assert big.Status == STATUS_OUT_OF_RESOURCES
    assert "larger than the 1 MB" in big.ErrorComment
    assert small.Status == STATUS_SUCCESS
    assert len(spooled(node)) == 1
    assert "refused (status 0xA700)" in caplog.text
    assert node.scp.budget.used == 0  # every answered object gave its bytes back


def test_deflate_bomb_is_refused_without_inflating_it(nodes: list[LimitedNode], tmp_path: Path,
                                                       template: Path) -> None:
    node = LimitedNode(tmp_path, max_object_mb=4, receive_memory_mb=8)
    nodes.append(node)
    bomb = deflate_file(instance(template, 4096, fill=b"\0\0"), tmp_path / "bomb.dcm")  # 32 MiB inflated
    assert bomb.stat().st_size < 1 * MiB
    ok = deflate_file(instance(template, 256), tmp_path / "ok.dcm")
    assoc = node.associate(transfer_syntax=DeflatedExplicitVRLittleEndian)
    assert assoc.is_established
    try:
        refused = assoc.send_c_store(bomb)
        stored = assoc.send_c_store(ok)
    finally:
        assoc.release()
    assert refused.Status == STATUS_OUT_OF_RESOURCES
    assert "inflates to more than 4 MB" in refused.ErrorComment
    assert stored.Status == STATUS_SUCCESS
    assert len(spooled(node)) == 1


def test_deflate_data_set_of_more_than_one_step_is_stored(nodes: list[LimitedNode], tmp_path: Path,
                                                          template: Path) -> None:
    """Found by the fuzzer: a Deflate data set that inflates to more than one 1 MiB step and whose stream
    is padded to an even length (as pydicom and dcmtk write it) made the size check loop forever on the
    padding byte: no response, a thread spinning at 100 % CPU."""
    node = LimitedNode(tmp_path, max_object_mb=16, receive_memory_mb=32)
    nodes.append(node)
    ds = instance(template, 1024, fill=bytes(range(256)) * 2)  # 2 MiB of pixels
    ds.add_new(0x00091010, "LO", "x")  # makes the deflated stream odd, so it is padded
    path = deflate_file(ds, tmp_path / "big.dcm")
    assoc = node.associate(transfer_syntax=DeflatedExplicitVRLittleEndian, timeout=20)
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert rsp.Status == STATUS_SUCCESS, rsp
    assert len(spooled(node)) == 1


def _bounded(call: Any, seconds: float = 10) -> Any:
    """``call()`` in a thread: its result, or a test failure if it has not returned in time (a loop)."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"did not return within {seconds} s"
    return result[0]


def test_inflation_ends_at_the_end_of_the_stream() -> None:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = compressor.compress(bytes(range(256)) * 12_288) + compressor.flush()  # 3 MiB: three steps
    for padded in (stream, stream + b"\0", stream + b"\0\0\0"):
        assert _bounded(lambda data=padded: inflated_size_exceeds(data, 64 * MiB)) is None
        assert _bounded(lambda data=padded: inflated_size_exceeds(data, 2 * MiB)) == 3 * MiB
    truncated = stream[: len(stream) // 2]  # the parser refuses it
    assert _bounded(lambda: inflated_size_exceeds(truncated, 64 * MiB)) is None


def test_inflation_is_bounded() -> None:
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = packer.compress(bytes(64 * MiB)) + packer.flush()
    assert inflated_size_exceeds(bomb, 8 * MiB) == 8 * MiB + MiB  # stopped one step past the limit
    assert inflated_size_exceeds(bomb, 64 * MiB) is None
    assert inflated_size_exceeds(b"not deflate at all", 10) is None


def test_objects_past_the_receive_memory_are_refused(nodes: list[LimitedNode], tmp_path: Path,
                                                     template: Path) -> None:
    node = LimitedNode(tmp_path, max_object_mb=2, receive_memory_mb=2)
    nodes.append(node)
    assert node.scp.budget.reserve(int(1.5 * MiB))  # other associations are receiving 1.5 MB
    assoc = node.associate()
    try:
        refused = assoc.send_c_store(instance(template, 512))  # 512 KiB: 2 MB in all
        node.scp.budget.release(int(1.5 * MiB))
        stored = assoc.send_c_store(instance(template, 512))
    finally:
        assoc.release()
    assert refused.Status == STATUS_OUT_OF_RESOURCES
    assert "out of memory for receiving" in refused.ErrorComment
    assert stored.Status == STATUS_SUCCESS


def test_receive_budget() -> None:
    budget = ReceiveBudget(10)
    assert budget.reserve(6) and not budget.reserve(5) and budget.reserve(4)
    budget.release(10)
    assert budget.used == 0


def test_pdu_longer_than_the_maximum_aborts(nodes: list[LimitedNode], tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    node = LimitedNode(tmp_path, node={"max_pdu_size": 16384})
    nodes.append(node)
    with _associated_socket(node) as sock:
        # a P-DATA-TF PDU that declares 200,000 bytes: the node aborts before reading its body
        sock.sendall(struct.pack(">BBL", 0x04, 0, 200_000) + bytes(1000))
        sock.settimeout(5)
        reply = sock.recv(64)
        assert reply[:1] == b"\x07", f"no A-ABORT: {reply!r}"
        assert sock.recv(64) == b""
    assert "declares 200000 bytes, more than the 81920 the node accepts" in caplog.text


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux) to read VmHWM")
def test_node_memory_stays_bounded(tmp_path: Path, template: Path) -> None:
    """A 256 MiB Deflate bomb (about 0.25 MB sent) and a 128 MiB object, both refused; the node's peak
    RSS stays within 100 MB of what it was before them (before the fix: +700 MB)."""
    from tests.e2e.node_proc import NodeProcess

    proc = NodeProcess(tmp_path / "node", models_dir=tmp_path / "no-models", rules=[],
                       node={"fsync": False}, limits={"max_object_mb": 32, "receive_memory_mb": 64})
    (tmp_path / "no-models").mkdir()
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(MRImageStorage, DeflatedExplicitVRLittleEndian)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    bomb = deflate_file(instance(template, 11586, fill=b"\0\0"), tmp_path / "bomb.dcm")  # 256 MiB inflated
    big = tmp_path / "big.dcm"
    dcmwrite(big, instance(template, 8192), enforce_file_format=True)  # 128 MiB
    proc.start()
    try:
        before = _vm_hwm_mb(proc.pid)
        assoc = ae.associate("127.0.0.1", proc.port, ae_title=proc.ae_title)
        assert assoc.is_established
        try:
            statuses = [assoc.send_c_store(bomb).Status, assoc.send_c_store(big).Status]
        finally:
            assoc.release()
        after = _vm_hwm_mb(proc.pid)
    finally:
        proc.stop()
    assert statuses == [STATUS_OUT_OF_RESOURCES, STATUS_OUT_OF_RESOURCES]
    assert after - before < 100, f"peak RSS grew from {before:.0f} MB to {after:.0f} MB"


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


# -- slow and idle peers ------------------------------------------------------------------------

def _a_associate_rq() -> bytes:
    """A valid A-ASSOCIATE-RQ for Verification from SCANNER to the test node."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context
    from pynetdicom.transport import AddressInformation

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "SCANNER"
    primitive.called_ae_title = NODE_AE
    primitive.calling_presentation_address = AddressInformation("127.0.0.1", 1)
    primitive.called_presentation_address = AddressInformation("127.0.0.1", 2)
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


class Trickler(threading.Thread):
    """Sends ``payload`` one byte every ``interval`` seconds until the node closes the connection
    or ``limit`` seconds pass."""

    def __init__(self, port: int, payload: bytes, interval: float, limit: float) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=2)
        self.payload, self.interval, self.limit = payload, interval, limit
        self.closed_after: float | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        for byte in self.payload:
            if self._halt.is_set() or time.monotonic() - start > self.limit:
                return
            try:
                self.sock.sendall(bytes([byte]))
            except OSError:
                self.closed_after = time.monotonic() - start
                return
            if self._halt.wait(self.interval):
                return
            if _closed_by_peer(self.sock):
                self.closed_after = time.monotonic() - start
                return

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        self.sock.close()


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(64) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def test_slow_and_idle_peers_cannot_lock_others_out(nodes: list[LimitedNode], tmp_path: Path) -> None:
    n = 4
    node = LimitedNode(tmp_path, node={"max_associations": n}, acse_timeout_s=3, pdu_timeout_s=3,
                       max_connections=4 * n)
    nodes.append(node)
    rq = _a_associate_rq()
    slow = [Trickler(node.scp.port, rq, interval=0.5, limit=15) for _ in range(n)]
    idle = [socket.create_connection(("127.0.0.1", node.scp.port), timeout=2) for _ in range(n)]
    try:
        for t in slow:
            t.start()
        time.sleep(1.0)  # every slow and idle connection is open and being served
        started = time.monotonic()
        assoc = node.associate(timeout=5)
        try:
            assert assoc.is_established, "a legitimate peer was locked out"
            assert assoc.send_c_echo().Status == STATUS_SUCCESS
        finally:
            assoc.release()
        assert time.monotonic() - started < 3
        # the slow ones are cut at acse_timeout_s, not kept while they trickle
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(t.closed_after is None for t in slow):
            time.sleep(0.2)
        assert all(t.closed_after is not None and t.closed_after < 6 for t in slow), \
            [t.closed_after for t in slow]
        for sock in idle:
            sock.settimeout(6)
            assert sock.recv(64) == b"", "an idle connection was kept open"
    finally:
        for t in slow:
            t.stop()
        for sock in idle:
            sock.close()


@contextmanager
def _associated_socket(node: LimitedNode) -> Iterator[socket.socket]:
    """A raw socket to the node, past the A-ASSOCIATE-AC."""
    with socket.create_connection(("127.0.0.1", node.scp.port), timeout=5) as sock:
        sock.sendall(_a_associate_rq())
        header = sock.recv(6)
        assert header[:1] == b"\x02", f"not associated: {header!r}"
        (length,) = struct.unpack(">L", header[2:6])
        while length:
            length -= len(sock.recv(length))
        yield sock


def test_slow_pdu_after_association_is_aborted(nodes: list[LimitedNode], tmp_path: Path) -> None:
    node = LimitedNode(tmp_path, acse_timeout_s=3, pdu_timeout_s=2)
    nodes.append(node)
    with _associated_socket(node) as sock:
        # a P-DATA-TF PDU that declares 1000 bytes and sends one byte a second
        sock.sendall(struct.pack(">BBL", 0x04, 0, 1000))
        started = time.monotonic()
        closed = False
        for _ in range(10):
            try:
                sock.sendall(b"\0")
            except OSError:
                closed = True
                break
            if _closed_by_peer(sock):
                closed = True
                break
            time.sleep(1)
        assert closed and time.monotonic() - started < 5


@pytest.mark.parametrize("ending", ["closed", "reset"])
def test_a_connection_lost_mid_object_gives_its_receive_memory_back(nodes: list[LimitedNode], tmp_path: Path,
                                                                    ending: str) -> None:
    """A sender that closes or resets its connection while a data set arrives, without an A-ABORT (a modality
    cancelled, the network dropped): what that data set reserved is given back, or enough of them would leave
    every later object refused (0xA700) until a restart."""
    node = LimitedNode(tmp_path)
    nodes.append(node)
    n = 500_000
    with _associated_socket(node) as sock:
        item = struct.pack(">LBB", n + 2, 1, 0x00) + b"\0" * n  # a data set fragment, not its last
        sock.sendall(struct.pack(">BBL", 0x04, 0, len(item)) + item)
        assert _waited(lambda: node.scp.budget.used == n)  # reserved while it arrives
        if ending == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert _waited(lambda: node.scp.budget.used == 0), node.scp.budget.used


def _waited(condition: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(condition())


def test_admission_counts_associations_only(nodes: list[LimitedNode], tmp_path: Path) -> None:
    node = LimitedNode(tmp_path, node={"max_associations": 2}, max_connections=8)
    nodes.append(node)
    first, second = node.associate(), node.associate()
    try:
        assert first.is_established and second.is_established
        third = node.associate()
        assert third.is_rejected
    finally:
        first.release()
        second.release()
    time.sleep(0.5)
    again = node.associate()
    assert again.is_established
    again.release()


def test_each_association_gets_its_own_copy_of_the_supported_contexts(nodes: list[LimitedNode],
                                                                      tmp_path: Path) -> None:
    """The copy each accepted association gets (``CopiedContexts``, for pynetdicom's slow ``deepcopy``) equals
    ``deepcopy``'s and shares nothing mutable with the server's contexts or another association's."""
    node = LimitedNode(tmp_path)
    nodes.append(node)
    server = node.scp._server
    reference = copy.deepcopy(list(server.contexts))
    assocs = [node.associate() for _ in range(2)]
    try:
        assert all(a.is_established for a in assocs)
        assert type(server.contexts) is CopiedContexts
        accepted = [a.acceptor.get_contexts("supported") for a in node.scp.ae.active_associations if a.is_acceptor]
        assert len(accepted) == 2
        for contexts in [*accepted, copy.deepcopy(server.contexts)]:
            assert [vars(c) for c in contexts] == [vars(c) for c in reference]
            for mine, theirs in zip(contexts, server.contexts, strict=True):
                assert mine is not theirs
                for name, value in vars(mine).items():
                    if isinstance(value, list):
                        assert value is not vars(theirs)[name], name
                    else:  # a mutable attribute a later pynetdicom adds must be copied too
                        assert value is None or isinstance(value, str | int), (name, value)
        assert not {id(c) for c in accepted[0]} & {id(c) for c in accepted[1]}
    finally:
        for assoc in assocs:
            assoc.release()
