"""The journal from the spool: the instance and series rows of every file the journal does not know.

The spool holds each received object as it came (``spool/<study>/<series>/<sop>.dcm``, with file
meta); its header says everything the SCP journaled at receipt but the calling AE title and the time
(taken from the file's mtime). Jobs, outputs and the outbox cannot be recovered from it: series that
are rebuilt are marked ``ignored`` (not processed again, so nothing is sent twice) unless
``reprocess`` is asked for, in which case they are left ``receiving`` and close on their idle timeout
at the next start, as if just received.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info

from .headers import describe
from .journal import Journal, SeriesState
from .scp import BadInstance
from .uids import is_valid_uid

log = logging.getLogger(__name__)

REBUILT_NOTE = "rebuilt from the spool: not processed again (dicom-node journal rebuild --reprocess would)"


def spool_files(spool_root: Path) -> Iterator[Path]:
    """Every stored object under ``spool_root`` (not the temporaries of writes in progress)."""
    for directory, _dirs, files in os.walk(spool_root):
        for name in files:
            if name.endswith(".dcm") and not name.startswith("."):
                yield Path(directory) / name


def unknown_files(journal: Journal, spool_root: Path) -> list[Path]:
    """Spool files no journal row points at (a lost or replaced journal, or a crash between the write
    and the journal row)."""
    known = journal.known_paths()
    return [p for p in spool_files(spool_root) if str(p) not in known]


@dataclass
class RebuildResult:
    added: int = 0
    series: set[str] = field(default_factory=set)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)


def _digest_after_meta(path: Path) -> str:
    """The SCP's content digest: SHA-256 of the data set as received, after the file meta."""
    meta = read_file_meta_info(path)
    start = 132 + 12 + int(meta.FileMetaInformationGroupLength)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def rebuild(journal: Journal, spool_root: Path, *, reprocess: bool = False) -> RebuildResult:
    result = RebuildResult()
    new_series: set[str] = set()
    unknown = unknown_files(journal, spool_root)
    unknown.sort(key=lambda p: (p.stat().st_mtime, str(p)))  # in the order they were received
    for path in unknown:
        try:
            ds = dcmread(path, stop_before_pixels=True)
            received = describe(ds)
            uids = {"SOPInstanceUID": received.sop_instance_uid, "SOPClassUID": received.sop_class_uid,
                    "StudyInstanceUID": received.study_uid, "SeriesInstanceUID": received.series_uid}
            bad = [k for k, v in uids.items() if not is_valid_uid(v)]
            if bad:
                raise BadInstance(0, f"{', '.join(bad)} missing or not a UID")
            if journal.instance(uids["SOPInstanceUID"]) is not None:
                raise BadInstance(0, "its SOP Instance UID is already journaled with another file")
            series_known = journal.series(received.series_uid) is not None
            journal.add_instance(
                received, transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")), path=str(path),
                calling_ae="", sha256=_digest_after_meta(path), now=path.stat().st_mtime,
            )
        except Exception as exc:  # noqa: BLE001 - report the file, go on with the others
            result.unreadable.append((path, str(exc)))
            continue
        result.added += 1
        result.series.add(uids["SeriesInstanceUID"])
        if not series_known:
            new_series.add(uids["SeriesInstanceUID"])
    if not reprocess:
        for uid in sorted(new_series):
            journal.set_series_state(uid, SeriesState.IGNORED, REBUILT_NOTE)
    return result
