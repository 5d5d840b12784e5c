"""Tests for dicom_node.systemd: the notify protocol over a real unix datagram socket, as systemd listens on it,
for a node process (READY, WATCHDOG, STOPPING) and a node in this process whose checks fail (no WATCHDOG)."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.config import HTTPSettings, NodeConfig, NodeSettings
from dicom_node.service import Node
from dicom_node.systemd import notify, watchdog_interval_s
from tests.e2e.node_proc import NodeProcess
from tests.e2e.peers import free_port, require_tools


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """What systemd listens on: a unix datagram socket (and its path for $NOTIFY_SOCKET)."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    yield sock, path
    sock.close()


def _messages(sock: socket.socket, until: float, stop_at: str | None = None) -> list[str]:
    got: list[str] = []
    while time.monotonic() < until:
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if stop_at is not None and stop_at in got[-1]:
            break
    return got


def test_notify_sends_one_datagram(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    assert notify("READY=1\nSTATUS=up", {"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    assert not notify("READY=1", {})  # not run by systemd: nothing to do


def test_notify_to_the_abstract_namespace() -> None:
    name = f"dicom-node-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"WATCHDOG=1"


def test_an_unreachable_socket_is_a_warning_not_an_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert "cannot notify systemd (READY=1)" in caplog.text


def test_watchdog_interval() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # meant for another
    assert watchdog_interval_s({}) is None and watchdog_interval_s({"WATCHDOG_USEC": "x"}) is None


def test_a_node_process_says_ready_feeds_the_watchdog_and_says_stopping(
        tmp_path: Path, notify_socket: tuple[socket.socket, str]) -> None:
    require_tools()  # the node's readiness probe is dcmtk's echoscu
    sock, path = notify_socket
    node = NodeProcess(tmp_path / "node", models_dir=tmp_path / "no-models", rules=[], node={"fsync": False},
                       env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "600000"})  # a ping every 0.3 s
    node.start()
    try:
        first = _messages(sock, time.monotonic() + 10, stop_at="READY=1")
        assert first and first[-1].startswith("READY=1\nSTATUS=listening as DICOM_NODE on port "), first
        pings = _messages(sock, time.monotonic() + 1.5)
        assert pings.count("WATCHDOG=1") >= 3, pings
    finally:
        node.stop()
    assert "STOPPING=1" in _messages(sock, time.monotonic() + 5, stop_at="STOPPING=1")
    assert "systemd notified: ready, watchdog every 0.3 s" in node.log()


def test_no_watchdog_ping_while_a_check_fails(tmp_path: Path, notify_socket: tuple[socket.socket, str],
                                             monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    config = NodeConfig(node=NodeSettings(data_dir=tmp_path / "data", fsync=False, host="127.0.0.1", port=free_port()),
                        http=HTTPSettings(port=0), rules=[], inference={"models_dir": tmp_path})
    node = Node(config)
    node.start()
    try:
        assert _messages(sock, time.monotonic() + 5, stop_at="READY=1")[-1].startswith("READY=1")
        deadline = time.monotonic() + 10
        while not node.health().live and time.monotonic() < deadline:
            time.sleep(0.05)
        node.feed_watchdog()
        assert _messages(sock, time.monotonic() + 1, stop_at="WATCHDOG=1") == ["WATCHDOG=1"]
        # a low disk is the node's to handle (it refuses data): the watchdog is still fed
        monkeypatch.setattr(node, "disk_watermark_bytes", lambda: 2**62)
        node.feed_watchdog()
        assert _messages(sock, time.monotonic() + 1, stop_at="WATCHDOG=1") == ["WATCHDOG=1"]
        node.scp.stop()  # the listener is gone: systemd should restart the node
        caplog.set_level(logging.WARNING)
        node.feed_watchdog()
        assert _messages(sock, time.monotonic() + 1) == []
        assert "not feeding the systemd watchdog: scp_listening: not listening on" in caplog.text
    finally:
        node.stop()


def test_the_unit_gives_up_on_a_node_that_cannot_start(tmp_path: Path) -> None:
    """Restart=on-failure with RestartSec=5 never trips systemd's default start limit (5 in 10 s): a node whose
    configuration is invalid was restarted for ever. The unit gives up after 5 failed starts in 5 minutes (the
    ExecStartPre check included), and serve's exit code for an invalid configuration is not restarted."""
    import configparser

    from dicom_node.cli import main

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(Path(__file__).parents[1] / "deploy" / "dicom-node.service")
    bad = tmp_path / "node.toml"
    bad.write_text("[node]\nport = -1\n")
    assert unit["Service"]["RestartPreventExitStatus"] == str(main(["config", "check", "--config", str(bad)])) == "2"
    assert int(unit["Unit"]["StartLimitBurst"]) * int(unit["Service"]["RestartSec"]) < int(
        unit["Unit"]["StartLimitIntervalSec"])
