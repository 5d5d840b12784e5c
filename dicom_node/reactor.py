"""pynetdicom's acceptor reactors, waiting for work instead of polling for it.

pynetdicom 3 runs two threads per association, and both poll: the DUL reactor (network side) sleeps 1 ms
whenever a loop found nothing to do, and the association reactor (DIMSE side) sleeps 1 ms before every look
at its message queue. Each C-STORE crosses both twice (its request arrives, its response leaves), so a bare
pynetdicom SCP spends about a third of its time per object asleep (bench P1, `pynetdicom-bare`).

:func:`waking` changes an association pynetdicom made for an accepted connection, before its threads start:

- its DUL (:class:`WakingDUL`) waits in ``select`` on the connection and on a wake-up socket that every
  queued primitive (a C-STORE response) writes to;
- its association reactor (:class:`WakingAssociation`) waits on an event that the DIMSE message queue and
  the DUL's queue to the user (A-RELEASE, A-ABORT) set.

Both wait at most :data:`WAIT_S`, so the kill flags, the ARTIM and network timers are checked as before.
What each loop does is pynetdicom's own; only the sleeps are replaced.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import threading
import time
import weakref
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

log = logging.getLogger("pynetdicom.association")  # pynetdicom's own logger for these lines

#: The longest a reactor waits before it checks its kill flag and timers again.
WAIT_S = 0.02


class SignallingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that sets ``signal`` on every put."""

    def __init__(self, signal: threading.Event) -> None:
        super().__init__()
        self.signal = signal

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.signal.set()


class WakingDUL(DULServiceProvider):
    """The DUL reactor: pynetdicom's loop without its 1 ms sleep, waiting in ``poll`` instead (``poll`` has no
    limit on descriptor numbers, unlike ``select``'s 1024)."""

    _wake_r: socket.socket
    _wake_w: socket.socket
    _poller: Any = None  # select.poll of the connection and the wake-up socket
    _polled: Any = None  # the connection it polls

    def run(self) -> None:
        # run, not run_reactor: pynetdicom made the thread's target of its own run_reactor before the class became
        # this one. The wake-up pair goes with the thread, not at garbage collection (which writers pause, while
        # associations come and go: descriptors would add up).
        try:
            super().run()
        finally:
            _close_all(self._wake_r, self._wake_w)

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        """As pynetdicom's: stop the reactor if the connection is closed (Sta1), waiting for its thread."""
        if self.state_machine.current_state != "Sta1":
            return False
        self.kill_dul()
        while self.is_alive():
            time.sleep(0.001)
        return True

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\x00")
        except OSError:  # already woken (the buffer is full) or closed
            pass

    def _is_transport_event(self) -> bool:
        self._wait_for_work()
        return super()._is_transport_event()

    def _wait_for_work(self) -> None:
        """Return when the connection has data, a primitive was queued, or after :data:`WAIT_S`."""
        sock = self.socket.socket if self.socket is not None else None
        if (sock is None or self._kill_thread or not self.to_provider_queue.empty()
                or not self.event_queue.empty()):
            return
        pending = getattr(sock, "pending", None)
        if pending is not None and pending():  # TLS: decrypted bytes already buffered
            return
        try:
            poller = self._poller
            if poller is None or self._polled is not sock:  # one poll object per connection, not per turn
                poller = self._poller = select.poll()
                poller.register(sock, select.POLLIN)
                poller.register(self._wake_r, select.POLLIN)
                self._polled = sock
            ready = poller.poll(WAIT_S * 1000)
            if any(fd == self._wake_r.fileno() for fd, _ in ready):
                while self._wake_r.recv(4096):
                    pass
        except (OSError, ValueError):  # closed meanwhile (the loop finds out), or nothing left to drain
            pass


def _close_all(*sockets: socket.socket) -> None:
    for sock in sockets:
        sock.close()


class WakingAssociation(Association):
    """The acceptor's association reactor: pynetdicom's loop, waiting for a message instead of sleeping."""

    _work: threading.Event

    def _wait_for_work(self) -> None:
        self._work.clear()
        if not self.dimse.msg_queue.empty():
            return
        if not self.dul.to_user_queue.empty():
            time.sleep(0.001)  # something for the checks below (or for no one): pynetdicom's own pace
            return
        self._work.wait(WAIT_S)

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            self._wait_for_work()
            # paused while the acceptor itself sends (pynetdicom's checkpoint)
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self._reactor_ends():
                return

    def _reactor_ends(self) -> bool:
        """pynetdicom's end-of-loop checks: a release or abort from the peer, the DUL gone, the network
        timeout. True when the association ended."""
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            log.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return True
        if self.acse.is_aborted():
            log.info("Association Aborted" + (" (A-P-ABORT)" if self.acse.is_aborted("a-p-abort") else ""))
            self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return True
        if not self.dul.is_alive():
            self.kill()
            return True
        if self.dul.idle_timer_expired():
            log.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return True
        return False


def waking_dul(dul: DULServiceProvider) -> DULServiceProvider:
    """Make a DUL reactor wait for work instead of polling; also one whose thread runs already (a requestor's,
    after ``AE.associate``): its loop takes the new methods on its next turn."""
    pair = socket.socketpair()
    for end in pair:
        end.setblocking(False)
    weakref.finalize(dul, _close_all, *pair)
    dul._wake_r, dul._wake_w = pair  # type: ignore[attr-defined]
    dul._run_loop_delay = 0
    dul.__class__ = WakingDUL
    return dul


def waking(assoc: Association) -> Association:
    """Make an acceptor's association (not yet started) wait for work instead of polling."""
    assoc.__class__ = WakingAssociation
    dul = waking_dul(assoc.dul)
    work = threading.Event()
    cast(WakingAssociation, assoc)._work = work
    assoc.dimse.msg_queue = SignallingQueue(work)
    dul.to_user_queue = SignallingQueue(work)
    return assoc



class OneReaderAssociation(Association):
    """A requestor association whose reactor never takes a message while a request of its own waits for its
    response (:func:`one_reader`)."""

    _turn: threading.Lock

    @property  # type: ignore[override]
    def _is_paused(self) -> bool:
        """Whether the reactor is out of the way of a sender that cleared the checkpoint: pynetdicom's senders clear
        it, then wait for this. Once the checkpoint is clear and the reactor is not inside its look at the queue, it
        takes nothing more until the checkpoint is set again (:func:`one_reader`)."""
        if self._reactor_checkpoint.is_set():
            return bool(self.__dict__.get("_paused_flag", False))
        with self._turn:
            return True

    @_is_paused.setter
    def _is_paused(self, value: bool) -> None:  # pynetdicom's reactor loop and __init__ set it
        self.__dict__["_paused_flag"] = value


def one_reader(assoc: Association) -> Association:
    """Close pynetdicom's race between a requestor's reactor and its senders (pynetdicom#875, the node's deliveries).

    pynetdicom's reactor passes its checkpoint, then takes a message off the DIMSE queue; a sender clears the
    checkpoint, waits until the reactor counts as paused, sends its request and waits on the same queue for the
    response. A reactor thread that passed the checkpoint just before it was cleared and ran again just as the
    response arrived took it ("Received unexpected C-STORE service message"), and the sender waited the whole DIMSE
    timeout for a response already received: the object failed its try. Here the reactor takes a message only while
    the checkpoint is set, checked in the same turn (a lock) as the take, and a sender counts it as paused only
    outside that turn. Also for an association whose reactor runs already (``AE.associate`` started it): its loop
    looks up the queue's method and the pause flag on every turn. "Paused" thus means "not taking a message", not
    "parked at the checkpoint": a sender may overlap the rest of the reactor's turn (its release and abort checks),
    which the node's requestor associations (C-STORE and C-ECHO only, no requests served) do not mind."""
    turn = threading.Lock()
    checkpoint = assoc._reactor_checkpoint
    take = assoc.dimse.get_msg

    def get_msg(block: bool = False) -> tuple[int | None, Any]:
        if block:  # a sender waiting for its response (pynetdicom's send_* methods)
            return take(block=True)
        with turn:  # the reactor's look
            if not checkpoint.is_set():
                return None, None
            return take(block=False)

    paused = assoc._is_paused
    assoc._turn = turn  # type: ignore[attr-defined]
    assoc.__class__ = OneReaderAssociation
    assoc.__dict__.pop("_is_paused", None)
    assoc.__dict__["_paused_flag"] = paused
    assoc.dimse.get_msg = get_msg  # type: ignore[method-assign]
    return assoc
