"""One receiving node per data directory (or receivers that share it), any number of workers beside it, and a
way to tell what runs.

``dicom-node serve`` (``--role all`` or ``receiver``) holds an exclusive ``flock`` on ``data_dir/node.lock`` for
as long as it runs and writes its process id and listening ports into it. A second one on the same data directory
is refused at once. Receivers (``--role receiver``) hold the lock shared instead: several may serve one data
directory (their routing and delivery are kept apart by the journal's claims; on one machine they may share the
port, ``[node] reuse_port``), and they exclude an ``all`` node but not each other. ``status`` reads the file and
probes the lock to say whether the node runs. Every serving process, workers (``--role worker``) included, also
holds a lock of its own, ``data_dir/processes/<role>-<host>-<pid>.lock`` (:class:`ProcessLock`), which ``status`` lists
(:func:`processes`). The kernel drops a lock when its process ends, however it ends (SIGKILL included): a stale
file never blocks a restart, and is not listed.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

LOCK_NAME = "node.lock"
#: Attempts (and the pause between them) to take a lock another process may only be probing for an instant.
_TRIES, _RETRY_S = 5, 0.05
PROCESSES_DIR = "processes"
#: Folder of the instance locks (:class:`InstanceLocks`) in the data directory, and how many there are.
INSTANCE_LOCKS_DIR, INSTANCE_LOCK_STRIPES = "locks", 256


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
        self._shared = False

    def _describe_holder(self) -> str:
        return f"another node (process {probe(self.path.parent).pid or '?'}) is serving data directory " \
               f"{self.path.parent}"

    def acquire(self, *, shared: bool = False, **details: Any) -> None:
        """Take the lock (or raise :class:`NodeRunning`) and record ``details`` beside the process id.

        ``shared``: one of several receivers sharing the data directory; they hold the lock together, exclude a
        node of role ``all``, and record nothing here (each has its process lock)."""
        f = self.path.open("a+", encoding="utf-8")
        for attempt in range(_TRIES):  # a probe (``status``, a scrape) holds it for an instant: try again
            try:
                fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt + 1 == _TRIES:
                    f.close()
                    raise NodeRunning(self._describe_holder()) from None
                time.sleep(_RETRY_S)
        self._file = f
        self._shared = shared
        self.update(**details)

    def update(self, **details: Any) -> None:
        """Rewrite the recorded details (e.g. the ports once they are bound)."""
        if self._file is None or self._shared:
            return
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), **details}))
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            if not self._shared:
                self._file.seek(0)
                self._file.truncate()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


class ProcessLock(NodeLock):
    """The lock every serving process holds on a file of its own (``processes/<role>-<host>-<pid>.lock``), with its
    role and worker id: what :func:`processes` lists. Removed when the process stops; left (unlocked, not listed)
    when it is killed."""

    def __init__(self, data_dir: Path, role: str) -> None:
        folder = data_dir / PROCESSES_DIR
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        super().__init__(data_dir)
        # the host too: processes of several machines or containers (each its own pid 1) may share the folder
        host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"
        self.path = folder / f"{role}-{host}-{os.getpid()}.lock"

    def _describe_holder(self) -> str:
        return f"{self.path} is held by another process"

    def release(self) -> None:
        if self._file is not None:
            self.path.unlink(missing_ok=True)
        super().release()


def _held(path: Path) -> dict[str, Any] | None:
    """What the holder of the lock on ``path`` recorded, or None when no process holds it."""
    try:
        f = path.open("r", encoding="utf-8")
    except FileNotFoundError:
        return None
    with f:
        try:  # exclusive: a lock held in either mode (an ``all`` node, or receivers sharing) is found
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                details = json.loads(f.read() or "{}")
            except ValueError:
                details = {}
            return details if isinstance(details, dict) else {}
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


def probe(data_dir: Path) -> Holder:
    """Whether a node serves ``data_dir`` now, and what it recorded."""
    details = _held(data_dir / LOCK_NAME)
    if details is None:
        return Holder(running=False)
    live = processes(data_dir)
    if not any(p.get("pid") == details.get("pid") and p.get("host") == details.get("host") for p in live):
        # receivers sharing the directory record nothing in node.lock, and what is there may be a killed all
        # node's: the oldest live receiver's process lock tells
        receivers = [p for p in live if p.get("role") == "receiver"]
        details = receivers[0] if receivers else details
    return Holder(running=True, pid=details.get("pid"), started=details.get("started"), ports=details.get("ports"))


def processes(data_dir: Path) -> list[dict[str, Any]]:
    """The serving processes of ``data_dir`` now (receiver or all, workers), each as it recorded itself (pid, role,
    worker id, started), oldest first."""
    folder = data_dir / PROCESSES_DIR
    found = [d for d in (_held(p) for p in sorted(folder.glob("*.lock"))) if d is not None] if folder.is_dir() else []
    return sorted(found, key=lambda d: float(d.get("started") or 0))


class InstanceLocks:
    """Locks on SOP Instance UIDs that hold across the processes filing into one data directory (receivers sharing
    it), so that two of them cannot both file one UID as new: each would find no row, write the same spool path
    and answer Success, the file then holding one object and the row the other's digest. One ``flock`` file per
    stripe of UIDs (``data_dir/locks/uid-XX.lock``), opened once per process. ``flock`` is held by an open file,
    not a thread, so a thread lock per stripe keeps the threads of one process from sharing a held stripe (the
    first to release it would release it for both)."""

    def __init__(self, data_dir: Path) -> None:
        self.directory = data_dir / INSTANCE_LOCKS_DIR
        self._stripes: dict[int, tuple[threading.Lock, int]] = {}
        self._lock = threading.Lock()

    def _stripe(self, stripe: int) -> tuple[threading.Lock, int]:
        with self._lock:
            held = self._stripes.get(stripe)
            if held is None:
                self.directory.mkdir(mode=0o700, exist_ok=True)
                fd = os.open(self.directory / f"uid-{stripe:02x}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                held = self._stripes[stripe] = (threading.Lock(), fd)
            return held

    def _current(self, stripe: int, held: tuple[threading.Lock, int]) -> bool:
        with self._lock:
            return self._stripes.get(stripe) is held

    @contextmanager
    def held(self, sop_uid: str) -> Iterator[None]:
        """While inside, no other thread or process of this data directory is inside for ``sop_uid``'s stripe."""
        stripe = zlib.crc32(sop_uid.encode()) % INSTANCE_LOCK_STRIPES
        while True:
            held = self._stripe(stripe)
            lock, fd = held
            with lock:
                if not self._current(stripe, held):  # closed while this thread waited: its descriptor is gone
                    continue
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                return

    def close(self) -> None:
        """Close the lock files opened so far, each once no thread holds it (a later :meth:`held` opens its stripe
        again: an object still arriving on an association open at the stop)."""
        with self._lock:
            stripes, self._stripes = self._stripes, {}
        for lock, fd in stripes.values():
            with lock:  # a thread that took it before the close and waits for it finds it no longer current
                os.close(fd)
