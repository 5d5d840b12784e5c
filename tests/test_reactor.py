"""Tests for dicom_node.reactor: pynetdicom's reactors waiting for work instead of polling for it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from dicom_node.reactor import WakingDUL, one_reader, waking, waking_dul
from tests.e2e.peers import free_port


@pytest.fixture
def echo_port() -> Iterator[int]:
    ae = AE(ae_title="ECHO_SCP")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0x0000)])
    yield port
    server.shutdown()


def _pending_wakes(dul: WakingDUL) -> int:
    try:
        return len(dul._wake_r.recv(1 << 20, socket.MSG_PEEK))
    except BlockingIOError:
        return 0


def test_a_running_requestors_reactor_drains_its_wake_ups_and_keeps_serving(echo_port: int) -> None:
    """The dispatcher makes a requestor's DUL (its thread already running) wait on a wake-up socket. Every
    primitive it is handed writes a byte there; the reactor empties it when it wakes, or it would be woken at once
    on every turn (a busy loop) and, once the buffer is full, the wake-ups would be lost."""
    ae = AE(ae_title="NODE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", echo_port, ae_title="ECHO_SCP")
    assert assoc.is_established
    try:
        dul = waking_dul(assoc.dul)
        assert isinstance(dul, WakingDUL)
        for _ in range(5000):  # far more than a reactor turn takes: most are written while it sleeps
            dul._wake()
        deadline = time.monotonic() + 5
        while _pending_wakes(dul) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _pending_wakes(dul) == 0
        for _ in range(3):  # the reactor still sends what it is handed, and hands back the answers
            assert assoc.send_c_echo().Status == 0x0000
        assert _pending_wakes(dul) == 0
    finally:
        assoc.release()
    assert assoc.is_released


def test_an_acceptors_wake_up_pair_is_closed_when_its_reactor_ends() -> None:
    """Not left to the garbage collector: the writers pause it while associations come and go."""
    assoc = waking(Association(AE(ae_title="NODE"), "acceptor"))
    dul = assoc.dul
    assert isinstance(dul, WakingDUL)
    dul.start()
    dul.kill_dul()
    dul.join(timeout=5)
    assert not dul.is_alive()
    assert dul._wake_r.fileno() == -1 and dul._wake_w.fileno() == -1


class _LateCheckpoint(threading.Event):
    """A reactor's checkpoint that, once passed, holds its thread until a message is queued: the reactor thread
    descheduled between passing its checkpoint and taking a message off the DIMSE queue, and run again just as a
    response arrives (what the interpreter's thread switches do at random under load)."""

    def __init__(self, queue: Any) -> None:
        super().__init__()
        self.queue = queue

    def wait(self, timeout: float | None = None) -> bool:
        passed = super().wait(timeout)
        deadline = time.monotonic() + 0.5
        while passed and self.queue.empty() and time.monotonic() < deadline:
            pass  # (no sleep: the thread keeps running, as one that got its turn)
        return passed


def test_a_requestors_reactor_never_takes_the_response_its_sender_waits_for(echo_port: int) -> None:
    """pynetdicom's requestor reactor passes its checkpoint, then takes a message off the queue. A request sent in
    between (the checkpoint cleared, the reactor counted as paused) had its response taken by the reactor ("Received
    unexpected C-ECHO service message") and the sender waited the whole DIMSE timeout for it (pynetdicom#875; seen
    in the node's deliveries: 30 s). :func:`one_reader` lets only the waiting sender take a response."""
    ae = AE(ae_title="NODE")
    ae.add_requested_context(Verification)
    ae.dimse_timeout = 2
    assoc = ae.associate("127.0.0.1", echo_port, ae_title="ECHO_SCP")
    assert assoc.is_established
    try:
        checkpoint = _LateCheckpoint(assoc.dimse.msg_queue)
        checkpoint.set()
        assoc._reactor_checkpoint = checkpoint
        waking_dul(assoc.dul)
        one_reader(assoc)
        statuses = [assoc.send_c_echo().get("Status") for _ in range(6)]
    finally:
        assoc.release()
    assert statuses == [0x0000] * 6
