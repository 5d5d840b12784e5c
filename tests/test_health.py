"""Tests for dicom_node.health: each check's verdict, and the health of a real node in this process."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.config import HTTPSettings, NodeConfig, NodeSettings
from dicom_node.health import LIVENESS, Check, Health, check_disk, check_dispatcher, check_journal, disk_free_bytes
from dicom_node.journal import Journal
from dicom_node.service import Node
from tests.e2e.peers import free_port

MB = 2**20


def test_disk_free_bytes_is_the_file_systems() -> None:
    assert abs(disk_free_bytes(Path("/")) - shutil.disk_usage("/").free) < 64 * MB


def test_check_disk_against_the_watermark(tmp_path: Path) -> None:
    assert check_disk(tmp_path, 100 * MB, lambda p: 300 * MB) == Check(True, f"300 MB free in {tmp_path} "
                                                                              "(watermark 100 MB)")
    low = check_disk(tmp_path, 100 * MB, lambda p: 99 * MB)
    assert not low.ok and low.detail == f"99 MB free in {tmp_path}, below the watermark of 100 MB"

    def unreadable(path: Path) -> int:
        raise FileNotFoundError(2, "No such file or directory")

    gone = check_disk(tmp_path / "gone", 1, unreadable)
    assert not gone.ok and "cannot read the free space" in gone.detail and "No such file" in gone.detail


def test_check_journal_writes(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3", fsync=False)
    assert check_journal(journal.probe_write).ok
    journal.close()
    closed = check_journal(journal.probe_write)
    assert not closed.ok and closed.detail.startswith("journal write failed: ProgrammingError")


def test_check_dispatcher() -> None:
    now = 10_000.0
    assert check_dispatcher(scheduler_running=True, last_scan_started=now - 3, scanning=False, interval_s=2,
                            now=now).ok
    assert check_dispatcher(scheduler_running=True, last_scan_started=now - 3600, scanning=True, interval_s=2,
                            now=now).ok  # a long delivery is progress
    stale = check_dispatcher(scheduler_running=True, last_scan_started=now - 31, scanning=False, interval_s=2,
                             now=now)
    assert not stale.ok and "last scanned 31 s ago" in stale.detail
    # the window grows with a long scan interval
    assert check_dispatcher(scheduler_running=True, last_scan_started=now - 200, scanning=False, interval_s=60,
                            now=now).ok
    assert not check_dispatcher(scheduler_running=True, last_scan_started=None, scanning=False, interval_s=2).ok
    stopped = check_dispatcher(scheduler_running=False, last_scan_started=now, scanning=True, interval_s=2, now=now)
    assert stopped == Check(False, "the scheduler is not running")


def test_health_verdicts() -> None:
    good = {name: Check(True, "fine") for name in (*LIVENESS, "disk_space")}
    assert Health(good, 1.0).ok and Health(good, 1.0).live
    low_disk = Health({**good, "disk_space": Check(False, "1 MB free")}, 1.0)
    assert not low_disk.ok and low_disk.live  # a restart would not free space: the watchdog is still fed
    assert low_disk.failed() == ["disk_space: 1 MB free"]
    stuck = Health({**good, "dispatcher_alive": Check(False, "stuck")}, 1.0)
    assert not stuck.ok and not stuck.live
    assert stuck.to_json()["status"] == "failing"
    assert stuck.to_json()["checks"]["dispatcher_alive"] == {"ok": False, "detail": "stuck"}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    config = NodeConfig(node=NodeSettings(data_dir=tmp_path / "data", fsync=False, host="127.0.0.1", port=free_port()),
                        http=HTTPSettings(port=0), rules=[], inference={"models_dir": tmp_path})
    node = Node(config)
    node.start()
    yield node
    node.stop()


def _wait_healthy(node: Node) -> Health:
    import time

    deadline = time.monotonic() + 10
    while not (health := node.health()).ok and time.monotonic() < deadline:
        time.sleep(0.05)
    return health


def test_a_running_node_is_healthy_until_its_listener_stops(node: Node) -> None:
    health = _wait_healthy(node)
    assert health.ok, health.failed()
    assert set(health.checks) == {"scp_listening", "journal_writable", "disk_space", "dispatcher_alive",
                                  "runs_progressing"}
    assert f"127.0.0.1:{node.scp.port}" in health.checks["scp_listening"].detail
    node.scp.stop()
    health = node.health()
    assert not health.ok and not health.live
    assert health.failed() == [f"scp_listening: not listening on 127.0.0.1:{node.scp.port}"]


def test_a_node_below_its_disk_watermark_is_unhealthy_but_live(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    _wait_healthy(node)
    monkeypatch.setattr(node, "disk_watermark_bytes", lambda: 2**62)
    health = node.health()
    assert not health.ok and health.live
    assert health.failed()[0].startswith("disk_space: ") and "below the watermark" in health.failed()[0]
    assert node.disk_watermark_bytes() == 2**62
    monkeypatch.undo()
    limits = node.config.limits
    assert node.disk_watermark_bytes() == max(limits.min_free_mb, limits.max_object_mb) * MB


def test_a_disk_guard_refusing_makes_the_node_unhealthy_and_tells_the_webhooks(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refusing C-STOREs below ``[limits] min_free_mb`` fails ``disk_space`` until ``resume_free_mb`` are free (the
    guard's hysteresis, not the probe's), and posts ``disk_low`` once."""
    from dicom_node import disk, notify

    _wait_healthy(node)
    posted: list[tuple[str, dict]] = []
    monkeypatch.setattr(notify, "_current", type("Spy", (), {"notify": lambda self, e, p: posted.append((e, p))})())
    guard = node.disk
    free = {"bytes": guard.min_free - 1}
    monkeypatch.setattr(disk, "free_bytes", lambda path: free["bytes"])
    monkeypatch.setattr(guard, "cache_s", 0.0)
    assert guard.refusal() is not None
    check = node.health().checks["disk_space"]
    assert not check.ok and check.detail.startswith("refusing C-STOREs until ")
    free["bytes"] = guard.min_free + 1  # above the low watermark, below the high one: still refusing
    assert not node.health().checks["disk_space"].ok
    free["bytes"] = guard.resume_free + 1
    guard.state()
    assert node.health().checks["disk_space"].ok  # accepting again (the real disk has room)
    assert [e for e, _ in posted] == ["disk_low"] and posted[0][1]["min_free_mb"] == guard.min_free // 2**20


def test_a_stopped_scheduler_is_a_dead_dispatcher(node: Node) -> None:
    _wait_healthy(node)
    node.scheduler.shutdown(wait=True)
    check = node.health().checks["dispatcher_alive"]
    assert check == Check(False, "the scheduler is not running")


def test_a_run_hung_in_one_stage_fails_liveness(node: Node) -> None:
    """A run stuck in native code kept its claim for ever (its lease renewed on a timer) and, with one worker
    thread, stopped all processing while the watchdog was still fed."""
    import time

    assert _wait_healthy(node).ok
    node.runner.stages[7] = ("model", time.time() - node.config.jobs.max_stage_s - 5)
    try:
        health = node.health()
        assert not health.ok and not health.live  # the watchdog is no longer fed: systemd restarts the node
        assert "job 7 has been in its 'model' stage" in health.checks["runs_progressing"].detail
        node.runner.stages[7] = ("model", time.time())  # a long run that progresses is not hung
        assert node.health().checks["runs_progressing"].ok
        # nor one waiting for its turn (a later attempt runs alone: RunIsolation), however long
        node.runner.stages[7] = ("waiting", time.time() - node.config.jobs.max_stage_s - 5)
        assert node.health().checks["runs_progressing"].ok
        # a follow-up (the agreement check's registration) holds a worker thread the same way (found in review:
        # follow-ups were not watched)
        node.runner.follow_up_stages[7] = ("agreement", time.time() - node.config.jobs.max_stage_s - 5)
        health = node.health()
        assert not health.ok and not health.live
        assert "follow-up 7 (agreement) has been running for" in health.checks["runs_progressing"].detail
    finally:
        node.runner.stages.pop(7, None)
        node.runner.follow_up_stages.pop(7, None)
