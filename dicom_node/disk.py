"""The disk watermark: the SCP refuses new objects while the data directory's file system is nearly full.

Below ``[limits] min_free_mb`` free, every C-STORE is answered 0xA700 (out of resources) before anything
is written, so the disk never fills up with half a study and nothing refused was acknowledged; the sender
keeps its copy and sends again later. Once refusing, the node accepts again only above
``[limits] resume_free_mb`` (hysteresis: it does not flip at every deleted or written file). Each change
is logged once (WARNING when refusing starts, INFO when it ends, with how many objects were refused).

The free space is probed by :func:`free_bytes` (``shutil.disk_usage``: the space an unprivileged user
may still use), at most once per ``cache_s`` seconds, so the check costs nothing per C-STORE.
:meth:`DiskGuard.state` tells the health endpoint and metrics where the node stands.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MB = 1024 * 1024


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on the file system holding ``path``."""
    return shutil.disk_usage(path).free


@dataclass(frozen=True)
class DiskState:
    """Where the disk watermark stands (:meth:`DiskGuard.state`)."""

    path: str               # the directory whose file system is watched (``[node] data_dir``)
    free_bytes: int         # free at the last probe (-1: the probe failed)
    min_free_bytes: int     # refuse below this (0: the watermark is off)
    resume_free_bytes: int  # accept again at or above this
    refusing: bool          # C-STOREs are refused now
    checked_at: float       # time.time() of the last probe
    refused: int            # objects refused since refusing began (0 while accepting)


class DiskGuard:
    """Low/high watermark on the free space of ``path``'s file system; thread-safe."""

    def __init__(self, path: Path, *, min_free_mb: float, resume_free_mb: float, cache_s: float = 1.0) -> None:
        self.path = Path(path)
        self.min_free = int(min_free_mb * MB)
        self.resume_free = max(int(resume_free_mb * MB), self.min_free)
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._refusing = False
        self._free = -1
        self._checked_mono = float("-inf")
        self._checked_at = 0.0
        self._refused = 0
        #: called with the new :class:`DiskState` after each change (refusing starts or ends), e.g. a notifier
        self.listeners: list[Callable[[DiskState], None]] = []

    def _probe(self) -> DiskState | None:
        """Probe if the cached value is older than ``cache_s``; returns the new state after a change."""
        now = time.monotonic()
        if now - self._checked_mono < self.cache_s:
            return None
        self._checked_mono, self._checked_at = now, time.time()
        try:
            self._free = free_bytes(self.path)
        except OSError as exc:
            # cannot tell: keep the current decision (the spool write itself still fails cleanly)
            log.warning("cannot read the free space of %s: %s", self.path, exc)
            self._free = -1
            return None
        if not self._refusing and self._free < self.min_free:
            self._refusing, self._refused = True, 0
            log.warning("disk low: %d MB free on the file system of %s, below [limits] min_free_mb %d: every "
                        "C-STORE is refused (0xA700 out of resources) until %d MB are free (resume_free_mb)",
                        self._free // MB, self.path, self.min_free // MB, self.resume_free // MB)
            return self._state()
        if self._refusing and self._free >= self.resume_free:
            self._refusing = False
            log.info("disk space recovered: %d MB free on the file system of %s (resume_free_mb %d): C-STOREs are "
                     "accepted again (%d refused meanwhile)", self._free // MB, self.path, self.resume_free // MB,
                     self._refused)
            return self._state()
        return None

    def _state(self) -> DiskState:
        return DiskState(str(self.path), self._free, self.min_free, self.resume_free, self._refusing,
                         self._checked_at, self._refused if self._refusing else 0)

    def refusal(self) -> str | None:
        """Why a C-STORE must be refused now (counted as refused), or None to accept it."""
        if self.min_free <= 0:
            return None
        with self._lock:
            changed = self._probe()
            reason = None
            if self._refusing:
                self._refused += 1
                reason = (f"out of disk space: {max(self._free, 0) // MB} MB free, the node needs "
                          f"{self.min_free // MB} MB")
        self._notify(changed)
        return reason

    def state(self) -> DiskState:
        """The current state (probing again if the last probe is older than ``cache_s``)."""
        with self._lock:
            changed = self._probe()
            state = self._state()
        self._notify(changed)
        return state

    def _notify(self, changed: DiskState | None) -> None:
        if changed is None:
            return
        for listener in list(self.listeners):
            try:
                listener(changed)
            except Exception:  # noqa: BLE001 - a notifier must not cost a C-STORE its answer
                log.exception("disk watermark listener %r failed", listener)
