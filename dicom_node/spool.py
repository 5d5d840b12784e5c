"""Durable file writes for received instances: write, fsync, rename, fsync the directory.

A file in the spool is complete or absent, never half-written, so a crash between the write and
the journal row leaves at worst an orphan file (never a journal row pointing at a partial file).
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

_SAFE = re.compile(r"[^0-9A-Za-z._-]")


def _safe(uid: str) -> str:
    return _SAFE.sub("_", uid)[:128] or "_"


class Spool:
    """Stores received instances under ``root/<study>/<series>/<sop>.dcm``."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._known_dirs: set[Path] = set()
        self._lock = threading.Lock()

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        return self.root / _safe(study_uid) / _safe(series_uid) / f"{_safe(sop_instance_uid)}.dcm"

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        with self._lock:
            if directory in self._known_dirs:
                return
            created = not directory.exists()
            directory.mkdir(parents=True, exist_ok=True)
            if created and self.fsync:
                # make the new directory entries themselves durable
                for d in (directory.parent, directory.parent.parent):
                    _fsync_dir(d)
            self._known_dirs.add(directory)

    def write(self, study_uid: str, series_uid: str, sop_instance_uid: str, data: bytes) -> Path:
        """Write ``data`` durably and return its final path (replacing an earlier copy atomically)."""
        final = self.path_for(study_uid, series_uid, sop_instance_uid)
        self._ensure_dir(final.parent)
        tmp = final.with_name(f".{final.name}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)  # e.g. disk full: leave no partial temporary behind
            raise
        if self.fsync:
            _fsync_dir(final.parent)
        return final


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
