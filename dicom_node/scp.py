"""The node's DICOM SCP: admission (AE title and host), C-ECHO and C-STORE into the spool.

A C-STORE is answered with Success only after the instance is durable and filed: in the spool and in
the journal (committed). With the node's receipt log (:mod:`dicom_node.receipts`, what the node runs with
``[node] fsync``) one synchronous append to the log makes it durable, written by a helper thread while the
instance is parsed and checked (then it is filed: spool file and journal row, not synced until the log's
segment settles); without it, the spool file, its directory and the journal commit are each synced in turn.
The pixel data is never decoded here: the encoded dataset is written as it came, and only the header is
parsed to file it.

One SOP Instance UID is one object: the journal keeps a SHA-256 of each data set as received; the
same UID again with the same content is an idempotent success, with other content a failure
(the stored object is kept, never replaced). UIDs that are not of UID form are refused.

While the data directory's file system is below its low watermark (``dicom_node.disk``), every C-STORE
is refused with 0xA700 before anything is written.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import logging
import os
import re
import socket
import struct
import threading
import time
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_dataset, read_file_meta_info, read_preamble
from pydicom.tag import Tag
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.valuerep import VR
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.sop_class import Verification

from .audit import AssociationLedger, AuditTrail
from .config import NodeConfig
from .dimse import quiet_library_handlers
from .disk import DiskGuard
from .guard import GuardedRequestHandler, GuardedSocket, Limits, MiB, ReceiveBudget, inflated_size_exceeds
from .headers import ReceivedInstance, SeriesAttributes, describe
from .headers import text as _str
from .journal import InstanceRecord, Journal
from .journal_sql import unavailable_errors
from .lock import InstanceLocks
from .receipts import (
    Receipt,
    ReceiptLog,
    Segment,
    SyncFailed,
    index_records,
    live_records,
    load_record,
    needs_rewrite,
    try_mark_for_rewrite,
)
from .routing import ROUTABLE_SOP_CLASSES
from .spool import Spool
from .tls import NodeAssociationServer, SharedPortAssociationServer, common_name, describe_connection, server_context
from .uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, is_valid_uid

log = logging.getLogger(__name__)

#: Transfer syntaxes the SCP accepts: the ones a brain MR study arrives in and pydicom can decode.
TRANSFER_SYNTAXES: list[UID] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

# Status codes (PS3.4 B.2.3 and Annex C of PS3.7)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

PIXEL_DATA = Tag(0x7FE0, 0x0010)
_KNOWN_VRS = frozenset(VR.__members__)
_BITS_ALLOCATED = frozenset({1, 8, 16, 24, 32, 40, 48, 56, 64})
UNDEFINED_LENGTH = 0xFFFFFFFF
#: Series whose attributes (routing's, read from their first instance) the receiver keeps for the next instance.
SERIES_READ_KEPT = 64
#: The most sequence items (and encapsulated pixel data fragments) a received data set may hold. pydicom builds an
#: object for each item as it parses: a private sequence of 16 MB of empty items took 644 MB of memory (40 times
#: what was received), so one object within ``[limits] max_object_mb`` could have the node killed for memory, and
#: its receipt record again at every start. A 1000-frame Enhanced MR holds some 10,000.
MAX_ITEMS = 200_000
#: the Item tag (FFFE,E000) as little and big endian data sets encode it
_ITEM_TAGS = {True: re.compile(re.escape(b"\xfe\xff\x00\xe0")), False: re.compile(re.escape(b"\xff\xfe\xe0\x00"))}


class BadInstance(ValueError):
    """A received object that cannot be filed; ``status`` is the DIMSE status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class DuplicateConflict(BadInstance):
    """A SOP Instance UID the node already stored, sent again with other content."""

    def __init__(self, detail: str) -> None:
        super().__init__(STATUS_CANNOT_UNDERSTAND, "SOP Instance UID already stored with other content")
        self.detail = detail


def set_nodelay(sock: socket.socket | None) -> None:
    """Disable Nagle's algorithm: small DIMSE responses otherwise wait ~40 ms for a delayed ACK."""
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def set_implementation(ae: AE) -> None:
    """Announce the node's own Implementation Class UID and Version Name (not pynetdicom's)."""
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME


def nodelay_on_open(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler: :func:`set_nodelay` on the association's socket (the SCP's, the dispatcher's
    and the benchmarks' SCUs)."""
    set_nodelay(event.assoc.dul.socket.socket if event.assoc.dul.socket else None)


def parse_instance(data: bytes) -> Dataset:
    """Parse a Part 10 file's bytes (preamble, file meta, data set) as :func:`parse_dataset` does.

    Raises :class:`BadInstance` for an object that is corrupt or cannot be filed.
    """
    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        ts = UID(str(meta.get("TransferSyntaxUID") or ExplicitVRLittleEndian))
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, struct.error) as exc:
        raise BadInstance(STATUS_CANNOT_UNDERSTAND, f"cannot parse the dataset: {exc}") from None
    ds = parse_dataset(fp, ts)
    ds.file_meta = meta
    return ds


def parse_dataset(fp: BinaryIO, transfer_syntax: UID) -> Dataset:
    """Parse a received data set (no file meta; from ``fp``'s position on) and check its structure,
    without decoding pixels or converting any value but the few that are checked.

    Raises :class:`BadInstance` for an object that is corrupt or cannot be filed.
    """
    try:
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            fp = io.BytesIO(zlib.decompress(fp.read(), -zlib.MAX_WBITS))
        _check_items(fp, transfer_syntax.is_little_endian)
        ds = read_dataset(fp, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian)
        _check_elements(ds)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, NotImplementedError,
            struct.error, zlib.error, BytesLengthException, RecursionError) as exc:
        # struct.error: an element header cut inside its length field; zlib.error: a Deflate data set whose
        # stream is broken; BytesLengthException: a binary VR (FL, FD, US...) on a value of another length;
        # RecursionError: sequences nested thousands deep (50 kB do it)
        raise BadInstance(STATUS_CANNOT_UNDERSTAND, f"cannot parse the dataset: {exc}") from None
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = _str(ds.get(keyword))
        if not value:
            raise BadInstance(STATUS_DATASET_MISMATCH, f"required attribute {keyword} is missing or empty")
        if not is_valid_uid(value):
            raise BadInstance(STATUS_DATASET_MISMATCH, f"{keyword} {value[:20]!r} is not a valid UID")
    frame_of_reference = _str(ds.get("FrameOfReferenceUID"))
    if frame_of_reference and not is_valid_uid(frame_of_reference):
        raise BadInstance(STATUS_DATASET_MISMATCH,
                          f"FrameOfReferenceUID {frame_of_reference[:20]!r} is not a valid UID")
    if PIXEL_DATA in ds:
        _check_pixel_data(ds, transfer_syntax)
    elif _str(ds.SOPClassUID) in ROUTABLE_SOP_CLASSES:
        raise BadInstance(STATUS_CANNOT_UNDERSTAND, "MR image without PixelData (truncated?)")
    return ds


def _check_items(fp: BinaryIO, little_endian: bool) -> None:
    """Refuse a data set holding more than :data:`MAX_ITEMS` sequence items before it is parsed (the Item tag's
    bytes counted from ``fp``'s position, when ``fp`` is in memory; pixel values that happen to spell it only add to
    the count). An object too small to hold that many is not scanned (a 256 x 256 image costs nothing)."""
    getbuffer = getattr(fp, "getbuffer", None)
    if getbuffer is None:
        return
    with getbuffer() as view:
        if len(view) - fp.tell() <= 8 * MAX_ITEMS:  # (an item takes 8 bytes at least: most objects need no scan)
            return
        for n, _ in enumerate(_ITEM_TAGS[little_endian].finditer(view, fp.tell()), 1):
            if n > MAX_ITEMS:
                raise BadInstance(STATUS_CANNOT_UNDERSTAND, f"more than {MAX_ITEMS} sequence items: refused (the "
                                                            "node's memory)")


def _check_elements(ds: Dataset) -> None:
    """pydicom reads a truncated encoding without complaint: the last element just gets fewer bytes than its
    header declares. Compare every top-level element's length with its declared length and check its VR,
    without converting any value (what the node uses is converted later, by headers.describe)."""
    for elem in ds.values():  # as read: raw, unconverted (and in no particular order: none is needed here)
        if type(elem) is RawDataElement:
            declared, value, vr = elem.length, elem.value, elem.VR
            if declared != UNDEFINED_LENGTH and isinstance(value, bytes) and len(value) != declared:
                raise BadInstance(
                    STATUS_CANNOT_UNDERSTAND,
                    f"{_truncated_name(elem.tag)} is truncated: {len(value)} of {declared} bytes",
                )
        else:
            vr = elem.VR
        if vr is not None and str(vr) not in _KNOWN_VRS:
            raise BadInstance(STATUS_CANNOT_UNDERSTAND, f"element {Tag(elem.tag)} has an unknown VR {str(vr)[:4]!r}")
    pixel = ds.get_item(PIXEL_DATA)
    if type(pixel) is RawDataElement and pixel.length != UNDEFINED_LENGTH and pixel.length % 2:
        raise BadInstance(STATUS_CANNOT_UNDERSTAND, f"PixelData has an odd length ({pixel.length} bytes)")


def _truncated_name(tag: Any) -> str:
    return "PixelData" if tag == PIXEL_DATA else f"element {Tag(tag)}"


def _check_pixel_data(ds: Dataset, ts: UID) -> None:
    pixel = ds.get_item(PIXEL_DATA)  # the raw element as read: no copy or conversion of the pixels
    value = pixel.value
    if value is None:
        raise BadInstance(STATUS_CANNOT_UNDERSTAND, "PixelData has no value")
    undefined_length = pixel.length == UNDEFINED_LENGTH if pixel.is_raw else pixel.is_undefined_length
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        spp = int(ds.get("SamplesPerPixel", 1))
        frames_value = ds.get("NumberOfFrames")
        frames = 1 if frames_value in (None, "") else int(frames_value)
    except (AttributeError, TypeError, ValueError, OverflowError, BytesLengthException) as exc:  # a 3-byte US Rows
        raise BadInstance(STATUS_DATASET_MISMATCH, f"image pixel module incomplete: {exc}") from None
    for name, number in (("Rows", rows), ("Columns", cols), ("SamplesPerPixel", spp), ("NumberOfFrames", frames)):
        if number < 1:
            raise BadInstance(STATUS_DATASET_MISMATCH, f"{name} is {number}: an image needs at least 1")
    if bits not in _BITS_ALLOCATED:
        raise BadInstance(STATUS_DATASET_MISMATCH, f"BitsAllocated is {bits}: not 1 or a multiple of 8 up to 64")
    if ts.is_encapsulated:
        # PS3.5 A.4: undefined length, items (the Basic Offset Table first, then the fragments). Native pixel bytes
        # labelled compressed were acknowledged and failed only when a job decoded them (found in review)
        if (not undefined_length or not isinstance(value, (bytes, bytearray, memoryview))
                or bytes(value[:4]) != b"\xfe\xff\x00\xe0"):
            raise BadInstance(STATUS_CANNOT_UNDERSTAND, f"PixelData is not encapsulated (items of undefined length) as "
                                                        f"the transfer syntax {ts.name or ts} needs")
        return
    expected = (rows * cols * spp * frames * bits + 7) // 8
    if len(value) < expected:
        raise BadInstance(
            STATUS_CANNOT_UNDERSTAND,
            f"PixelData is truncated: {len(value)} bytes, {rows}x{cols}x{frames} frames need {expected}",
        )
    if len(value) > expected + 1:  # one byte of padding to an even length
        raise BadInstance(
            STATUS_DATASET_MISMATCH,
            f"PixelData has {len(value)} bytes; Rows, Columns, SamplesPerPixel, NumberOfFrames and "
            f"BitsAllocated ({rows}x{cols}x{spp}x{frames}x{bits} bits) make {expected}",
        )


def content_digest(stream: bytes | memoryview) -> str:
    """SHA-256 (hex) of a data set as received, without the file meta (which the node itself adds)."""
    return hashlib.sha256(stream).hexdigest()


_PREAMBLE = b"\x00" * 128 + b"DICM"


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element of group 0002."""
    if vr == b"OB":
        return struct.pack("<HH2sxxL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _uid_value(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\x00" if len(value) % 2 else value


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and File Meta Information of a received object: byte for byte what pynetdicom's
    ``Event.encoded_dataset(include_meta=True)`` puts before the data set, encoded here directly
    (pydicom's writer takes about half a millisecond for these seven elements)."""
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _uid_value(sop_class_uid)),
        _meta_element(0x0003, b"UI", _uid_value(sop_instance_uid)),
        _meta_element(0x0010, b"UI", _uid_value(transfer_syntax)),
        _meta_element(0x0012, b"UI", _uid_value(PYNETDICOM_IMPLEMENTATION_UID)),
        _meta_element(0x0013, b"SH", version + b" " if len(version) % 2 else version),
    ))
    return _PREAMBLE + _meta_element(0x0000, b"UL", struct.pack("<L", len(body))) + body


def stored_digest(path: Path) -> str | None:
    """:func:`content_digest` of a spooled file (for instances journaled before digests were kept);
    None if the file cannot be read."""
    try:
        meta = read_file_meta_info(path)
        # preamble and prefix (132 bytes), the group length element (12 bytes, PS3.10 7.1), the group
        start = 132 + 12 + int(meta.FileMetaInformationGroupLength)
        with open(path, "rb") as f:
            f.seek(start)
            return content_digest(f.read())
    except (OSError, ValueError, AttributeError, InvalidDicomError):
        return None


@dataclass
class Admission:
    """Which calling AE titles may send from which hosts."""

    peers: list[tuple[str, str | None]]

    def allows(self, calling_ae: str, address: str) -> tuple[bool, str]:
        if not self.peers:
            return True, "no [[peers]] configured: any calling AE is accepted"
        hosts_for_ae = [host for ae, host in self.peers if ae == calling_ae]
        address = _unmapped(address)
        if not hosts_for_ae:
            return False, f"calling AE title {calling_ae!r} is not a configured peer"
        for host in hosts_for_ae:
            if host is None or address in _resolve(host):
                return True, "known peer"
        return False, f"calling AE title {calling_ae!r} is a peer, but not from host {address}"


def _unmapped(address: str) -> str:
    """An IPv4 peer as a dual-stack listener ([node] host "::") sees it, ``::ffff:10.1.2.3``, as ``10.1.2.3``
    (the form a peer's ``host`` names it by)."""
    try:
        mapped = ipaddress.IPv6Address(address).ipv4_mapped
    except ValueError:
        return address
    return str(mapped) if mapped is not None else address


def _resolve(host: str) -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)} | {host}
    except (OSError, UnicodeError):  # UnicodeError: a name the IDNA codec refuses ("pacs..lan")
        return {host}


class StorageSCP:
    """The listening side of the node."""

    def __init__(
        self,
        config: NodeConfig,
        spool: Spool,
        journal: Journal,
        on_released: Callable[[set[str]], None],
        audit: AuditTrail | None = None,
        on_store_status: Callable[[int], None] | None = None,
        receipts: ReceiptLog | None = None,
    ) -> None:
        self.config = config
        #: where received objects are made durable before Success (None: each is synced where it is filed)
        self.receipts = receipts if spool.fsync else None
        #: write receipts while the received objects are parsed (one at a time per association)
        self._writers = ThreadPoolExecutor(max_workers=16, thread_name_prefix="scp-receipt")
        #: why the last replay of leftover segments failed ("" when it did not), and objects replays filed again
        self.replay_error = ""
        self.replayed_objects = 0
        self.audit = audit or AuditTrail(None, config.node.ae_title)
        self.ledger = AssociationLedger()
        self.spool = spool
        self.journal = journal
        self.on_released = on_released
        #: told the status each C-STORE was answered with (the node's metrics count them)
        self.on_store_status = on_store_status
        self.admission = Admission([(p.ae_title, p.host) for p in config.peers])
        self._touched: dict[int, set[str]] = {}
        self._lock = threading.Lock()
        self._claimed: set[str] = set()  # SOP Instance UIDs being filed right now
        #: the series attributes of the latest series filed, read from their first instance (headers.describe)
        self._series_read: OrderedDict[str, SeriesAttributes] = OrderedDict()
        self._claims = threading.Condition()
        self._instance_locks = InstanceLocks(config.node.data_dir)
        self._server: Any = None
        self._tls_server: Any = None
        limits = config.limits
        self.max_object = int(limits.max_object_mb * MiB)
        # a peer that counts only the PDV value against the PDU length gets a little slack
        max_pdu = config.node.max_pdu_size + 65536 if config.node.max_pdu_size else self.max_object + MiB
        self.limits = Limits(max_pdu=max_pdu, max_object=self.max_object, acse_timeout_s=limits.acse_timeout_s,
                             pdu_timeout_s=limits.pdu_timeout_s)
        self.budget = ReceiveBudget(int(limits.receive_memory_mb * MiB))
        #: what the journal raises when it cannot record an object now: answered 0xA700 (out of resources, try
        #: again later), not 0xC000, which most senders take as final
        self._journal_errors = unavailable_errors()
        #: the disk watermark on ``[node] data_dir`` (its ``state()`` is what /health reads)
        self.disk = DiskGuard(config.node.data_dir, min_free_mb=limits.min_free_mb,
                              resume_free_mb=limits.resume_free_mb)
        self._admitted: weakref.WeakSet[Any] = weakref.WeakSet()  # associations past their A-ASSOCIATE-RQ
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        node = self.config.node
        ae = AE(ae_title=node.ae_title)
        set_implementation(ae)
        ae.maximum_pdu_size = node.max_pdu_size
        # pynetdicom counts every open connection; the node's own admission counts associations
        # (``_handle_requested``), so connections that never send an A-ASSOCIATE-RQ take no slot
        ae.maximum_associations = self.config.limits.max_connections
        ae.acse_timeout = self.config.limits.acse_timeout_s
        ae.network_timeout = node.network_timeout_s
        ae.require_called_aet = node.require_called_ae
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        return ae

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        node = self.config.node
        handlers = [
            (evt.EVT_CONN_OPEN, nodelay_on_open),
            (evt.EVT_REQUESTED, self._handle_requested),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_RELEASED, self._handle_released),
            (evt.EVT_ABORTED, self._handle_aborted),
        ]
        quiet_library_handlers()  # before the listeners bind pynetdicom's default handlers
        self._server = self._listen(node.port, handlers)
        log.info("listening as %s on %s:%d", node.ae_title, node.host, self.port)
        tls = self.config.tls
        if tls.port is not None:
            self._tls_server = self._listen(tls.port, handlers, server_context(tls))
            log.info("listening as %s with DICOM TLS (TLS %s or newer%s) on %s:%d", node.ae_title, tls.min_version,
                     ", client certificate required" if tls.require_client_cert else "", node.host, self.tls_port)
        if not self.config.peers:
            log.warning("no [[peers]] configured: associations from any calling AE title are accepted")

    def _listen(self, port: int, handlers: list[Any], ssl_context: Any = None) -> Any:
        """A listener on ``port`` (TLS when ``ssl_context``) sharing the node's handlers, admission and limits."""
        server = self.ae.make_server((self.config.node.host, port), evt_handlers=handlers, ssl_context=ssl_context,
                                     server_class=SharedPortAssociationServer if self.config.node.reuse_port
                                     else NodeAssociationServer, request_handler=GuardedRequestHandler)
        server.dn_limits = self.limits
        server.dn_budget = self.budget
        server.dn_max_connections = self.config.limits.max_connections
        server.dn_handshake_timeout_s = self.config.tls.handshake_timeout_s
        self.ae._servers.append(server)  # as AE.start_server does: server.shutdown() removes it
        name = "dicom-node-tls-listener" if ssl_context else "dicom-node-listener"
        server.dn_thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
        server.dn_thread.start()
        return server

    @property
    def listening(self) -> bool:
        """Every listener started (plain, and TLS when configured) still accepts: its socket is open and its
        thread runs."""
        servers = [self._server] + ([self._tls_server] if self.config.tls.port is not None else [])
        return all(s is not None and s.socket.fileno() >= 0 and s.dn_thread.is_alive() for s in servers)

    @property
    def port(self) -> int:
        if self._server is None:
            return self.config.node.port
        return int(self._server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The TLS listener's port (None without one)."""
        if self._tls_server is None:
            return self.config.tls.port
        return int(self._tls_server.server_address[1])

    def stop(self) -> None:
        for server in (self._server, self._tls_server):
            if server is not None:
                server.shutdown()
        self._server = self._tls_server = None
        self._instance_locks.close()

    # -- handlers --------------------------------------------------------------------------

    def _handle_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        calling = assoc.requestor.primitive.calling_ae_title.strip()
        address = assoc.requestor.address
        try:
            ok, why = self.admission.allows(calling, address)
            if ok:
                ok, why = self._tls_allows(calling, assoc.dul.socket.socket if assoc.dul.socket else None)
        except Exception as exc:  # noqa: BLE001 - closed, not open: pynetdicom would log it and accept the association
            log.exception("association from %s@%s: the admission check failed", calling, address)
            ok, why = False, f"the admission check failed: {type(exc).__name__}: {exc}"
        if not ok:
            log.warning("association from %s@%s rejected: %s", calling, address, why)
            self.audit.record("association-rejected", calling_ae=calling, host=address, reason=why)
            # rejected-permanent, service-user, calling-AE-title-not-recognized
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            # as pynetdicom's own rejections do: let the DUL send the A-ASSOCIATE-RJ, then stop it
            assoc.kill()
            return
        called = assoc.requestor.primitive.called_ae_title.strip()
        if self.config.node.require_called_ae and called != self.config.node.ae_title:
            log.warning(
                "association from %s@%s rejected: called AE title %r is not this node's %r",
                calling, address, called, self.config.node.ae_title,
            )
            self.audit.record("association-rejected", calling_ae=calling, host=address,
                              reason=f"called AE title {called!r} is not this node's")
            return  # pynetdicom rejects it
        with self._lock:
            busy = sum(1 for a in list(self._admitted) if a.is_alive() and a is not assoc)
            if busy >= self.config.node.max_associations:
                log.warning("association from %s@%s rejected: %d associations are being served, the node's "
                            "max_associations", calling, address, busy)
                self.audit.record("association-rejected", calling_ae=calling, host=address,
                                  reason=f"{busy} associations are being served (max_associations)")
                # rejected-transient, service-provider (presentation), local-limit-exceeded
                assoc.acse.send_reject(0x02, 0x03, 0x02)
                assoc.kill()
                return
            self._admitted.add(assoc)

    def _tls_allows(self, calling: str, sock: Any) -> tuple[bool, str]:
        """A peer with ``tls`` must come over TLS; one with ``tls_common_name`` with that verified client
        certificate."""
        peers = [p for p in self.config.peers if p.ae_title == calling]
        over_tls = describe_connection(sock)
        if over_tls:
            log.debug("association from %s over %s", calling, over_tls)
        if any(p.tls or p.tls_common_name for p in peers) and over_tls is None:
            return False, f"calling AE title {calling!r} must use DICOM TLS (port {self.tls_port})"
        names = {p.tls_common_name for p in peers if p.tls_common_name}
        if names and common_name(sock) not in names:
            return False, (f"calling AE title {calling!r} needs a client certificate with CN "
                           f"{' or '.join(sorted(names))} ({over_tls})")
        return True, "TLS policy met"

    def _handle_echo(self, event: evt.Event) -> int:
        log.info("C-ECHO from %s@%s", event.assoc.requestor.ae_title, event.assoc.requestor.address)
        return STATUS_SUCCESS

    @contextmanager
    def _claim(self, sop_uid: str) -> Iterator[None]:
        """One association at a time files a given SOP Instance UID (look-up, write, journal), of this process and
        of any other filing into the data directory (:class:`dicom_node.lock.InstanceLocks`)."""
        with self._claims:
            while sop_uid in self._claimed:
                self._claims.wait()
            self._claimed.add(sop_uid)
        try:
            with self._instance_locks.held(sop_uid):
                yield
        finally:
            with self._claims:
                self._claimed.discard(sop_uid)
                self._claims.notify_all()

    def _handle_store(self, event: evt.Event) -> int | Dataset:
        sock = event.assoc.dul.socket
        receipt = sock.take_receipt(int(event.request.MessageID)) if isinstance(sock, GuardedSocket) else None
        try:
            if receipt is not None and receipt.refused is not None:
                log.error("C-STORE of %s from %s refused (status 0x%04X): %s (%d bytes arrived)",
                          _str(event.request.AffectedSOPInstanceUID) or "?", event.assoc.requestor.ae_title.strip(),
                          STATUS_OUT_OF_RESOURCES, receipt.refused, receipt.size)
                status: int | Dataset = _failure(STATUS_OUT_OF_RESOURCES, receipt.refused)
            elif (low_disk := self.disk.refusal()) is not None:
                # logged once when refusing began (dicom_node.disk), not per object
                log.debug("C-STORE of %s from %s refused (status 0x%04X): %s",
                          _str(event.request.AffectedSOPInstanceUID) or "?", event.assoc.requestor.ae_title.strip(),
                          STATUS_OUT_OF_RESOURCES, low_disk)
                status = _failure(STATUS_OUT_OF_RESOURCES, low_disk)
            else:
                status = self._store(event)
        finally:
            if receipt is not None:
                sock.release(receipt)
        code = status if isinstance(status, int) else int(status.Status)
        if isinstance(status, Dataset):
            self.ledger.refused(id(event.assoc), code)
        if self.on_store_status is not None:
            self.on_store_status(code)
        return status

    def _store(self, event: evt.Event) -> int | Dataset:
        calling = event.assoc.requestor.ae_title.strip()
        sop_uid = _str(event.request.AffectedSOPInstanceUID)
        try:
            with event.request.DataSet.getbuffer() as view:
                received, series_uid = self._file(event, view, calling, sop_uid)
        except DuplicateConflict as exc:
            log.warning("C-STORE of %s from %s refused (status 0x%04X): %s", sop_uid, calling, exc.status,
                        exc.detail)
            return _failure(exc.status, str(exc))
        except BadInstance as exc:
            log.error("C-STORE of %s from %s refused (status 0x%04X): %s", sop_uid or "?", calling, exc.status, exc)
            return _failure(exc.status, str(exc))
        except OSError as exc:
            log.error("C-STORE of %s from %s failed, cannot store: %s", sop_uid, calling, exc)
            return _failure(STATUS_OUT_OF_RESOURCES, f"cannot store: {exc.strerror or exc}")
        except self._journal_errors as exc:  # locked past its busy timeout, the server gone: the sender tries again
            log.error("C-STORE of %s from %s failed, the journal cannot record it: %s: %s", sop_uid, calling,
                      type(exc).__name__, exc)
            return _failure(STATUS_OUT_OF_RESOURCES, f"cannot store: the journal is unavailable ({exc})")
        except MemoryError:  # this machine, not the object: the sender tries again (0xC000 is final for most)
            log.error("C-STORE of %s from %s failed: out of memory", sop_uid, calling)
            return _failure(STATUS_OUT_OF_RESOURCES, "cannot store: out of memory")
        except Exception as exc:  # noqa: BLE001 - answer the peer, never crash the association
            log.exception("C-STORE of %s from %s failed unexpectedly", sop_uid, calling)
            return _failure(STATUS_CANNOT_UNDERSTAND, f"unexpected error: {exc}")
        self._remember_series(received)
        with self._lock:
            self._touched.setdefault(id(event.assoc), set()).add(series_uid)
        self.ledger.stored(id(event.assoc), received.patient_id, received.study_uid, series_uid)
        log.debug("stored %s (series %s) from %s", sop_uid, series_uid, calling)
        return STATUS_SUCCESS

    def _receive(self, event: evt.Event, view: memoryview, sop_uid: str) -> tuple[ReceivedInstance, str]:
        """The received data set checked and described, and its content digest; raises BadInstance."""
        transfer_syntax = UID(str(event.context.transfer_syntax))
        self._check_inflated(view, transfer_syntax)
        digest = content_digest(view)
        fp = event.request.DataSet
        fp.seek(0)
        return self._read(fp, transfer_syntax, sop_uid, _str(event.request.AffectedSOPClassUID)), digest

    def _check_inflated(self, view: memoryview, transfer_syntax: UID) -> None:
        """A Deflate data set must not inflate beyond ``[limits] max_object_mb``; raises BadInstance."""
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            if inflated_size_exceeds(view, self.max_object) is not None:
                raise BadInstance(STATUS_OUT_OF_RESOURCES,
                                  f"Deflate data set inflates to more than {self.max_object // MiB} MB")

    def _read(self, fp: BinaryIO, transfer_syntax: UID, sop_uid: str, sop_class: str) -> ReceivedInstance:
        """Parse, check and describe a data set announced as ``sop_uid`` of ``sop_class``; raises BadInstance."""
        ds = parse_dataset(fp, transfer_syntax)
        if _str(ds.SOPInstanceUID) != sop_uid:
            raise BadInstance(STATUS_DATASET_MISMATCH,
                              f"SOPInstanceUID {ds.SOPInstanceUID} differs from the request's {sop_uid}")
        if _str(ds.SOPClassUID) != sop_class:
            raise BadInstance(STATUS_DATASET_MISMATCH,
                              f"SOPClassUID {ds.SOPClassUID} differs from the request's {sop_class}")
        series_uid = _str(ds.SeriesInstanceUID)
        with self._lock:
            known_series = self._series_read.get(series_uid)
            if known_series is not None:
                self._series_read.move_to_end(series_uid)
        try:
            return describe(ds, known_series)
        except (TypeError, ValueError, OverflowError, BytesLengthException) as exc:  # InstanceNumber "1e999"
            raise BadInstance(STATUS_CANNOT_UNDERSTAND, f"cannot read the header: {exc}") from None

    def _remember_series(self, received: ReceivedInstance) -> None:
        """Keep the series attributes of an instance that was filed, for the series' next instances."""
        with self._lock:
            if received.series_uid not in self._series_read:
                self._series_read[received.series_uid] = received.series
                while len(self._series_read) > SERIES_READ_KEPT:
                    self._series_read.popitem(last=False)

    def _file(self, event: evt.Event, view: memoryview, calling: str, sop_uid: str) -> tuple[ReceivedInstance, str]:
        """Spool and journal one received data set (unless it is a re-send of a stored one); (what was
        received, the series it is filed under)."""
        transfer_syntax = str(event.context.transfer_syntax)
        # the file is the file meta (as pynetdicom's Event.encoded_dataset makes it) and the data set as received
        sop_class = _str(event.request.AffectedSOPClassUID)
        for name, uid in (("AffectedSOPInstanceUID", sop_uid), ("AffectedSOPClassUID", sop_class)):
            if not is_valid_uid(uid):  # (the file meta would hold it, and its lock file is named by it)
                raise BadInstance(STATUS_DATASET_MISMATCH, f"{name} {uid[:20]!r} is not a valid UID")
        parts = (file_meta(sop_class, sop_uid, transfer_syntax), view)
        with self._receipt(id(event.assoc)) as receipt:
            received, digest = self._receive_logged(event, view, parts, calling, sop_class, sop_uid, receipt)
            durable = receipt.segment is None  # the receipt log holds it, or (no log, or its write failed) not
            study_uid, series_uid = received.study_uid, received.series_uid
            with self._claim(sop_uid):
                known = self.journal.instance(sop_uid)
                if known is not None:
                    stored_series = self.journal.series(known.series_uid)
                    self._check_resend(known, digest, series_uid, calling, received, transfer_syntax,
                                       stored_series.patient_id if stored_series is not None else None)
                    if not self.journal.confirm_instance(sop_uid):
                        known = None  # a retention sweep purged it since the look-up: stored as new
                    elif not Path(known.path).exists():  # same content, so the same UIDs and path
                        log.warning("C-STORE of %s from %s: already journaled but its file %s is missing; "
                                    "written again", sop_uid, calling, known.path)
                        self.spool.write(study_uid, series_uid, sop_uid, parts)
                if known is not None:
                    return received, known.series_uid
                path = self.spool.write(study_uid, series_uid, sop_uid, parts, durable=durable)
                receipt.path = path
                self.journal.add_instance(received, transfer_syntax=transfer_syntax, path=str(path),
                                          calling_ae=calling, sha256=digest, durable=durable)
                if not path.exists():
                    # a retention sweep deleted an earlier copy at this path between the write and the
                    # journal row (Journal.finish_purge); the row is there now, so write it again
                    log.info("C-STORE of %s from %s: a retention sweep removed the file being stored; "
                             "written again", sop_uid, calling)
                    self.spool.write(study_uid, series_uid, sop_uid, parts)
        return received, series_uid

    def _receive_logged(self, event: evt.Event, view: memoryview, parts: tuple[bytes, memoryview], calling: str,
                        sop_class: str, sop_uid: str, receipt: _Receipt) -> tuple[ReceivedInstance, str]:
        """:meth:`_receive`, the object appended to the receipt log meanwhile (``receipt.segment`` once it is durable
        there; None without a log, or when the append failed: the object is then synced where it is filed)."""
        if self.receipts is None:
            return self._receive(event, view, sop_uid)
        # The record is written (one O_DSYNC writev) by a helper thread while this one parses: the sync costs no
        # time of its own unless it outlasts the parse. The record is made here first, so that the helper needs the
        # interpreter lock only for a moment before its system call (it gets it when the digest releases it).
        receipt.sop_uid, receipt.received_at = sop_uid, time.time()
        record = self.receipts.record(parts, calling_ae=calling, transfer_syntax=str(event.context.transfer_syntax),
                                      sop_class_uid=sop_class, sop_instance_uid=sop_uid,
                                      received_at=receipt.received_at)
        writing = self._writers.submit(self.receipts.append, receipt.key, record)
        try:
            return self._receive(event, view, sop_uid)
        finally:  # waited for also when the object was refused: the record's buffers are the received ones
            try:
                receipt.segment = writing.result()
            except OSError as exc:
                log.error("receipt log: cannot append (%s): %s is synced where it is filed", exc, sop_uid)

    @contextmanager
    def _receipt(self, key: int) -> Iterator[_Receipt]:
        """One object's receipt (:meth:`_receive_logged`); on the way out the log is told what was filed for it
        (:meth:`ReceiptLog.filed`)."""
        receipt = _Receipt(key)
        try:
            yield receipt
        except Exception:  # answered with a failure: its record must not be filed by a replay
            self._note_refusal(receipt)
            raise
        finally:
            if receipt.segment is not None:
                assert self.receipts is not None
                self.receipts.filed(key, receipt.segment, receipt.path)

    def _note_refusal(self, receipt: _Receipt) -> None:
        """Append the refusal of an object whose record is durable in the log, before its failure is answered."""
        if receipt.segment is None or self.receipts is None:
            return
        try:
            self.receipts.append_refusal(receipt.segment, receipt.sop_uid, receipt.received_at)
        except OSError as exc:
            log.error("receipt log: cannot note that %s was refused (%s): a replay after a crash would file it",
                      receipt.sop_uid, exc)

    # -- replay of the receipt log ----------------------------------------------------------

    def replay_receipts(self) -> int:
        """File again what segments left by a stopped process hold and the journal or spool lost (a crash or
        power loss before they settled); returns how many objects were filed again. The records of all such
        segments are replayed in the order they were received, but for those refused when they came (a
        conflicting re-send: so that the object acknowledged under a UID is the one kept); then the files found in
        place are synced, and the segments are deleted. Segments that cannot be replayed now stay for the next try
        (what a failed try filed again before it failed is counted by it)."""
        if self.receipts is None:
            return 0
        orphans = list(self.receipts.orphans())
        skipped = "; ".join(f"{name}: {why}" for name, why in self.receipts.unreplayable.items())
        self.replay_error = f"leftover segments not replayed: {skipped}" if skipped else ""
        if not orphans:
            return 0
        redone = 0
        try:
            refs = live_records([ref for path, _fd in orphans for ref in index_records(path)])
            refs.sort(key=lambda ref: (ref.received_at, str(ref.segment), ref.offset))
            in_place = []
            for ref in refs:
                filed_again, found = self._replay(load_record(ref), rewrite=needs_rewrite(ref.segment))
                redone += filed_again
                if found is not None:
                    in_place.append(found)
            ReceiptLog.sync_files(in_place)  # written before the stop, maybe never synced
            self.journal.sync()
            for path, _fd in orphans:
                path.unlink()
        except Exception as exc:  # noqa: BLE001 - kept for the next start or sweep
            if isinstance(exc, SyncFailed):  # a second fsync may lie: the next try writes the files again
                for path, _fd in orphans:
                    try_mark_for_rewrite(path)
            names = ", ".join(path.name for path, _fd in orphans)
            log.exception("receipt log: replaying %s failed; kept and tried again", names)
            self.replay_error = "; ".join(filter(None, (f"replaying {names} failed: {type(exc).__name__}: {exc}",
                                                         self.replay_error)))
            # what was filed again before the failure is counted now: the next try finds it in place
            self.replayed_objects += redone
            return redone
        finally:
            for _path, fd in orphans:
                os.close(fd)
        self.replayed_objects += redone
        log.log(logging.WARNING if redone else logging.INFO,
                "receipt log: %d segment(s) left by a stopped process replayed: %d object(s), %d filed again from "
                "the receipt log", len(orphans), len(refs), redone)
        return redone

    def _replay(self, record: Receipt, *, rewrite: bool = False) -> tuple[bool, Path | None]:
        """File ``record`` again if its journal row or spool file is missing (or the file is not what was
        received): (True, None). (False, the spool file) when it is in place; (False, None) when it was refused,
        or another object is kept under its UID. ``rewrite``: a file in place is written again all the same (its
        sync failed: what it reads back may never have reached the disk)."""
        sop_uid = record.sop_instance_uid
        try:
            self._check_inflated(record.dataset, UID(record.transfer_syntax))
            received = self._read(io.BytesIO(record.dataset), UID(record.transfer_syntax), sop_uid,
                                  record.sop_class_uid)
        except BadInstance as exc:  # refused when it came (the log holds objects before they are checked)
            log.warning("receipt log: %s was refused when received (%s): not filed", sop_uid, exc)
            return False, None
        except MemoryError:
            raise  # this machine, not the object: the segment is kept and replayed again
        except Exception as exc:  # noqa: BLE001 - the C-STORE answered this with a failure (0xC000) too
            log.warning("receipt log: %s cannot be read (%s: %s): it was refused when received; not filed",
                        sop_uid, type(exc).__name__, exc)
            return False, None
        digest = content_digest(record.dataset)
        with self._claim(sop_uid):
            known = self.journal.instance(sop_uid)
            if known is None:
                path = self.spool.write(received.study_uid, received.series_uid, sop_uid, record.data)
                self.journal.add_instance(received, transfer_syntax=record.transfer_syntax, path=str(path),
                                          calling_ae=record.calling_ae, sha256=digest, now=record.received_at)
                log.info("receipt log: %s from %s filed again (its journal row was lost)", sop_uid, record.calling_ae)
                return True, None
            on_disk = stored_digest(Path(known.path))
            expected = known.sha256 or on_disk
            if expected is not None and expected != digest:
                return False, None  # another object was kept under this UID (a conflicting re-send)
            if on_disk == digest and not rewrite:
                return False, Path(known.path)
            self.spool.write(received.study_uid, received.series_uid, sop_uid, record.data)
            log.info("receipt log: %s written again to %s (%s)", sop_uid, known.path,
                     "its sync had failed" if on_disk == digest else "the file was lost or cut short")
            return True, None

    @staticmethod
    def _check_resend(known: InstanceRecord, digest: str, series_uid: str, calling: str,
                      received: ReceivedInstance, transfer_syntax: str, known_patient: str | None) -> None:
        """A SOP Instance UID already filed: same content is fine (nothing is written again), and so is the same image
        in another transfer syntax (a PACS forwarding what it stored compressed, or in Implicit VR: the bytes differ,
        the SOP class, patient ID (``known_patient``: its series'), series, instance number and geometry do not, and
        the stored copy is there); other content raises :class:`DuplicateConflict` (the
        stored object stays as it is)."""
        stored = known.sha256 or stored_digest(Path(known.path))
        if stored == digest:
            log.info("C-STORE of %s from %s: already stored with the same content (idempotent)",
                     known.sop_instance_uid, calling)
            return
        if (known.transfer_syntax and transfer_syntax != known.transfer_syntax and series_uid == known.series_uid
                and received.sop_class_uid == known.sop_class_uid and received.header == known.header
                and received.patient_id == known_patient and Path(known.path).exists()):
            log.info("C-STORE of %s from %s: already stored, received now in another transfer syntax (%s; stored "
                     "as %s) with the same series, instance number and geometry: the stored copy is kept",
                     known.sop_instance_uid, calling, transfer_syntax, known.transfer_syntax)
            return
        if stored is None and series_uid == known.series_uid and not Path(known.path).exists():
            # a row from before digests were kept, its file gone: nothing is kept to conflict with; of the same
            # series, the caller writes this one at the row's path (another series would be filed elsewhere)
            return
        where = "" if series_uid == known.series_uid else f" in series {known.series_uid} (now sent in {series_uid})"
        why = "cannot read the stored copy to compare" if stored is None else "content differs"
        raise DuplicateConflict(
            f"already stored{where}; {why}: the stored object {known.path} is kept, the new one is not stored"
        )

    def _take_touched(self, event: evt.Event) -> set[str]:
        with self._lock:
            return self._touched.pop(id(event.assoc), set())

    def _audit_association(self, event: evt.Event, outcome: str) -> dict[str, Any]:
        """Record the association's end in the audit trail; returns what it stored and refused."""
        assoc = event.assoc
        sock = assoc.dul.socket.socket if assoc.dul.socket else None
        received = self.ledger.close(id(assoc))
        self.audit.record("association", outcome=outcome, calling_ae=assoc.requestor.ae_title.strip(),
                          called_ae=assoc.acceptor.ae_title.strip(), host=assoc.requestor.address,
                          tls=describe_connection(sock), **received)
        return received

    def _end_receipts(self, event: evt.Event) -> None:
        if self.receipts is not None:
            self.receipts.close(id(event.assoc))  # its segment settles in the background

    def _handle_released(self, event: evt.Event) -> None:
        self._end_receipts(event)
        received = self._audit_association(event, "released")
        touched = self._take_touched(event)
        if touched:
            # (no patient data: the counts only; the audit trail has the rest)
            log.info("association from %s (%s) released: %d series received, %d instance(s) stored, %d refused",
                     event.assoc.requestor.ae_title, event.assoc.requestor.address, len(touched),
                     sum(s["instances"] for s in received.get("stored", ())),
                     sum(received.get("refused", {}).values()))
            self.on_released(touched)

    def _handle_aborted(self, event: evt.Event) -> None:
        self._end_receipts(event)
        self._audit_association(event, "aborted")
        touched = self._take_touched(event)
        if touched:
            # Acknowledged instances are safe; the series close on their idle timeout.
            log.warning(
                "association from %s aborted after %d series: they close on their idle timeout",
                event.assoc.requestor.ae_title, len(touched),
            )


@dataclass
class _Receipt:
    """One object's record in the receipt log (of association ``key``), and the spool file filed for it."""

    key: int
    segment: Segment | None = None  #: the segment holding the record, once it is durable there
    path: Path | None = None
    sop_uid: str = ""
    received_at: float = 0.0  #: the record's time (what its refusal names it by)


def _failure(status: int, comment: str) -> Dataset:
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = comment[:64]
    return rsp
