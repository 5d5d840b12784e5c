"""What one peer may cost the node while it sends: memory, time and association slots.

pynetdicom reads each PDU whole, of whatever length its header declares, with no deadline for
one PDU, and keeps a C-STORE's data set in memory however large it grows. The node wraps the
accepted socket (:class:`GuardedSocket`) so that, before pynetdicom sees a PDU:

- a PDU longer than the node's maximum (``[node] max_pdu_size``; other PDU types at most 1 MiB) is
  answered with an A-ABORT and the connection closed, without reading its body;
- a PDU must arrive whole within ``[limits] pdu_timeout_s`` of its first byte, and the
  A-ASSOCIATE-RQ within ``[limits] acse_timeout_s`` of the connection (a peer sending a byte
  every few seconds cannot hold a slot); otherwise the connection is aborted;
- the data set of each message is counted as its fragments arrive: past ``[limits] max_object_mb``,
  or when the data sets being received on all associations together would pass
  ``[limits] receive_memory_mb``, the rest of its fragments are dropped (emptied) and the C-STORE is
  answered with 0xA700 once its last fragment came (:meth:`GuardedSocket.take_receipt`).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
import weakref
import zlib
from dataclasses import dataclass

from pynetdicom.dsutils import decode
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler

from .dimse import store_responder
from .reactor import waking
from .tls import handshake

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: A-ASSOCIATE, A-RELEASE and A-ABORT PDUs are small; none may be longer than this.
MAX_CONTROL_PDU = MiB
_P_DATA_TF = 0x04
#: Receipts of data sets not yet taken by the C-STORE handler, per association.
MAX_UNCLAIMED_RECEIPTS = 4
# A-ABORT PDU: source 2 (service provider), reason 6 (invalid PDU parameter value)
_ABORT_PDU = bytes([0x07, 0x00, 0, 0, 0, 4, 0, 0, 0x02, 0x06])


class ReceiveBudget:
    """Bytes of data sets being received (not yet answered), over all associations."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self.used = max(0, self.used - n)


@dataclass
class Receipt:
    """What the guard saw of one message's data set: its size and, if it was dropped, why."""

    message_id: int | None
    size: int = 0
    reserved: int = 0
    refused: str | None = None


@dataclass(frozen=True)
class Limits:
    max_pdu: int  # longest P-DATA-TF PDU accepted (its length field)
    max_object: int  # largest data set accepted, bytes
    acse_timeout_s: float
    pdu_timeout_s: float


class GuardedSocket(AssociationSocket):
    """An acceptor's socket that reads each PDU whole, within its limits, before pynetdicom does.

    pynetdicom's DUL reads a PDU as ``recv(6)`` (type and length) then ``recv(length)``; here the
    first call reads the whole PDU, checks and possibly rewrites it, and the second returns the body.
    Set up by :meth:`attach` on a socket pynetdicom made (the class is swapped in place).
    """

    guard_limits: Limits
    guard_budget: ReceiveBudget
    _body: bytearray | None
    _opened: float
    _associated: bool
    _command: bytearray
    _message_id: int | None
    _current: Receipt | None
    _receipts: dict[int | None, Receipt]
    _receipts_lock: threading.RLock

    @classmethod
    def attach(cls, sock: AssociationSocket, limits: Limits, budget: ReceiveBudget) -> GuardedSocket:
        sock.__class__ = cls
        guarded = sock  # type: ignore[assignment]
        assert isinstance(guarded, GuardedSocket)
        guarded.guard_limits = limits
        guarded.guard_budget = budget
        guarded._body = None
        guarded._opened = time.monotonic()
        guarded._associated = False
        guarded._command = bytearray()
        guarded._message_id = None
        guarded._current = None
        guarded._receipts = {}
        guarded._receipts_lock = threading.RLock()  # release() inside _on_data's hold
        return guarded

    # -- what the C-STORE handler asks ----------------------------------------------------------

    def take_receipt(self, message_id: int) -> Receipt | None:
        """The receipt of the data set of message ``message_id`` (None if the guard saw none)."""
        with self._receipts_lock:
            return self._receipts.pop(message_id, None)

    def release(self, receipt: Receipt) -> None:
        """The message was answered (or its connection ended): its data set no longer counts against the budget.
        Once: the handler answering it and the connection's end may both release it."""
        with self._receipts_lock:
            reserved, receipt.reserved = receipt.reserved, 0
        self.guard_budget.release(reserved)

    # -- reading ------------------------------------------------------------------------------

    @property
    def _peer(self) -> str:
        try:
            return "{}:{}".format(*self.socket.getpeername()[:2]) if self.socket else "?"
        except OSError:
            return "?"

    def recv(self, nr_bytes: int) -> bytearray:
        if self._body is not None:
            body, self._body = self._body, None
            return body
        started = time.monotonic()
        deadline = started + self.guard_limits.pdu_timeout_s
        if not self._associated:
            deadline = min(deadline, self._opened + self.guard_limits.acse_timeout_s)
        header = self._read_exact(6, deadline)
        if len(header) < 6:
            return self._cut(header, "timed out" if self._timed_out(deadline) else None, "header")
        pdu_type, _, length = struct.unpack(">BBL", header)
        limit = self.guard_limits.max_pdu if pdu_type == _P_DATA_TF else MAX_CONTROL_PDU
        if length > limit:
            log.warning("connection from %s aborted: PDU of type 0x%02X declares %d bytes, more than the %d "
                        "the node accepts", self._peer, pdu_type, length, limit)
            self._abort()
            return bytearray()
        body = self._read_exact(length, deadline)
        if len(body) < length:
            return self._cut(body, "timed out" if self._timed_out(deadline) else None,
                             f"PDU of {length} bytes ({len(body)} received)")
        if pdu_type == 0x01:
            self._associated = True
        if pdu_type == _P_DATA_TF:
            body = self._screen_p_data(body)
            header = bytearray(struct.pack(">BBL", pdu_type, 0, len(body)))
        self._body = body
        return header

    def _timed_out(self, deadline: float) -> bool:
        return time.monotonic() >= deadline

    def _cut(self, got: bytearray, why: str | None, what: str) -> bytearray:
        """A PDU did not arrive whole: closed by the peer (why None) or too slow."""
        if why is not None:
            phase = "the association request" if not self._associated else what
            log.warning("connection from %s aborted: %s did not arrive within %.0f s", self._peer, phase,
                        self.guard_limits.acse_timeout_s if not self._associated
                        else self.guard_limits.pdu_timeout_s)
            self._abort()
        return bytearray()  # pynetdicom: "connection closed" (Evt17)

    def _abort(self) -> None:
        sock = self.socket
        if sock is None:
            return
        try:
            sock.settimeout(1.0)
            sock.sendall(_ABORT_PDU)
        except OSError:
            pass
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _read_exact(self, n: int, deadline: float) -> bytearray:
        """Up to ``n`` bytes; fewer if the peer closes the connection or ``deadline`` passes."""
        sock = self.socket
        out = bytearray()
        if sock is None:
            return out
        while len(out) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                sock.settimeout(remaining)
                chunk = sock.recv(min(n - len(out), 65536))
            except TimeoutError:
                break
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        try:  # pynetdicom's sends on this socket: bounded, never left at a nearly spent deadline
            sock.settimeout(self.guard_limits.pdu_timeout_s)
        except OSError:
            pass
        return out

    # -- P-DATA: count data set fragments, drop what is over the limits -------------------------

    def _screen_p_data(self, body: bytearray) -> bytearray:
        out = bytearray()
        changed = False
        offset = 0
        while offset + 6 <= len(body):
            (item_length,) = struct.unpack_from(">L", body, offset)
            end = offset + 4 + item_length
            if item_length < 2 or end > len(body):
                return body  # malformed: pynetdicom rejects it
            context_id, control = body[offset + 4], body[offset + 5]
            if control & 0x01:  # command fragment
                self._on_command(bytes(body[offset + 6:end]), last=bool(control & 0x02))
                out += body[offset:end]
            else:
                kept = self._on_data(item_length - 2, last=bool(control & 0x02))
                if kept:
                    out += body[offset:end]
                else:
                    changed = True
                    out += struct.pack(">LBB", 2, context_id, control)
            offset = end
        return out if changed else body

    def _on_command(self, value: bytes, *, last: bool) -> None:
        if len(self._command) + len(value) <= MAX_CONTROL_PDU:
            self._command += value
        if not last:
            return
        self._message_id = None
        try:
            from io import BytesIO

            command = decode(BytesIO(bytes(self._command)), True, True)
            self._message_id = int(command.MessageID)
        except Exception:  # noqa: BLE001 - pynetdicom answers a command it cannot decode
            pass
        self._command = bytearray()
        self._current = Receipt(self._message_id)

    def _on_data(self, n: int, *, last: bool) -> bool:
        """Count ``n`` bytes of the current data set; False: drop them (the object is refused)."""
        receipt = self._current
        if receipt is None:
            receipt = self._current = Receipt(self._message_id)
        receipt.size += n
        kept = receipt.refused is None
        if kept:
            if receipt.size > self.guard_limits.max_object:
                receipt.refused = (f"data set larger than the {self.guard_limits.max_object // MiB} MB the node "
                                   "accepts")
            elif not self.guard_budget.reserve(n):
                receipt.refused = (f"out of memory for receiving: the data sets being received reach the "
                                   f"node's {self.guard_budget.limit // MiB} MB")
            else:
                receipt.reserved += n
            kept = receipt.refused is None
            if not kept:
                log.warning("connection from %s: message %s refused while it arrives (%d bytes so far): %s",
                            self._peer, receipt.message_id, receipt.size, receipt.refused)
        if last:
            with self._receipts_lock:
                old = self._receipts.pop(receipt.message_id, None)
                if old is not None:
                    self.release(old)
                self._receipts[receipt.message_id] = receipt
                # a message no C-STORE handler takes (not a C-STORE) must not hold the budget
                while len(self._receipts) > MAX_UNCLAIMED_RECEIPTS:
                    self.release(self._receipts.pop(next(iter(self._receipts))))
            self._current = None
        return kept

    def _release_all(self) -> None:
        """Give back what the data sets not yet taken by a handler reserved (one cut off mid-way included)."""
        with self._receipts_lock:
            receipts = list(self._receipts.values())
            self._receipts.clear()
            if self._current is not None:
                receipts.append(self._current)
                self._current = None
            for receipt in receipts:
                self.release(receipt)

    def _shutdown_socket(self) -> None:
        # pynetdicom ends a connection the peer closed or reset, or that the guard cut (AA-4, AA-5), here and not
        # in close(): without this, what a data set cut off mid-way reserved would never come back, and enough of
        # them would refuse every object until a restart
        self._release_all()
        super()._shutdown_socket()

    def close(self) -> None:
        self._release_all()
        super().close()


class CopiedContexts(list):  # type: ignore[type-arg]
    """The server's supported presentation contexts, copied for each association in a fraction of a millisecond.

    pynetdicom gives every accepted association ``deepcopy(server.contexts)``: with the node's 171 contexts (every
    storage SOP class, 13 transfer syntaxes each) that took 21 ms of CPU, with the interpreter lock held, per
    association (a sender that opens one association per image pays it per image); this copy takes 0.05 ms. It
    is the same: a context's attributes are a list of transfer syntaxes (copied) and immutable values (UIDs,
    ints, bools; ``tests/test_limits.py`` checks that no other kind appears)."""

    def __deepcopy__(self, memo: dict[int, object]) -> list[PresentationContext]:
        copies = []
        for context in self:
            twin = object.__new__(type(context))  # (copy.copy takes five times as long: __reduce_ex__)
            twin.__dict__.update(context.__dict__)
            twin._transfer_syntax = list(context._transfer_syntax)
            copies.append(twin)
        return copies


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler, with the accepted socket guarded and a cap on connections."""

    def handle(self) -> None:
        server = self.server
        max_connections: int = getattr(server, "dn_max_connections", 0)
        if max_connections:
            open_now = sum(1 for a in self.ae.active_associations if a.is_acceptor)
            if open_now >= max_connections:
                log.warning("connection from %s closed at once: %d connections are open, the most the node "
                            "serves", self.client_address[0], open_now)
                try:
                    self.request.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
        failed = handshake(self.request, getattr(server, "dn_handshake_timeout_s", 10.0))
        if failed is not None:
            log.warning("connection from %s closed: TLS handshake failed: %s", self.client_address[0], failed)
            return
        super().handle()

    def _create_association(self):  # type: ignore[no-untyped-def]
        if type(self.server.contexts) is not CopiedContexts:  # (two first connections may both wrap: the same)
            self.server.contexts = CopiedContexts(self.server.contexts)
        assoc = super()._create_association()
        GuardedSocket.attach(assoc.dul.socket, self.server.dn_limits, self.server.dn_budget)  # type: ignore[attr-defined]
        waking(assoc)
        store_responder(assoc)
        return assoc


def inflated_size_exceeds(deflated: bytes | memoryview, limit: int, chunk: int = MiB) -> int | None:
    """Inflate a Deflate data set in bounded steps; the number of bytes it reached if that is more
    than ``limit`` (stopping there), else None. Memory: at most ``chunk`` of output at a time.

    The stream ends at its last block (``eof``), not where the bytes end: a data set padded to an even
    length (PS3.5 A.5) leaves a byte after it, which must not keep the loop going.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    data = memoryview(deflated)
    while not inflater.eof:
        try:
            out = inflater.decompress(data, chunk)
        except zlib.error:
            return None  # not a Deflate stream: the parser refuses it
        total += len(out)
        if total > limit:
            return total
        tail = inflater.unconsumed_tail
        if not out and len(tail) >= len(data):
            return None  # no progress: a truncated stream, which the parser refuses
        data = memoryview(tail)
    return None


def admitted_count(admitted: weakref.WeakSet) -> int:  # type: ignore[type-arg]
    return sum(1 for a in list(admitted) if a.is_alive())
