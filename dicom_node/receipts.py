"""The receipt log: received objects made durable with one sync, taken while the SCP checks them.

Before a C-STORE is answered with Success its object must be on disk. Made durable where it is filed, that
takes three syncs one after the other (the spool file, its directory, the journal's commit), and one
association waits for each. Instead, each association appends what it receives to a segment of this log
(``data_dir/receipts/*.log``: the object's bytes as they are filed, with the calling AE title, the time and a
CRC-32), written with ``O_DSYNC``: one synchronous write makes it durable. The SCP parses and checks the object
in another thread during that write, then files it (spool file and journal row, neither synced), and answers
Success after both.

A segment is *settled* when its association ends, when it holds :data:`SEGMENT_RECORDS` objects or
:data:`SEGMENT_BYTES`, and when no object was appended to it for :data:`SETTLE_IDLE_S` (the node's sweep):
the spool files filed from it and their directories are fsync'd, then one durable journal commit makes every
row before it durable, and the segment is deleted. After a crash or power loss, start-up (and, for a receiver
that died beside others sharing the data directory, the next sweep) files again what the segments left
behind hold (:meth:`ReceiptLog.orphans`, :func:`index_records`): an object whose journal row or spool file was
lost is filed again from its bytes, with the same checks as a C-STORE; an object refused after its record was
written (a conflicting re-send, a spool file that could not be written) has a refusal record after it, written
before the failure is answered, and is left out (:func:`live_records`). A record cut short (the node stopped
while writing it, before any answer) ends its segment's replay.

Each live segment is locked (``flock``) by the process writing it, so that a process replays only segments
whose writer has gone. Segments are created under a temporary name, locked, then renamed, so that no one sees
a segment unlocked while it is being created. Creating one costs a directory sync, so once objects arrive the log
keeps one *spare* segment ready, made in the background: the next association appends to it at once (a sender
that opens an association per object would otherwise wait for that sync every time). A spare holds nothing: it
is not counted in :meth:`ReceiptLog.status`, a clean stop deletes it, and one left by a crash replays as empty.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .spool import fsync_dir, private_dir

log = logging.getLogger(__name__)

#: a segment is settled and a new one begun after this many objects, or bytes
SEGMENT_RECORDS = 2000
SEGMENT_BYTES = 512 * 2**20
#: a segment no object was appended to for this long is settled by the next sweep (an association kept open)
SETTLE_IDLE_S = 5.0
#: after a spare segment could not be made, none is tried for this long (associations create their own)
SPARE_RETRY_S = 60.0

#: A segment whose spool files failed to sync: the replay writes every object of it again (:class:`SyncFailed`).
REWRITE_SUFFIX = ".rewrite.log"

_MAGIC = b"DNR1"
#: magic, CRC-32 of what follows the header, length of the JSON description, length of the object's bytes
_HEADER = struct.Struct("<4sIIQ")
_SUFFIX = ".log"


class SyncFailed(OSError):
    """An ``fsync`` of a spool file (or its directory) failed. Linux reports a failed write-back once: a second
    ``fsync`` of the same file may succeed while its pages, marked clean, never reached the disk. So what was
    filed from the segment is not synced again but written again from the segment's records (:func:`needs_rewrite`):
    new files, synced before they replace the old ones."""


def needs_rewrite(segment_path: Path) -> bool:
    """The segment was left for the replay to write every object of it again (:class:`SyncFailed`)."""
    return segment_path.name.endswith(REWRITE_SUFFIX)


def mark_for_rewrite(segment_path: Path) -> Path:
    """Rename a segment so that its replay writes every object of it again; its new path."""
    if needs_rewrite(segment_path):
        return segment_path
    target = segment_path.with_name(segment_path.name[:-len(_SUFFIX)] + REWRITE_SUFFIX)
    os.rename(segment_path, target)
    fsync_dir(segment_path.parent)
    return target


def try_mark_for_rewrite(segment_path: Path) -> Path:
    """:func:`mark_for_rewrite`, or (logged) the path as it was when it cannot be renamed: it is then replayed as it
    is, its files checked rather than written again."""
    try:
        return mark_for_rewrite(segment_path)
    except OSError as exc:
        log.error("receipt log: cannot mark %s for rewriting: %s", segment_path.name, exc)
        return segment_path


@dataclass(frozen=True)
class Receipt:
    """One received object as the log holds it: its Part 10 bytes as filed, and what the SCP knew of it."""

    calling_ae: str
    received_at: float
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    meta_length: int  #: bytes of file meta (preamble included) before the data set as received
    data: bytes

    @property
    def dataset(self) -> memoryview:
        """The data set as received (without the file meta the node put before it)."""
        return memoryview(self.data)[self.meta_length:]


@dataclass(eq=False)
class Segment:
    """One association's open segment and the spool files filed from it since it began."""

    path: Path
    fd: int
    records: int = 0
    size: int = 0
    last_append: float = field(default_factory=time.monotonic)
    files: list[Path] = field(default_factory=list)
    broken: bool = False  #: a write failed: nothing more is appended (the next object begins a new segment)
    pending: int = 0  #: objects being appended, or appended and not yet filed (:meth:`ReceiptLog.filed`)
    detached: bool = False  #: no longer any association's: settled once ``pending`` is 0
    closed: bool = False  #: its descriptor closed (settled)
    epoch: int = 0  #: the journal connection's when an association took it (:class:`ReceiptLog` ``epoch``)


@dataclass(frozen=True)
class LogStatus:
    """What ``/health`` and ``/metrics`` tell of a receipt log (:meth:`ReceiptLog.status`)."""

    open: int  #: segments associations append to
    settling: int  #: segments being settled now
    failing: tuple[str, ...]  #: segments whose last settle failed, until a retry succeeds (one being retried is
                              #: counted in ``settling`` too)
    last_error: str  #: why the last failed settle failed ("" when none has)
    settle_failures: int  #: settles that failed since the start (each retry that fails counts)
    files: int  #: segment files in the directory, this process's and any other's (orphans included; not its spare)
    oldest_file_age_s: float  #: age of the oldest of them by its last write (0 when there is none)


class ReceiptLog:
    """The segments of one process under ``directory``; ``settle`` makes a segment's spool files and journal rows
    durable (fsync of the files and their directories, one durable journal commit) before it is deleted."""

    def __init__(self, directory: Path, settle_rows: Callable[[], object],
                 epoch: Callable[[], int] = lambda: 0) -> None:
        """``settle_rows``: one durable journal commit. ``epoch``: a number the journal changes whenever it
        connects again (:meth:`dicom_node.journal.Journal.connection_epoch`): the rows committed without waiting
        for the disk before a PostgreSQL server restarted may be gone, and a durable commit on the new connection
        does not bring them back, so a segment that saw the epoch change is replayed instead of deleted."""
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        private_dir(self.directory)
        self._settle_rows = settle_rows
        self._epoch = epoch
        self._lock = threading.Lock()
        self._open: dict[int, Segment] = {}  # association key -> its segment
        self._settling: dict[Future[None], Segment] = {}
        self._failed: list[Segment] = []  # settles that failed, tried again by the next settle_idle
        self._failing: dict[Path, str] = {}  # segments whose last settle failed -> why (until one succeeds)
        self._settle_failures = 0
        #: leftover segments the last :meth:`orphans` pass could not open or lock (name -> why)
        self.unreplayable: dict[str, str] = {}
        self._mine: set[Path] = set()  # segments this log created (never replayed by it, whatever the locks say)
        self._spare: Segment | None = None  # made ahead, taken by the next association (:meth:`_create`)
        self._spare_coming = False  # one is being made
        self._spare_named: Path | None = None  # the spare being made, once it has its segment name
        self._spare_failed = -SPARE_RETRY_S  # when making one last failed (monotonic)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="receipts-settle")

    # -- appending -------------------------------------------------------------------------

    @staticmethod
    def record(parts: Sequence[bytes | memoryview], *, calling_ae: str, transfer_syntax: str, sop_class_uid: str,
               sop_instance_uid: str, received_at: float | None = None) -> list[bytes | memoryview]:
        """One object's record (``parts``: file meta, then the data set): header, description, then ``parts``."""
        t = time.time() if received_at is None else received_at
        description = json.dumps({"ae": calling_ae, "t": t, "ts": transfer_syntax, "class": sop_class_uid,
                                  "sop": sop_instance_uid, "meta": len(parts[0])}).encode()
        return _framed(description, parts)

    @staticmethod
    def refusal(sop_instance_uid: str, received_at: float) -> list[bytes | memoryview]:
        """The record saying that the object recorded as ``sop_instance_uid`` at ``received_at`` was refused (its
        C-STORE answered with a failure after its record was durable): a replay files it not (:func:`live_records`).
        Without it, an object refused as a conflicting re-send was filed by the replay, and the object acknowledged
        under its UID refused as the conflict."""
        return _framed(json.dumps({"refused": True, "t": received_at, "sop": sop_instance_uid}).encode(), ())

    def append_refusal(self, segment: Segment, sop_instance_uid: str, received_at: float) -> None:
        """Append :meth:`refusal` to ``segment``, durably (raises the ``OSError`` of the write). The object's record
        is in ``segment`` and not yet :meth:`filed`: the segment stays open meanwhile."""
        record = self.refusal(sop_instance_uid, received_at)
        try:
            _write_all(segment.fd, record)
        except OSError:
            with self._lock:
                segment.broken = True  # (a torn record would end its replay: nothing more is appended after it)
            raise
        with self._lock:
            segment.size += sum(len(part) for part in record)

    def append(self, key: int, record: list[bytes | memoryview]) -> Segment:
        """Append ``record`` (:meth:`record`) to association ``key``'s segment and return the segment once it is
        durable (raises the ``OSError`` of the write). The write is one ``writev`` on a file opened ``O_DSYNC``:
        one system call, so the interpreter lock is released once, for all of it (the SCP parses the object in
        another thread meanwhile)."""
        segment = self._segment(key)  # counted in its ``pending`` from here: no settle can close it under the write
        try:
            _write_all(segment.fd, record)
        except OSError:
            segment.broken = True
            self._release(segment)
            raise
        except BaseException:
            self._release(segment)
            raise
        with self._lock:
            segment.records += 1
            segment.size += sum(len(part) for part in record)
            segment.last_append = time.monotonic()
        return segment

    def _release(self, segment: Segment) -> None:
        """An append to ``segment`` that failed: it no longer holds the segment open."""
        with self._lock:
            segment.pending -= 1
            ready = segment.detached and segment.pending == 0
        if ready:
            self._settle_later(segment)

    def filed(self, key: int, segment: Segment, path: Path | None) -> None:
        """The SCP is done with an object appended to ``segment``: ``path`` is the spool file it wrote for it
        (not synced: fsync'd when the segment settles), None when it wrote none (a re-send, a refusal). Called
        once for every append that succeeded, whatever came of it (a failed append releases its own count)."""
        with self._lock:
            if path is not None:
                segment.files.append(path)
            segment.pending -= 1
            if segment.records >= SEGMENT_RECORDS or segment.size >= SEGMENT_BYTES:
                self._detach(key, segment)
            ready = segment.detached and segment.pending == 0
        if ready:
            self._settle_later(segment)

    def _detach(self, key: int, segment: Segment) -> bool:
        """(Lock held.) ``segment`` is no longer ``key``'s; True when it can be settled now."""
        if self._open.get(key) is segment:
            del self._open[key]
        if segment.detached:
            return False
        segment.detached = True
        return segment.pending == 0

    def _segment(self, key: int) -> Segment:
        """Association ``key``'s segment (a new one if it has none, or a broken one), counted in ``pending``."""
        with self._lock:
            segment = self._open.get(key)
            if segment is not None and not segment.broken:
                segment.pending += 1
                return segment
        new = self._create()
        new.epoch = self._epoch()  # before any row filed from it is committed
        with self._lock:
            new.pending += 1
            old = self._open.get(key)
            ready = old is not None and self._detach(key, old)  # broken: what was filed from it is settled all the same
            self._open[key] = new
        if ready:
            assert old is not None
            self._settle_later(old)
        return new

    def _create(self) -> Segment:
        """A segment for an association: the spare if one is ready, else a new one; a spare is made for the next."""
        with self._lock:
            segment, self._spare = self._spare, None
            make_spare = not self._spare_coming and time.monotonic() - self._spare_failed >= SPARE_RETRY_S
            self._spare_coming = self._spare_coming or make_spare
        if make_spare:
            try:
                self._pool.submit(self._make_spare)
            except RuntimeError:  # shut down
                with self._lock:
                    self._spare_coming = False
        return segment if segment is not None else self._new_segment()

    def _make_spare(self) -> None:
        try:
            spare: Segment | None = self._new_segment(spare=True)
        except OSError as exc:  # the next association creates its own (and its append reports the error)
            log.warning("receipt log: cannot make a spare segment (not tried again for %.0f s): %s",
                        SPARE_RETRY_S, exc)
            spare = None
        with self._lock:  # one is made at a time, and only while none is ready
            self._spare_coming, self._spare_named = False, None
            self._spare = spare
            if spare is None:
                self._spare_failed = time.monotonic()

    @property
    def spare(self) -> Path | None:
        """The spare segment's path (None when none is ready)."""
        with self._lock:
            return self._spare.path if self._spare is not None else None

    @property
    def spares(self) -> frozenset[Path]:
        """The spare's path and that of one being made, once named: segment files that hold nothing."""
        with self._lock:
            return frozenset(p for p in (self._spare.path if self._spare else None, self._spare_named) if p)

    def _new_segment(self, *, spare: bool = False) -> Segment:
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        tmp = self.directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_DSYNC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # never contended: the file is new
            final = self.directory / f"{name}{_SUFFIX}"
            with self._lock:
                self._mine.add(final)
                if spare:  # not counted by :meth:`status` from the moment it has its name
                    self._spare_named = final
            os.rename(tmp, final)
            fsync_dir(self.directory)  # the segment's name is durable before anything is acknowledged from it
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return Segment(final, fd)

    # -- settling --------------------------------------------------------------------------

    def close(self, key: int) -> None:
        """Association ``key`` ended: its segment is settled in the background."""
        with self._lock:
            segment = self._open.get(key)
            ready = segment is not None and self._detach(key, segment)
        if ready:
            assert segment is not None
            self._settle_later(segment)

    def settle_idle(self, idle_s: float = SETTLE_IDLE_S) -> int:
        """Settle (in the background) the segments nothing was appended to for ``idle_s`` (their associations
        begin new ones), and again those whose settle failed. Returns how many idle ones."""
        now = time.monotonic()
        with self._lock:
            idle = [(k, s) for k, s in self._open.items() if now - s.last_append >= idle_s and s.records]
            ready = [s for k, s in idle if self._detach(k, s)]
            ready += self._failed  # settles that failed (e.g. the journal was unreachable): tried again
            self._failed = []
        for segment in ready:
            self._settle_later(segment)
        return len(idle)

    def _settle_later(self, segment: Segment) -> None:
        try:
            future = self._pool.submit(self.settle, segment)
        except RuntimeError:  # shut down (an object filed after the stop): the segment is replayed at the next start
            log.warning("receipt log %s: not settled before the stop; replayed at the next start", segment.path.name)
            return
        with self._lock:
            self._settling[future] = segment
        future.add_done_callback(self._settled)

    def _settled(self, future: Future[None]) -> None:
        with self._lock:
            segment = self._settling.pop(future, None)
            failed = future.exception() is not None and segment is not None
            if failed:
                assert segment is not None
                self._failed.append(segment)
                self._failing.pop(segment.path, None)  # re-inserted last: the latest failure is the last entry
                self._failing[segment.path] = f"{type(future.exception()).__name__}: {future.exception()}"
                self._settle_failures += 1
            elif segment is not None:
                self._failing.pop(segment.path, None)
        if failed:
            log.error("receipt log: settling %s failed (%s); the next sweep tries again (and a start replays it)",
                      segment.path.name if segment else "?", future.exception())

    def settle(self, segment: Segment) -> None:
        """Make what was filed from ``segment`` durable, then delete it. A failure leaves it for a retry (the
        sweep's :meth:`settle_idle`) or the next start's replay; a failed sync of its files, for a replay that
        writes them again (:class:`SyncFailed`)."""
        try:
            self.sync_files(segment.files)
        except SyncFailed as exc:
            self._leave_to_rewrite(segment, exc)
            return
        self._settle_rows()  # one durable commit: every journal row committed before it is durable too
        if self._epoch() != segment.epoch:
            self._leave_to_replay(segment)
            return
        self._delete(segment)

    def _leave_to_replay(self, segment: Segment) -> None:
        """The journal connected again since ``segment`` began: rows filed from it may have been lost with the
        server. Its lock is let go, so the next replay (the node's sweep) files again what is missing."""
        log.warning("receipt log: the journal connected again while %s was in use; it is replayed (what the "
                    "journal lost is filed again) instead of deleted", segment.path.name)
        if not segment.closed:
            segment.closed = True
            os.close(segment.fd)
        self.forget(segment.path)

    def _leave_to_rewrite(self, segment: Segment, failure: SyncFailed) -> None:
        """Its files may not be on disk whatever a second ``fsync`` says: the segment is renamed for a replay that
        writes them again (the node's next sweep), and let go."""
        with self._lock:
            self._settle_failures += 1
        log.error("receipt log: %s; what was filed from %s is written again from it by the next replay",
                  failure, segment.path.name)
        renamed = try_mark_for_rewrite(segment.path)
        if not segment.closed:
            segment.closed = True
            os.close(segment.fd)
        self.forget(segment.path)
        self.forget(renamed)

    def _delete(self, segment: Segment) -> None:
        """Delete a settled (or unused spare) segment and close it."""
        segment.path.unlink(missing_ok=True)  # (missing: a retry after a failure past this point)
        if not segment.closed:
            segment.closed = True
            os.close(segment.fd)
        self.forget(segment.path)

    @staticmethod
    def sync_files(paths: Iterable[Path]) -> None:
        """fsync each file that still exists, then each of their directories once."""
        directories: dict[Path, None] = {}
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # removed since (a retention sweep, or a re-send replaced it: synced then)
                continue
            try:
                os.fsync(fd)
            except OSError as exc:
                raise SyncFailed(exc.errno, f"fsync of {path} failed: {exc.strerror or exc}") from exc
            finally:
                os.close(fd)
            directories[path.parent] = None
        for directory in directories:
            try:
                fsync_dir(directory)
            except OSError as exc:
                raise SyncFailed(exc.errno, f"fsync of {directory} failed: {exc.strerror or exc}") from exc

    def shutdown(self) -> None:
        """Settle every open segment and wait for all settles (a clean stop leaves no segment behind)."""
        with self._lock:
            ready = [s for k, s in list(self._open.items()) if self._detach(k, s)]
        for segment in ready:
            self._settle_later(segment)
        with self._lock:
            pending = list(self._settling)
        for future in pending:
            try:
                future.result()
            except Exception:  # noqa: BLE001 - logged by _settled; the segment is replayed at the next start
                pass
        self._pool.shutdown(wait=True)  # a spare being made is ready (or failed) after this
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            self._delete(spare)

    @property
    def open_segments(self) -> int:
        with self._lock:
            return len(self._open)

    def status(self) -> LogStatus:
        """This log's segments (open, settling, failing) and the segment files in its directory."""
        with self._lock:
            failing = tuple(sorted(path.name for path in self._failing))
            last_error = next(reversed(self._failing.values()), "") if self._failing else ""
            counts = (len(self._open), len(self._settling), self._settle_failures)
        paths = list(self.directory.glob("*" + _SUFFIX))
        spares = self.spares  # read after the listing: a spare named before it is one of these
        now, ages = time.time(), []
        for path in paths:
            if path in spares:  # empty, and not yet any association's (ready, or being made)
                continue
            try:
                ages.append(max(now - path.stat().st_mtime, 0.0))
            except FileNotFoundError:  # settled meanwhile
                continue
        return LogStatus(open=counts[0], settling=counts[1], failing=failing, last_error=last_error,
                         settle_failures=counts[2], files=len(ages), oldest_file_age_s=max(ages, default=0.0))

    # -- replay ----------------------------------------------------------------------------

    def orphans(self) -> Iterator[tuple[Path, int]]:
        """Segments whose writer has gone (``(path, fd)``, the fd holding the segment's lock; the caller closes
        it), oldest first. A segment another live process writes is skipped (it holds the lock), and so is one
        this log created. A segment left under its temporary name (its writer stopped before it was renamed, so
        before anything was appended) is deleted. A segment that cannot be opened or locked is logged and skipped,
        and kept in :attr:`unreplayable` (name → why) until the next pass."""
        self.unreplayable = {}
        for tmp in self.directory.glob(".*.tmp"):
            fd = self._lock_orphan(tmp)
            if fd is not None:
                tmp.unlink(missing_ok=True)
                os.close(fd)
        for path in sorted(self.directory.glob(f"*{_SUFFIX}")):
            with self._lock:
                if path in self._mine:
                    continue
            fd = self._lock_orphan(path)
            if fd is None:
                continue
            if not path.exists():  # settled between the open and the lock
                os.close(fd)
                continue
            yield path, fd

    def _lock_orphan(self, path: Path) -> int | None:
        """``path`` opened and locked (its writer has gone), or None (it is gone, or a live writer holds it, or it
        cannot be opened or locked: then in :attr:`unreplayable`)."""
        try:
            # read-write: on NFS the Linux client maps flock onto POSIX locks, and an exclusive one needs it
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("receipt log %s: cannot open it to replay it (%s)", path, exc)
            self.unreplayable[path.name] = f"cannot open it: {exc.strerror or exc}"
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            log.error("receipt log %s: cannot lock it to replay it (%s)", path, exc)
            self.unreplayable[path.name] = f"cannot lock it: {exc.strerror or exc}"
            return None
        return fd

    def forget(self, segment_path: Path) -> None:
        with self._lock:
            self._mine.discard(segment_path)


@dataclass(frozen=True)
class RecordRef:
    """Where one whole record of a segment lies (its CRC checked), and what its description says."""

    segment: Path
    offset: int  #: of the object's bytes (after the header and the description)
    length: int
    description: dict[str, object]

    @property
    def received_at(self) -> float:
        return float(self.description["t"])  # type: ignore[arg-type]


def index_records(path: Path) -> list[RecordRef]:
    """The whole records of a segment, in order, each read once to check its CRC but not kept; stops (with a log
    line) at one cut short or damaged (never acknowledged: its writer stopped while writing it)."""
    refs: list[RecordRef] = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        offset = 0
        while offset < size:
            head = f.read(_HEADER.size)
            magic, crc, meta_length, length = _HEADER.unpack(head) if len(head) == _HEADER.size else (b"", 0, 0, 0)
            end = offset + _HEADER.size + meta_length + length
            if magic != _MAGIC or end > size or not _crc_matches(f, meta_length + length, crc):
                log.warning("receipt log %s: the record at byte %d is cut short or damaged (never acknowledged)",
                            path, offset)
                break
            f.seek(offset + _HEADER.size)
            description = json.loads(f.read(meta_length))
            refs.append(RecordRef(path, offset + _HEADER.size + meta_length, length, description))
            offset = end
            f.seek(offset)
    return refs


def live_records(refs: Sequence[RecordRef]) -> list[RecordRef]:
    """``refs`` without the objects refused when they came (:meth:`ReceiptLog.refusal`) and without the refusal
    records themselves."""
    refused = {(ref.segment, ref.description.get("sop"), ref.description.get("t")) for ref in refs
               if ref.description.get("refused")}
    return [ref for ref in refs if not ref.description.get("refused")
            and (ref.segment, ref.description.get("sop"), ref.description.get("t")) not in refused]


def _framed(description: bytes, parts: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
    """A record: header (magic, CRC-32 of what follows, lengths), description, then ``parts``."""
    crc = zlib.crc32(description)
    length = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
        length += len(part)
    return [_HEADER.pack(_MAGIC, crc, len(description), length), description, *parts]


def _crc_matches(f: BinaryIO, length: int, crc: int) -> bool:
    value = 0
    while length:
        chunk = f.read(min(length, 2**20))
        if not chunk:
            return False
        value = zlib.crc32(chunk, value)
        length -= len(chunk)
    return value == crc


def load_record(ref: RecordRef) -> Receipt:
    """The record ``ref`` points at (checked by :func:`index_records`)."""
    with open(ref.segment, "rb") as f:
        f.seek(ref.offset)
        data = f.read(ref.length)
    d = ref.description
    return Receipt(calling_ae=str(d["ae"]), received_at=ref.received_at, transfer_syntax=str(d["ts"]),
                   sop_class_uid=str(d["class"]), sop_instance_uid=str(d["sop"]), meta_length=int(d["meta"]),  # type: ignore[call-overload]
                   data=data)


def read_records(path: Path) -> Iterator[Receipt]:
    """The whole records of a segment, in order (:func:`index_records`), but for refused objects."""
    for ref in live_records(index_records(path)):
        yield load_record(ref)


def _write_all(fd: int, parts: list[bytes | memoryview]) -> None:
    views = [v for v in (memoryview(p).cast("B") for p in parts) if len(v)]
    while views:
        written = os.writev(fd, views[:64])
        while written:
            if written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][written:]
                written = 0
