"""One node per data directory, and a way to tell whether it runs.

``dicom-node serve`` holds an exclusive ``flock`` on ``data_dir/node.lock`` for as long as it runs and writes
its process id and listening ports into it. A second ``serve`` on the same data directory is refused at once
(two nodes would share a spool and a journal); ``status`` reads the file and probes the lock to say whether the
node runs. The kernel drops the lock when the process ends, however it ends (SIGKILL included): a stale file
never blocks a restart.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

LOCK_NAME = "node.lock"


class NodeRunning(RuntimeError):
    """Another node holds the data directory."""


@dataclass(frozen=True)
class Holder:
    """What the running node wrote into its lock file."""

    running: bool
    pid: int | None = None
    started: float | None = None
    ports: dict[str, int | None] | None = None


class NodeLock:
    """The exclusive lock of a serving node on its data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        self._file: IO[str] | None = None

    def acquire(self, **details: Any) -> None:
        """Take the lock (or raise :class:`NodeRunning`) and record ``details`` beside the process id."""
        f = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            holder = probe(self.path.parent)
            raise NodeRunning(f"another node (process {holder.pid or '?'}) is serving data directory "
                              f"{self.path.parent}") from None
        self._file = f
        self.update(**details)

    def update(self, **details: Any) -> None:
        """Rewrite the recorded details (e.g. the ports once they are bound)."""
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps({"pid": os.getpid(), **details}))
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def probe(data_dir: Path) -> Holder:
    """Whether a node serves ``data_dir`` now, and what it recorded."""
    path = data_dir / LOCK_NAME
    try:
        f = path.open("r", encoding="utf-8")
    except FileNotFoundError:
        return Holder(running=False)
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                details = json.loads(f.read() or "{}")
            except ValueError:
                details = {}
            return Holder(running=True, pid=details.get("pid"), started=details.get("started"),
                          ports=details.get("ports"))
        fcntl.flock(f, fcntl.LOCK_UN)
        return Holder(running=False)
