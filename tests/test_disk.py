"""Tests for dicom_node.disk: the low and high watermarks, the cached probe, the state for /health."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import dicom_node.disk as disk
from dicom_node.disk import MB, DiskGuard, DiskState


class FakeDisk:
    """The free-space probe, under the test's control; counts its calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, free_mb: float) -> None:
        self.free = int(free_mb * MB)
        self.calls = 0
        monkeypatch.setattr(disk, "free_bytes", self)

    def __call__(self, path: Path) -> int:
        self.calls += 1
        if self.free < 0:
            raise OSError(5, "Input/output error")
        return self.free


def test_refuses_below_the_low_watermark_and_accepts_again_above_the_high_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node.disk")
    fake = FakeDisk(monkeypatch, 5000)
    guard = DiskGuard(tmp_path, min_free_mb=1000, resume_free_mb=2000, cache_s=0)
    changes: list[DiskState] = []
    guard.listeners.append(changes.append)
    assert guard.refusal() is None
    fake.free = 999 * MB
    reasons = [guard.refusal() for _ in range(5)]
    assert reasons == ["out of disk space: 999 MB free, the node needs 1000 MB"] * 5
    fake.free = 1500 * MB  # above the low watermark, below the high one: still refusing (hysteresis)
    assert guard.refusal() is not None
    state = guard.state()
    assert state.refusing and state.free_bytes == 1500 * MB and state.refused == 6
    assert (state.min_free_bytes, state.resume_free_bytes, state.path) == (1000 * MB, 2000 * MB, str(tmp_path))
    fake.free = 2000 * MB
    assert guard.refusal() is None and not guard.state().refusing and guard.state().refused == 0
    # one line per change, not per object
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("disk low: 999 MB free") and "0xA700" in lines[0]
    assert caplog.records[0].levelname == "WARNING"
    assert lines[1].startswith("disk space recovered: 2000 MB free") and "(6 refused meanwhile)" in lines[1]
    assert [c.refusing for c in changes] == [True, False]


def test_the_probe_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeDisk(monkeypatch, 500)
    guard = DiskGuard(tmp_path, min_free_mb=1000, resume_free_mb=1000, cache_s=60)
    for _ in range(1000):  # a study's C-STOREs
        assert guard.refusal() is not None
    assert fake.calls == 1
    fake.free = 5000 * MB
    assert guard.refusal() is not None  # not probed again within cache_s
    guard.cache_s = 0
    assert guard.refusal() is None and fake.calls == 2


def test_off_when_min_free_is_zero_and_a_failing_probe_keeps_the_decision(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeDisk(monkeypatch, 0)
    off = DiskGuard(tmp_path, min_free_mb=0, resume_free_mb=0, cache_s=0)
    assert off.refusal() is None and fake.calls == 0 and off.state().free_bytes == 0
    guard = DiskGuard(tmp_path, min_free_mb=10, resume_free_mb=20, cache_s=0)
    assert guard.refusal() is not None
    fake.free = -1  # the probe fails: still refusing (the decision stays), and the state says it cannot tell
    assert guard.refusal() is not None and guard.state().free_bytes == -1


def test_the_real_probe(tmp_path: Path) -> None:
    assert disk.free_bytes(tmp_path) > 0
    state = DiskGuard(tmp_path, min_free_mb=1, resume_free_mb=1).state()
    assert state.free_bytes > MB and not state.refusing and state.checked_at > 0


def test_a_failing_listener_costs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    FakeDisk(monkeypatch, 1)
    guard = DiskGuard(tmp_path, min_free_mb=10, resume_free_mb=20, cache_s=0)

    def broken(state: DiskState) -> None:
        raise RuntimeError("webhook down")

    guard.listeners.append(broken)
    assert guard.refusal() is not None
