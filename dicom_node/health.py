"""The node's health: a few cheap checks that tell whether it can do its work now.

``/health`` answers them as JSON (200 when every check passes, 503 otherwise), ``/metrics`` exports them, and
the systemd watchdog is fed only while the checks that a restart could cure pass (:data:`LIVENESS`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .disk import free_bytes as disk_free_bytes  # one reader of free space for /health, /metrics and the guard
from .receipts import LogStatus

#: The checks whose failure a restart may cure (a stuck scheduler, a listener that died, a journal that no longer
#: answers): the systemd watchdog is fed only while they pass. A disk below its watermark is not one of them: the
#: node refuses new data itself until space is freed, and restarting it would not free any.
LIVENESS = ("scp_listening", "journal_writable", "dispatcher_alive", "runs_progressing")


@dataclass(frozen=True)
class Check:
    """One check's verdict and what it saw."""

    ok: bool
    detail: str


@dataclass(frozen=True)
class Health:
    """Every check by name."""

    checks: Mapping[str, Check]
    checked_at: float

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks.values())

    @property
    def live(self) -> bool:
        """The checks a restart could cure pass (see :data:`LIVENESS`)."""
        return all(self.checks[name].ok for name in LIVENESS if name in self.checks)

    def failed(self) -> list[str]:
        return [f"{name}: {c.detail}" for name, c in self.checks.items() if not c.ok]

    def to_json(self) -> dict[str, Any]:
        return {"status": "ok" if self.ok else "failing", "checked_at": self.checked_at,
                "checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in self.checks.items()}}


def check_disk(path: Path, min_free_bytes: int, free_bytes: Callable[[Path], int] = disk_free_bytes) -> Check:
    """The data directory's file system has at least ``min_free_bytes`` free."""
    try:
        free = free_bytes(path)
    except OSError as exc:
        return Check(False, f"cannot read the free space of {path}: {exc.strerror or exc}")
    mb = free / 2**20
    if free < min_free_bytes:
        return Check(False, f"{mb:.0f} MB free in {path}, below the watermark of {min_free_bytes / 2**20:.0f} MB")
    return Check(True, f"{mb:.0f} MB free in {path} (watermark {min_free_bytes / 2**20:.0f} MB)")


def check_journal(probe: Callable[[], float]) -> Check:
    """A write to the journal commits (``Journal.probe_write``)."""
    try:
        took = probe()
    except Exception as exc:  # noqa: BLE001 - whatever the journal raises is the verdict
        return Check(False, f"journal write failed: {type(exc).__name__}: {exc}")
    return Check(True, f"a write committed in {took * 1000:.1f} ms")


def check_dispatcher(*, scheduler_running: bool, last_scan_started: float | None, scanning: bool,
                     interval_s: float, now: float | None = None) -> Check:
    """The scheduler runs and the outbox scan started within a few of its intervals (or is running now: a long
    delivery is progress, each of its C-STOREs has its own timeout)."""
    now = time.time() if now is None else now
    if not scheduler_running:
        return Check(False, "the scheduler is not running")
    if scanning:
        return Check(True, "delivering now")
    window = max(30.0, 5 * interval_s)
    if last_scan_started is None:
        return Check(False, "the outbox has not been scanned yet")
    age = now - last_scan_started
    if age > window:
        return Check(False, f"the outbox was last scanned {age:.0f} s ago (every {interval_s:g} s expected)")
    return Check(True, f"outbox scanned {age:.1f} s ago")


#: The stage of a run not started yet (waiting for its turn: ``jobs.RunIsolation``); never a hung run.
WAITING = "waiting"


def check_runs(stages: Mapping[int, tuple[str, float]], max_stage_s: float, now: float | None = None,
               follow_ups: Mapping[int, tuple[str, float]] | None = None) -> Check:
    """No run of this process has stayed longer than ``max_stage_s`` in one stage (``JobRunner.stages``: job id ->
    (stage, since when); ``JobRunner.follow_up_stages``: follow-up id -> (its step, since when)): one that did is
    hung, and only a restart frees its thread (the run is then interrupted and counted against ``[jobs]
    max_attempts``)."""
    now = time.time() if now is None else now
    hung = sorted((now - since, f"job {job_id} has been in its {stage!r} stage")
                  for job_id, (stage, since) in dict(stages).items() if now - since > max_stage_s and stage != WAITING)
    hung += sorted((now - since, f"follow-up {follow_up_id} ({step}) has been running")
                   for follow_up_id, (step, since) in dict(follow_ups or {}).items() if now - since > max_stage_s)
    if hung:
        seconds, what = max(hung)
        return Check(False, f"{what} for {seconds:.0f} s (more than [jobs] max_stage_s {max_stage_s:g}): hung; a "
                            "restart runs it again, counted")
    running = len(stages) + len(follow_ups or {})
    return Check(True, f"{running} run(s) in progress, none hung")


def check_receipts(status: LogStatus, replay_error: str = "") -> Check:
    """The receipt log settles: no segment's settle (its spool files and journal rows made durable) failed without
    a retry that succeeded since, and the last replay of leftover segments did not fail. While it fails, acknowledged
    objects are durable only in the log (a start replays them), and its segments pile up."""
    problems = []
    if status.failing:
        problems.append(f"settling {', '.join(status.failing)} failed ({status.last_error}); the sweep tries again")
    if replay_error:
        problems.append(replay_error)
    if problems:
        return Check(False, "; ".join(problems))
    files = f"{status.files} segment file(s)" + (
        f", the oldest last written {status.oldest_file_age_s:.0f} s ago" if status.files else "")
    return Check(True, f"{status.open} segment(s) open, {status.settling} settling; {files}")
