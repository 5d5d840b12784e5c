"""Durable file writes for received instances: write, fsync, rename, fsync the directory.

A file in the spool is complete or absent, never half-written, so a crash between the write and
the journal row leaves at worst an orphan file (never a journal row pointing at a partial file).

Directories are created 0700 and files 0600: they hold patient data.

Paths are made of UIDs only when they have the form of a UID (digits and dots, see
:func:`dicom_node.uids.is_valid_uid`); any other value is replaced by a hash of it, so a received
``..``, ``a/b`` or ``1+1`` can neither leave the spool nor share a file with another value.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from .uids import is_valid_uid

#: Series folders a spool remembers as made and checked (older ones are checked again when next written to)
KNOWN_DIRS_KEPT = 4096


def path_component(uid: str) -> str:
    """``uid`` itself if it has the form of a UID, else ``h-`` and a SHA-256 prefix of it (never raw text).

    A UID is digits and dots, so neither form can be ``.``/``..``, hold a separator, or equal the other.
    """
    if is_valid_uid(uid):
        return uid
    return "h-" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


class SpoolPathError(ValueError):
    """A path for a received instance would lie outside the spool (never expected: a safety net)."""


class Spool:
    """Stores received instances under ``root/<study>/<series>/<sop>.dcm``."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        private_dir(self.root)
        self._resolved_root = self.root.resolve()
        self.fsync = fsync
        #: series folders made and checked, the most recent :data:`KNOWN_DIRS_KEPT` (a node runs for years: one
        #: entry per series ever received would only grow)
        self._known_dirs: OrderedDict[Path, None] = OrderedDict()
        self._lock = threading.Lock()

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        path = (self.root / path_component(study_uid) / path_component(series_uid)
                / f"{path_component(sop_instance_uid)}.dcm")
        if not path.resolve().is_relative_to(self._resolved_root):  # e.g. a symlink planted in the spool
            raise SpoolPathError(f"{path} lies outside the spool {self._resolved_root}")
        return path

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        with self._lock:
            if directory in self._known_dirs:
                return
            created = not directory.exists()
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if created and self.fsync:
                # make the new directory entries themselves durable
                for d in (directory.parent, directory.parent.parent):
                    fsync_dir(d)
            self._known_dirs[directory] = None
            while len(self._known_dirs) > KNOWN_DIRS_KEPT:
                self._known_dirs.popitem(last=False)

    def _final_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """:meth:`path_for`, resolving (checking) each directory once, not each file: the file's own name is a
        UID or a hash, and the rename replaces whatever is at that name rather than following it."""
        directory = self.root / path_component(study_uid) / path_component(series_uid)
        if directory not in self._known_dirs:
            return self.path_for(study_uid, series_uid, sop_instance_uid)
        return directory / f"{path_component(sop_instance_uid)}.dcm"

    def write(self, study_uid: str, series_uid: str, sop_instance_uid: str,
              data: bytes | memoryview | Sequence[bytes | memoryview], *, durable: bool = True) -> Path:
        """Write ``data`` (or its parts one after the other, e.g. file meta and the data set as received, without
        joining them) and return its final path (replacing an earlier copy atomically). Durably (the file and its
        directory fsync'd) unless ``durable=False``: the caller has made the bytes durable elsewhere (the receipt
        log, :mod:`dicom_node.receipts`) and fsyncs the file later."""
        sync = self.fsync and durable
        final = self._final_path(study_uid, series_uid, sop_instance_uid)
        self._ensure_dir(final.parent)
        tmp = final.with_name(f".{final.name}.{threading.get_ident()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except FileNotFoundError:  # its (empty) directory was removed by a retention sweep: make it again
            with self._lock:
                self._known_dirs.pop(final.parent, None)
            self._ensure_dir(final.parent)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                for part in (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data:
                    view = memoryview(part)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)  # e.g. disk full: leave no partial temporary behind
            raise
        if sync:
            fsync_dir(final.parent)
        return final


def private_dir(directory: Path) -> bool:
    """Make ``directory`` (patient data) accessible to its owner only; True if its mode was changed."""
    mode = directory.stat().st_mode & 0o777
    if mode & 0o077:
        directory.chmod(mode & 0o700)
        return True
    return False


def sync_tree(root: Path, *, up_to: Path) -> None:
    """fsync every file and folder under ``root`` (deepest folders first), then ``root``'s folders up to ``up_to``
    (one of its ancestors): what a job wrote is on disk before the journal records it as written."""
    folders: list[Path] = []
    for folder, _subfolders, names in os.walk(root):
        for name in names:
            fd = os.open(Path(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        folders.append(Path(folder))
    for folder in reversed(folders):
        fsync_dir(folder)
    if up_to not in root.parents:
        raise ValueError(f"{up_to} does not hold {root}")
    for folder in root.parents:
        fsync_dir(folder)
        if folder == up_to:
            break


def fsync_dir(directory: Path) -> None:
    """fsync a directory: its entries (new, renamed, removed files) are durable when it returns."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
