"""dicom_node.lock: one node per data directory, receivers sharing it, and what ``status`` reads."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dicom_node.lock import NodeLock, NodeRunning, ProcessLock, probe, processes


def test_a_second_node_is_refused_and_the_holder_is_probed(tmp_path: Path) -> None:
    first = NodeLock(tmp_path)
    first.acquire(started=1.0, ports={"dicom": 11112})
    try:
        with pytest.raises(NodeRunning, match="another node"):
            NodeLock(tmp_path).acquire()
        holder = probe(tmp_path)
        assert holder.running and holder.pid == os.getpid() and holder.ports == {"dicom": 11112}
    finally:
        first.release()
    assert not probe(tmp_path).running
    NodeLock(tmp_path).acquire()  # free again


def test_receivers_share_the_directory_and_exclude_a_node_of_role_all(tmp_path: Path) -> None:
    receivers = [NodeLock(tmp_path), NodeLock(tmp_path)]
    own = ProcessLock(tmp_path, "receiver")
    for lock in receivers:
        lock.acquire(shared=True, role="receiver")
    own.acquire(role="receiver", started=2.0, ports={"dicom": 104})
    try:
        with pytest.raises(NodeRunning):
            NodeLock(tmp_path).acquire(role="all")  # exclusive: refused while receivers share it
        holder = probe(tmp_path)  # found although shared holders record nothing in node.lock
        assert holder.running and holder.pid == os.getpid() and holder.ports == {"dicom": 104}
        assert [p["role"] for p in processes(tmp_path)] == ["receiver"]
        receivers[0].release()
        assert probe(tmp_path).running  # the other receiver still holds it
    finally:
        receivers[1].release()
        own.release()
    assert not probe(tmp_path).running and processes(tmp_path) == []


def test_an_all_node_excludes_a_receiver_that_would_share(tmp_path: Path) -> None:
    node = NodeLock(tmp_path)
    node.acquire(role="all")
    try:
        with pytest.raises(NodeRunning):
            NodeLock(tmp_path).acquire(shared=True)
    finally:
        node.release()


def test_process_locks_of_other_hosts_with_the_same_pid_do_not_collide(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Containers sharing a data volume each run their node as pid 1: the host name keeps their locks apart."""
    monkeypatch.setattr("dicom_node.lock.os.getpid", lambda: 1)
    locks = []
    for host in ("receiver-a", "receiver-b"):
        monkeypatch.setattr("dicom_node.lock.socket.gethostname", lambda host=host: host)
        lock = ProcessLock(tmp_path, "receiver")
        lock.acquire(role="receiver", started=float(len(locks)))
        locks.append(lock)
    try:
        assert [(p["host"], p["pid"]) for p in processes(tmp_path)] == [("receiver-a", 1), ("receiver-b", 1)]
    finally:
        for lock in locks:
            lock.release()


def test_a_killed_all_node_s_details_are_not_reported_for_live_receivers(tmp_path: Path) -> None:
    """An all node killed by SIGKILL leaves its pid and ports in node.lock (only a clean stop empties it);
    receivers that started since hold the lock shared: status names a live receiver, not the dead node."""
    (tmp_path / "node.lock").write_text('{"pid": 99999, "host": "gone", "ports": {"dicom": 104}}')
    receiver, own = NodeLock(tmp_path), ProcessLock(tmp_path, "receiver")
    receiver.acquire(shared=True)
    own.acquire(role="receiver", started=1.0, ports={"dicom": 11112})
    try:
        holder = probe(tmp_path)
        assert holder.running and holder.pid == os.getpid() and holder.ports == {"dicom": 11112}
    finally:
        own.release()
        receiver.release()


def test_a_lock_probed_for_an_instant_is_still_taken(tmp_path: Path) -> None:
    """``status`` (or a /metrics scrape) probes the locks with a momentary exclusive flock: a process starting at
    that instant tries again rather than taking the probe for a running node."""
    import fcntl
    import threading

    probe_file = (tmp_path / "node.lock").open("a+")
    fcntl.flock(probe_file, fcntl.LOCK_EX)
    threading.Timer(0.08, lambda: fcntl.flock(probe_file, fcntl.LOCK_UN)).start()
    lock = NodeLock(tmp_path)
    lock.acquire(shared=True)  # refused at the first try, taken at a later one
    lock.release()
    probe_file.close()


def _stripe_mates() -> tuple[str, str]:
    """Two UIDs of one stripe."""
    import zlib

    from dicom_node.lock import INSTANCE_LOCK_STRIPES

    seen: dict[int, str] = {}
    for n in range(10_000):
        uid = f"1.2.826.0.1.{n}"
        stripe = zlib.crc32(uid.encode()) % INSTANCE_LOCK_STRIPES
        if stripe in seen:
            return seen[stripe], uid
        seen[stripe] = uid
    raise AssertionError("no two UIDs share a stripe")


def test_instance_locks_hold_across_processes_and_threads(tmp_path: Path) -> None:
    """Two InstanceLocks of one data directory stand for two processes (flock holds between open files, in one
    process too). A thread of one process must not slip into a stripe another of its threads holds (flock would
    let it, and the first to leave would release it for both, letting the other process in meanwhile)."""
    import threading

    from dicom_node.lock import InstanceLocks

    one, other = InstanceLocks(tmp_path), InstanceLocks(tmp_path)
    first, mate = _stripe_mates()
    events: list[str] = []
    inside = threading.Event()

    def hold(locks: InstanceLocks, uid: str, name: str, seconds: float) -> None:
        with locks.held(uid):
            events.append(f"{name} in")
            inside.set()
            time.sleep(seconds)
            events.append(f"{name} out")

    a = threading.Thread(target=hold, args=(one, first, "a", 0.3))
    a.start()
    assert inside.wait(5)
    b = threading.Thread(target=hold, args=(one, mate, "b", 0.3))  # this process, same stripe, another UID
    b.start()
    time.sleep(0.1)
    hold(other, mate, "c", 0)  # the other process: only once neither a nor b is inside
    a.join()
    b.join()
    # one inside at a time (b and c may come in either order once a is out)
    assert len(events) == 6 and events[:2] == ["a in", "a out"], events
    assert all(events[i + 1] == events[i].replace(" in", " out") for i in (0, 2, 4)), events
    one.close()
    other.close()
    with one.held(first):  # opened again after a close
        pass
    one.close()


def test_an_instance_lock_closed_while_a_thread_waits_for_it_is_opened_again(tmp_path: Path) -> None:
    """Found in review: a C-STORE still arriving at the stop took a stripe's descriptor just before close() shut it,
    then flocked the closed (or by then reused) descriptor."""
    import zlib

    from dicom_node.lock import INSTANCE_LOCK_STRIPES, InstanceLocks

    uid = "1.2.826.0.1.3680043.8.498.1"
    locks = InstanceLocks(tmp_path)
    stripe = zlib.crc32(uid.encode()) % INSTANCE_LOCK_STRIPES
    stale = locks._stripe(stripe)  # taken by a thread ...
    locks.close()  # ... just before the stop closed it
    handed = iter([stale])
    real = locks._stripe
    locks._stripe = lambda s: next(handed, None) or real(s)  # type: ignore[method-assign]
    with locks.held(uid):
        assert locks._stripes[stripe] is not stale
        os.fstat(locks._stripes[stripe][1])  # a live descriptor
    locks.close()
