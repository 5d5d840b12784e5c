"""Retention: delete received instances and outputs once they are no longer needed, keep the record.

A series' files (its spooled instances, and the output folder ``outputs/job-NNNNNN`` and recorded files
of each of its jobs) are deleted ``[retention] delivered_days`` after every output of it was delivered,
or ``not_processed_days`` after its last instance when the node did not process it (no rule matched, or
its job failed). Nothing still needed is deleted: not a series still receiving or waiting to be routed,
not one with a job queued, running or with outputs to deliver, not one with a delivery that failed for
good (``dicom-node retry`` may still send it). The conditions are checked in the journal, in the
transaction that decides the purge (:data:`dicom_node.journal._PURGEABLE`).

What was received and sent stays in the journal: the series row (patient, study, description, sender,
first and last received, and the number of instances purged), its jobs, the series they produced, their
output files and the outbox rows (destination, SOP Instance UID, when sent). Only the instance rows go,
so that the same objects sent again are received and processed as new.

Crash safety: one sweep is, per series, (1) :meth:`Journal.begin_purge` — one transaction recording
every file to delete and forgetting the instance rows — then (2) :meth:`Journal.finish_purge` — deleting
the files in batches of :data:`BATCH`: a batch's job folders and output files first, outside any journal
transaction (a big folder never holds up C-STORE acknowledgements or lease renewals), then its instance files and
all its records in one transaction. A record goes only once its file is gone: a crash after (1), or during (2),
leaves the files not yet deleted recorded in ``purge_files``, and the next sweep, and the next start of the node
(:meth:`Retention.finish_pending`), deletes them (deleting a file already gone is no error). A crash during (1)
changes nothing. A file that cannot be deleted (another owner's, a busy NFS file) is logged and stays recorded,
moved behind the others, so it is tried again at the next sweep and never holds up the other purges.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import NodeConfig
from .journal import Journal, PurgeCandidate, PurgeFile

log = logging.getLogger(__name__)

DAY = 86400.0
#: Files deleted per journal transaction.
BATCH = 200


def remove(path: Path) -> int | None:
    """Delete a file or a folder (with what is in it); the bytes freed, None if it was not there (a sweep
    interrupted after deleting it, or a job that wrote nothing)."""
    try:
        if path.is_dir() and not path.is_symlink():
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
            shutil.rmtree(path)
            return size
        size = path.lstat().st_size
        path.unlink()
        return size
    except FileNotFoundError:
        return None


@dataclass
class SweepResult:
    """What one sweep deleted (or, with ``dry_run``, would delete)."""

    series: list[PurgeCandidate] = field(default_factory=list)
    instances: int = 0          # instance rows purged (their files deleted)
    jobs: int = 0               # jobs whose outputs were deleted
    files: int = 0              # files and output folders deleted
    bytes_freed: int = 0
    kept: int = 0               # instance files kept: received again after the purge was decided
    refused: list[str] = field(default_factory=list)  # recorded paths outside the data directory (not deleted)
    undeleted: list[str] = field(default_factory=list)  # could not be deleted now: still recorded, tried again later


class Retention:
    """The retention policy of one node: which series to purge, and the purge itself."""

    def __init__(self, config: NodeConfig, journal: Journal) -> None:
        self.settings = config.retention
        self.journal = journal
        self.data_dir = Path(config.node.data_dir)
        self.outputs_dir = self.data_dir / "outputs"
        self._root = self.data_dir.resolve()

    def job_folder(self, job_id: int) -> str:
        """The folder a job writes in (as :class:`dicom_node.jobs.JobRunner` names it)."""
        return str(self.outputs_dir / f"job-{job_id:06d}")

    def _cutoffs(self, now: float) -> dict[str, float]:
        return {"delivered_before": now - self.settings.delivered_days * DAY,
                "not_processed_before": now - self.settings.not_processed_days * DAY}

    def due(self, now: float | None = None) -> list[PurgeCandidate]:
        """The series whose files may be deleted at ``now``, oldest first."""
        return self.journal.purge_candidates(**self._cutoffs(time.time() if now is None else now))

    def sweep(self, now: float | None = None, *, dry_run: bool = False) -> SweepResult:
        """Finish an interrupted sweep, then purge every series that is due (``dry_run``: only list them).
        Runs whether or not ``[retention] enabled`` (the caller decides); see the module's docstring."""
        now = time.time() if now is None else now
        result = SweepResult()
        if dry_run:
            result.series = self.due(now)
            result.instances = sum(c.instances for c in result.series)
            result.jobs = sum(len(c.jobs) for c in result.series)
            return result
        self.finish_pending(result)
        for candidate in self.due(now):
            files = self.journal.begin_purge(candidate.series_uid, job_folder=self.job_folder, now=now,
                                             **self._cutoffs(now))
            if files is None:  # needed again since it was listed (received again, reprocessed, ...)
                continue
            result.series.append(candidate)
            result.instances += sum(1 for f in files if f.kind == "instance")
            result.jobs += len(candidate.jobs)
            self.finish_pending(result)
            log.info("retention: deleted series %r (%s) of study %s: %d instance(s), outputs of %d job(s), %s "
                     "%.0f day(s) ago", candidate.description, candidate.series_uid, candidate.study_uid,
                     candidate.instances, len(candidate.jobs),
                     "delivered" if candidate.delivered else "not processed, settled",
                     (now - candidate.settled_at) / DAY)
        if result.series:
            log.info("retention sweep: %d series, %d instance(s), outputs of %d job(s) deleted, %.1f MB freed",
                     len(result.series), result.instances, result.jobs, result.bytes_freed / 1e6)
        if result.undeleted:
            log.error("retention sweep: %d file(s) or folder(s) could not be deleted (e.g. %s); they stay recorded "
                      "and are tried again at the next sweep", len(result.undeleted), result.undeleted[0])
        return result

    def finish_pending(self, result: SweepResult | None = None) -> SweepResult:
        """Delete every file a sweep recorded for deletion and has not deleted yet (at start-up: what a
        crash interrupted)."""
        result = SweepResult() if result is None else result
        seen: set[str] = set(result.undeleted)  # (tried once per sweep: it failed already)
        while True:
            batch = [f for f in self.journal.pending_purges(BATCH) if f.path not in seen]
            if not batch:
                return result
            seen.update(f.path for f in batch)
            folders: set[Path] = set()
            kept = self.journal.finish_purge(batch, lambda f, folders=folders: self._delete(f, result, folders))
            result.kept += len(kept)
            for f in kept:
                log.info("retention: %s kept: received again since its series was purged", f.path)
            self._remove_empty(folders)

    def _delete(self, f: PurgeFile, result: SweepResult, folders: set[Path]) -> bool:
        """Delete one recorded file or folder, if it lies inside the data directory; False when it could not be
        deleted now (its record stays, and it is tried again after the others)."""
        path = Path(f.path)
        if not self._inside(path):
            log.error("retention: %s is recorded for deletion but lies outside the data directory %s: not deleted",
                      path, self.data_dir)
            result.refused.append(f.path)
            return True
        try:
            freed = remove(path)
        except OSError as exc:  # a permission, NFS's EBUSY or ENOTEMPTY: one such file must not stop every purge
            log.error("retention: cannot delete %s: %s; it stays recorded and is tried again at the next sweep",
                      path, exc.strerror or exc)
            result.undeleted.append(f.path)
            return False
        if freed is not None:
            result.bytes_freed += freed
            result.files += 1
        if f.kind == "instance":
            folders.add(path.parent)
        return True

    def _inside(self, path: Path) -> bool:
        try:
            resolved = path.resolve()
        except OSError:
            return False
        return resolved != self._root and resolved.is_relative_to(self._root)

    def _remove_empty(self, folders: set[Path]) -> None:
        """Remove the spool's series folders (and then study folders) the purge left empty."""
        spool = (self.data_dir / "spool").resolve()
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            for directory in (folder, folder.parent):
                try:
                    if directory.resolve() == spool or not directory.resolve().is_relative_to(spool):
                        break
                    os.rmdir(directory)  # only when empty; the SCP makes it again when it needs it
                except OSError:
                    break
