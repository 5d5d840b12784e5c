"""The journal: a SQLite (WAL) store of instances, series, jobs and the outbox.

This is the only module with SQL in it; the rest of the node talks to :class:`Journal`. One
connection is shared by all threads behind a lock: SQLite serialises writers anyway, and the
critical path (one INSERT per received instance) is short. Instances that arrive on several
associations at once are group-committed: one transaction (one fsync) for all that queued while
the previous commit was on its way to disk.

State machines
--------------
series: ``receiving`` → ``complete`` (whole, or idle timeout) → ``routed`` | ``ignored``
        (a new instance for a routed/ignored series sets it back to ``receiving``)
job:    ``queued`` → ``running`` → ``written`` → ``sent`` | ``failed``
        (each start of a run counts one attempt; a job found ``running`` at start-up was interrupted
        and is queued again, or failed as quarantined once it has used its attempts). A job that failed
        while running keeps ``failed`` and its reason for good: the "not processed" notice it may queue is
        delivered on its own (:meth:`Journal.record_notice`); only a job failed by its delivery
        (:data:`DELIVERY_FAILED`) is settled again by its outbox or an operator's retry.
outbox: ``pending`` → ``sent`` | ``failed`` (after the last try)
follow-up: ``queued`` → ``running`` → ``done`` | ``failed`` (an optional step of a job that recorded its core
        outputs, queued in the same transaction; its outputs are the job's, its failure is its own and noted
        beside the job's state; interrupted ones are queued again at start-up like jobs)

A stored series is routed again with the current rules (a new version) when an operator asks for it:
:meth:`Journal.request_reprocess` sets it ``complete`` with its version bumped, and the node routes
``complete`` series at start-up and on each sweep.
Retention (``dicom_node.retention``) deletes files in two steps: :meth:`Journal.begin_purge` records, in one
transaction, the files to delete (``purge_files``), removes the series' instance rows (their count is kept
in ``series.purged_instances``) and stamps ``purged_at`` on the series and its jobs; then
:meth:`Journal.finish_purge` deletes each file and its ``purge_files`` row. A crash in between leaves the
intent, which the next sweep (or the next start) finishes. The series, job, produced, output_files and
outbox rows stay: what was received and sent, when and to whom.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .headers import InstanceHeader, ReceivedInstance, SeriesAttributes

if TYPE_CHECKING:
    from .config import NodeConfig


class SeriesState(StrEnum):
    """Where a series stands (``series.state``)."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    ROUTED = "routed"
    IGNORED = "ignored"


class JobState(StrEnum):
    """Where a job stands (``jobs.state``)."""

    QUEUED = "queued"
    RUNNING = "running"
    WRITTEN = "written"
    SENT = "sent"
    FAILED = "failed"


class FollowUpState(StrEnum):
    """Where a follow-up (an optional step of a job, run on its own) stands (``follow_ups.state``)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class OutboxState(StrEnum):
    """Where one outbox item stands (``outbox.state``)."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


#: Version of the schema below; :meth:`Journal._migrate` brings older journals up to it and a journal of a
#: newer version is refused at open (it may hold what this version cannot read).
SCHEMA_VERSION = 6

#: The worker id of the jobs a receiving node (``serve --role all|receiver``) runs itself: there is one such node
#: per data directory (its ``node.lock``), so a claim of this id found ``running`` at its start-up was its own,
#: interrupted by a stop or crash. Worker processes (``serve --role worker``) have ids of their own.
NODE_WORKER = "node"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    series_uid     TEXT PRIMARY KEY,
    study_uid      TEXT NOT NULL,
    patient_id     TEXT NOT NULL DEFAULT '',
    description    TEXT NOT NULL DEFAULT '',
    modality       TEXT NOT NULL DEFAULT '',
    calling_ae     TEXT NOT NULL DEFAULT '',
    attrs          TEXT NOT NULL DEFAULT '{}',
    state          TEXT NOT NULL DEFAULT 'receiving',
    version        INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received  REAL NOT NULL,
    note           TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS series_state ON series(state, last_received);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid       TEXT NOT NULL REFERENCES series(series_uid),
    sop_class_uid    TEXT NOT NULL,
    transfer_syntax  TEXT NOT NULL,
    path             TEXT NOT NULL,
    geometry         TEXT NOT NULL DEFAULT '{}',
    received_at      REAL NOT NULL,
    sha256           TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid    TEXT NOT NULL REFERENCES series(series_uid),
    version       INTEGER NOT NULL,
    rule          TEXT NOT NULL,
    action        TEXT NOT NULL,
    model         TEXT,
    state         TEXT NOT NULL DEFAULT 'queued',
    reason        TEXT NOT NULL DEFAULT '',
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    timings       TEXT NOT NULL DEFAULT '{}',
    attempts      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS produced (
    series_uid TEXT PRIMARY KEY,
    job_id     INTEGER NOT NULL REFERENCES jobs(id),
    kind       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id           INTEGER NOT NULL REFERENCES jobs(id),
    destination      TEXT NOT NULL,
    path             TEXT NOT NULL,
    sop_class_uid    TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    state            TEXT NOT NULL DEFAULT 'pending',
    tries            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL NOT NULL,
    last_error       TEXT NOT NULL DEFAULT '',
    first_failed_at  REAL NOT NULL DEFAULT 0,
    queued_at        REAL NOT NULL DEFAULT 0,
    UNIQUE (destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt_at);
CREATE TABLE IF NOT EXISTS output_files (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id           INTEGER NOT NULL REFERENCES jobs(id),
    kind             TEXT NOT NULL,
    path             TEXT NOT NULL,
    series_uid       TEXT NOT NULL DEFAULT '',
    sop_class_uid    TEXT NOT NULL DEFAULT '',
    sop_instance_uid TEXT NOT NULL DEFAULT '',
    UNIQUE (job_id, path)
);
CREATE INDEX IF NOT EXISTS output_files_job ON output_files(job_id);
CREATE TABLE IF NOT EXISTS follow_ups (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id     INTEGER NOT NULL REFERENCES jobs(id),
    step       TEXT NOT NULL,
    state      TEXT NOT NULL DEFAULT 'queued',
    reason     TEXT NOT NULL DEFAULT '',
    attempts   INTEGER NOT NULL DEFAULT 0,
    seconds    REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (job_id, step)
);
CREATE INDEX IF NOT EXISTS follow_ups_state ON follow_ups(state);
CREATE TABLE IF NOT EXISTS purge_files (
    path             TEXT PRIMARY KEY,
    kind             TEXT NOT NULL,
    series_uid       TEXT NOT NULL DEFAULT '',
    sop_instance_uid TEXT NOT NULL DEFAULT '',
    recorded_at      REAL NOT NULL
);
"""

#: Columns added since schema version 1, as (table, column, definition): a journal written by an
#: older version gets them when it is opened (existing rows take the default).
_ADDED_COLUMNS = [
    ("jobs", "attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("instances", "sha256", "TEXT NOT NULL DEFAULT ''"),  # '' for instances received before
    ("outbox", "first_failed_at", "REAL NOT NULL DEFAULT 0"),  # 0: no failed try yet
    ("jobs", "output_name", "TEXT NOT NULL DEFAULT ''"),  # schema 3; '' for jobs recorded before
    ("jobs", "optional_failed", "TEXT NOT NULL DEFAULT ''"),  # schema 4: optional steps that failed, and why
    ("series", "purged_at", "REAL NOT NULL DEFAULT 0"),  # schema 4: 0: its files were never purged
    ("series", "purged_instances", "INTEGER NOT NULL DEFAULT 0"),  # schema 4: instance rows purged so far
    ("jobs", "purged_at", "REAL NOT NULL DEFAULT 0"),  # schema 4: 0: its outputs are on disk
    ("outbox", "sent_at", "REAL NOT NULL DEFAULT 0"),  # schema 4: 0: not sent (or sent before schema 4)
    ("outbox", "queued_at", "REAL NOT NULL DEFAULT 0"),  # schema 4; filled from next_attempt_at when added
    # schema 6: the claim of a running job or follow-up: which worker runs it, and until when its lease holds
    # ('' and 0 for rows started before: a node's own, taken back at its start-up)
    ("jobs", "worker", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "lease_until", "REAL NOT NULL DEFAULT 0"),
    ("follow_ups", "worker", "TEXT NOT NULL DEFAULT ''"),
    ("follow_ups", "lease_until", "REAL NOT NULL DEFAULT 0"),
]
# Schema 3 also added the table output_files (created by _SCHEMA; jobs recorded before have no rows there),
# schema 4 the table purge_files (files a retention sweep decided to delete and has not deleted yet), schema 5
# the table follow_ups (optional steps run as their own work; jobs recorded before have none).


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str
    header: InstanceHeader
    #: SHA-256 (hex) of the data set as received (without the file meta the node adds); '' if unknown
    sha256: str = ""


@dataclass(frozen=True)
class SeriesRecord:
    series_uid: str
    study_uid: str
    patient_id: str
    description: str
    modality: str
    calling_ae: str
    attributes: SeriesAttributes
    state: SeriesState
    version: int
    first_received: float
    last_received: float
    note: str
    n_instances: int = 0
    #: when retention last deleted the series' files (0: never); its instance rows are then gone and
    #: counted in ``purged_instances``
    purged_at: float = 0.0
    purged_instances: int = 0


@dataclass(frozen=True)
class JobRecord:
    id: int
    series_uid: str
    version: int
    rule: str
    action: str
    model: str | None
    state: JobState
    reason: str
    created_at: float
    updated_at: float
    timings: dict[str, float]
    attempts: int = 0
    #: the rule's output name (``sT1AAH``, ``rT1``) the job wrote under; '' until it recorded its outputs
    output_name: str = ""
    #: optional steps of the last run that failed (``agreement: RuntimeError: ...``; several joined by "; "):
    #: the job's core outputs are delivered all the same, so this is reported beside its state, not as it
    optional_failed: str = ""
    #: when retention deleted the job's output files (0: they are on disk); its journal rows stay
    purged_at: float = 0.0


@dataclass(frozen=True)
class FollowUpRecord:
    """An optional step of a job, run on its own after the job recorded its core outputs (``follow_ups``)."""

    id: int
    job_id: int
    step: str                 # agreement, ...
    state: FollowUpState
    reason: str               # why it failed; for one that is done: what it found ('' when it wrote its output)
    attempts: int
    seconds: float            # how long its last run took
    created_at: float
    updated_at: float


class Claim(NamedTuple):
    """A worker's claim on one run of a job or follow-up: who runs it, and which run (its attempt number).
    Recording the run's end is fenced by it: a worker whose claim was taken over records nothing."""

    worker: str
    attempt: int


class ClaimLost(RuntimeError):
    """The run's claim is no longer held (its lease expired and another worker took the job over)."""


#: The tables of claimable work: a :class:`Task`'s kind → its table.
_CLAIMABLE = {"job": "jobs", "follow_up": "follow_ups"}


#: The reason of a job that failed by its delivery (an outbox item failed for good); any other reason of a
#: ``failed`` job is a failure while it ran, which delivery or a retry of its notice never changes.
DELIVERY_FAILED = "delivery failed after the last try"


class OutputFile(NamedTuple):
    """One file a job wrote: a DICOM object (with its UIDs) or a volume it keeps for a later step."""

    kind: str                 # sT1, SEG, SR, SUMMARY, AGREEMENT, NOT_PROCESSED; T1_VOLUME, LABEL_VOLUME (never sent)
    path: str
    series_uid: str = ""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""


@dataclass(frozen=True)
class OutboxItem:
    id: int
    job_id: int
    destination: str
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    state: OutboxState
    tries: int
    next_attempt_at: float
    last_error: str
    #: when the destination accepted it (0: not sent, or sent before schema 4)
    sent_at: float = 0.0
    #: when the item was queued (or queued again by an operator's retry)
    queued_at: float = 0.0


@dataclass(frozen=True)
class PurgeCandidate:
    """A series whose files a retention sweep may delete now (see :meth:`Journal.purge_candidates`)."""

    series_uid: str
    study_uid: str
    description: str
    state: SeriesState
    #: its instance rows (files in the spool) and its jobs whose outputs are still on disk
    instances: int
    jobs: tuple[int, ...]
    #: True: at least one of its jobs delivered its outputs (``[retention] delivered_days`` applies),
    #: False: not processed (``not_processed_days``)
    delivered: bool
    #: when it last changed: its last instance received, or its last job settled (sent or failed)
    settled_at: float


class PurgeFile(NamedTuple):
    """A file (or an output folder) a retention sweep decided to delete and has not deleted yet."""

    path: str
    kind: str  # "instance" (a spooled received object), "output" (a file a job wrote), "folder" (a job's)
    series_uid: str
    sop_instance_uid: str = ""  # of an instance


#: A series may be purged when none of it is still needed: closed and routed or ignored, no job that may
#: still write or deliver (queued, running, written), no delivery pending or failed for good (an operator's
#: ``retry`` may still send it), no follow-up queued or running (it reads the job's files), something left on
#: disk, and settled (last instance, last job update)
#: before the cutoff of its kind (delivered: ``:delivered_before``, else ``:not_processed_before``).
_PURGEABLE = """
    s.state IN ('routed', 'ignored')
    AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid
                    AND j.state IN ('queued', 'running', 'written'))
    AND NOT EXISTS (SELECT 1 FROM outbox o JOIN jobs j ON o.job_id = j.id
                    WHERE j.series_uid = s.series_uid AND o.state IN ('pending', 'failed'))
    AND NOT EXISTS (SELECT 1 FROM follow_ups f JOIN jobs j ON f.job_id = j.id
                    WHERE j.series_uid = s.series_uid AND f.state IN ('queued', 'running'))
    AND (EXISTS (SELECT 1 FROM instances i WHERE i.series_uid = s.series_uid)
         OR EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid AND j.purged_at = 0))
    AND MAX(s.last_received, COALESCE((SELECT MAX(j.updated_at) FROM jobs j WHERE j.series_uid = s.series_uid), 0))
        < CASE WHEN EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid AND j.state = 'sent')
               THEN :delivered_before ELSE :not_processed_before END
"""


class JournalError(RuntimeError):
    """The journal file cannot be used (not a database, truncated, corrupt); the message says which
    file and what to do."""


@dataclass
class _PendingInstance:
    """An instance waiting for the next group commit; ``done`` once its transaction has ended."""

    fields: dict[str, Any]
    done: bool = False
    is_new: bool = False
    error: BaseException | None = None


class Journal:
    """Durable record of everything the node received, decided and sent."""

    def __init__(self, path: Path, *, fsync: bool = True, read_only: bool = False) -> None:
        """Open (create, upgrade) the journal at ``path``. ``read_only``: open an existing journal for reading only
        (``status``): nothing is created, upgraded or locked for writing; one of another schema version is
        refused (the node upgrades it when it starts)."""
        self.path = Path(path)
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._pending_lock = threading.Lock()
        self._pending: list[_PendingInstance] = []
        try:
            target = f"file:{self.path}?mode=ro" if read_only else str(self.path)
            self._db = sqlite3.connect(target, check_same_thread=False, isolation_level=None, uri=read_only)
        except sqlite3.Error as exc:
            raise self._unusable(str(exc)) from None
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA busy_timeout=10000")
            self._check_integrity()
            if read_only:
                self._check_version()
                return
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before the call returns, which is what lets the SCP acknowledge.
            self._synchronous = "FULL" if fsync else "NORMAL"
            self._db.execute(f"PRAGMA synchronous={self._synchronous}")
            self._private_files()
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise self._unusable(str(exc)) from None
        except JournalError:
            self._db.close()
            raise

    def _private_files(self) -> None:
        """The journal holds patient data (names of series, patient IDs): owner only, whatever the umask."""
        for path in (self.path, self.path.with_name(self.path.name + "-wal"),
                     self.path.with_name(self.path.name + "-shm")):
            try:
                if path.stat().st_mode & 0o077:
                    path.chmod(0o600)
            except FileNotFoundError:
                pass
            except PermissionError:  # e.g. a read-only copy opened for `status`
                pass

    def _unusable(self, problem: str) -> JournalError:
        return JournalError(
            f"journal {self.path} cannot be used: {problem}. Stop the node and restore the file from a "
            f"backup, or move it (with its -wal and -shm files) aside to start an empty journal (the node then "
            f"no longer knows what it received, processed and sent before)"
        )

    def _check_integrity(self) -> None:
        """A quick structural check of an existing file (SQLite's quick_check): a truncated or corrupt
        journal is refused at start-up instead of failing on some later query."""
        rows = self._db.execute("PRAGMA quick_check").fetchall()
        problems = [str(r[0]) for r in rows if str(r[0]) != "ok"]
        if problems:
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise self._unusable(f"integrity check failed: {problems[0]}{more}")

    def _check_version(self) -> None:
        """A journal opened read-only must be of this version's schema (it cannot be upgraded)."""
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = int(row["value"]) if row is not None else 0
        if version > SCHEMA_VERSION:
            raise self._unusable(f"it has schema version {version}, written by a newer dicom-node (this one reads "
                                 f"up to {SCHEMA_VERSION})")
        if version < SCHEMA_VERSION:
            raise JournalError(f"journal {self.path} has schema version {version}, written by an older dicom-node: "
                               f"it is brought up to version {SCHEMA_VERSION} when this version's node starts")

    def _migrate(self) -> None:
        """Bring a journal written by an older version up to :data:`SCHEMA_VERSION` (in place); refuse one
        written by a newer version."""
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is not None and int(row["value"]) > SCHEMA_VERSION:
            raise self._unusable(f"it has schema version {row['value']}, written by a newer dicom-node (this one "
                                 f"reads up to {SCHEMA_VERSION})")
        with self._tx() as db:
            for table, column, definition in _ADDED_COLUMNS:
                have = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                    if (table, column) == ("outbox", "queued_at"):
                        # the best a schema 3 row knows: its next try (its queueing time until a try failed)
                        db.execute("UPDATE outbox SET queued_at = next_attempt_at")
            db.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?)"
                " ON CONFLICT(key) DO UPDATE SET value=excluded.value", (str(SCHEMA_VERSION),)
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def probe_write(self) -> float:
        """Commit one small row (``meta.health_probe``): proves the journal takes writes now (the disk, the file
        and the lock). Returns the seconds it took; raises ``sqlite3.Error`` when it cannot write."""
        t0 = time.perf_counter()
        with self._tx() as db:
            db.execute("INSERT INTO meta(key, value) VALUES ('health_probe', ?)"
                       " ON CONFLICT(key) DO UPDATE SET value=excluded.value", (repr(time.time()),))
        return time.perf_counter() - t0

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction. ``durable=False``: committed without waiting for the disk (synchronous NORMAL in WAL
        mode): it survives a crash or SIGKILL of the node (the WAL is written before the commit returns), not a
        power loss or kernel crash right after it."""
        with self._lock:
            relaxed = not durable and self._synchronous != "NORMAL"
            if relaxed:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                else:
                    self._db.execute("COMMIT")
            finally:
                if relaxed:
                    self._db.execute(f"PRAGMA synchronous={self._synchronous}")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # -- receiving -------------------------------------------------------------------------

    def add_instance(self, instance: ReceivedInstance, *, transfer_syntax: str, path: str, calling_ae: str,
                     sha256: str = "", now: float | None = None) -> bool:
        """Record a received instance; returns False when the SOP Instance UID was already known.

        A new instance for a series that was already closed re-opens it (a late arrival), so the
        series is assembled and processed again as a new version.
        """
        entry = _PendingInstance(dict(
            sop_instance_uid=instance.sop_instance_uid, sop_class_uid=instance.sop_class_uid,
            transfer_syntax=transfer_syntax, path=path, geometry=json.dumps(instance.header.to_json()),
            series_uid=instance.series_uid, study_uid=instance.study_uid, patient_id=instance.patient_id,
            description=instance.series.series_description, modality=instance.series.modality,
            calling_ae=calling_ae, series_attrs=json.dumps(instance.series.to_json()), sha256=sha256,
        ))
        with self._pending_lock:
            # stamped in queue order, so a batch never moves a series' last_received backwards
            entry.fields["now"] = time.time() if now is None else now
            self._pending.append(entry)
        # Group commit: whoever holds the journal lock next commits every instance queued so far in
        # one transaction (one WAL fsync). A caller returns only after the transaction holding its
        # row has committed, so "returned" still means "durable".
        with self._lock:
            if not entry.done:
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                self._commit_instances(batch)
        if entry.error is not None:
            raise entry.error
        return entry.is_new

    def _commit_instances(self, batch: list[_PendingInstance]) -> None:
        """Insert a batch in one transaction; if that fails, each alone (one bad row fails only its caller)."""
        try:
            with self._tx() as db:
                results = [self._insert_instance(db, entry.fields) for entry in batch]
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error, batch[0].done = exc, True
                return
            for entry in batch:
                self._commit_instances([entry])
            return
        for entry, is_new in zip(batch, results, strict=True):
            entry.is_new, entry.done = is_new, True

    @staticmethod
    def _insert_instance(db: sqlite3.Connection, f: dict[str, Any]) -> bool:
        if db.execute("SELECT 1 FROM instances WHERE sop_instance_uid=?", (f["sop_instance_uid"],)).fetchone():
            return False  # a re-send: already filed (under whatever series it came with first)
        row = db.execute("SELECT state FROM series WHERE series_uid=?", (f["series_uid"],)).fetchone()
        if row is None:
            db.execute(
                "INSERT INTO series(series_uid, study_uid, patient_id, description, modality,"
                " calling_ae, attrs, first_received, last_received) VALUES (?,?,?,?,?,?,?,?,?)",
                (f["series_uid"], f["study_uid"], f["patient_id"], f["description"], f["modality"],
                 f["calling_ae"], f["series_attrs"], f["now"], f["now"]),
            )
        cur = db.execute(
            "INSERT OR IGNORE INTO instances(sop_instance_uid, series_uid, sop_class_uid,"
            " transfer_syntax, path, geometry, received_at, sha256) VALUES (?,?,?,?,?,?,?,?)",
            (f["sop_instance_uid"], f["series_uid"], f["sop_class_uid"], f["transfer_syntax"], f["path"],
             f["geometry"], f["now"], f.get("sha256", "")),
        )
        is_new = cur.rowcount == 1
        if is_new and row is not None:
            db.execute(
                "UPDATE series SET last_received=?, state='receiving' WHERE series_uid=?",
                (f["now"], f["series_uid"]),
            )
        return is_new

    def known_paths(self) -> set[str]:
        """The spool path of every journaled instance, and of every file a retention sweep is deleting."""
        return ({r["path"] for r in self._query("SELECT path FROM instances")}
                | {r["path"] for r in self._query("SELECT path FROM purge_files")})

    def confirm_instance(self, sop_instance_uid: str, now: float | None = None) -> bool:
        """A re-send of a known instance is about to be acknowledged without being stored again: True if
        its row is still there, and its series then counts as just received (so no retention sweep
        deletes it now); False if a sweep purged it meanwhile (the caller stores it as new)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute("SELECT series_uid FROM instances WHERE sop_instance_uid=?",
                             (sop_instance_uid,)).fetchone()
            if row is None:
                return False
            db.execute("UPDATE series SET last_received=MAX(last_received, ?) WHERE series_uid=?",
                       (now, row["series_uid"]))
            return True

    @staticmethod
    def _instance(r: sqlite3.Row) -> InstanceRecord:
        return InstanceRecord(r["sop_instance_uid"], r["series_uid"], r["sop_class_uid"], r["transfer_syntax"],
                              r["path"], InstanceHeader.from_json(json.loads(r["geometry"])), r["sha256"])

    def instances(self, series_uid: str) -> list[InstanceRecord]:
        rows = self._query(
            "SELECT * FROM instances WHERE series_uid=? ORDER BY received_at, sop_instance_uid", (series_uid,)
        )
        return [self._instance(r) for r in rows]

    def instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        """The instance filed under ``sop_instance_uid`` (in whatever series it came with), or None."""
        rows = self._query("SELECT * FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,))
        return self._instance(rows[0]) if rows else None

    # -- series ----------------------------------------------------------------------------

    def _series(self, row: sqlite3.Row) -> SeriesRecord:
        keys = row.keys()
        return SeriesRecord(
            series_uid=row["series_uid"], study_uid=row["study_uid"], patient_id=row["patient_id"],
            description=row["description"], modality=row["modality"], calling_ae=row["calling_ae"],
            attributes=SeriesAttributes.from_json(json.loads(row["attrs"])), state=SeriesState(row["state"]),
            version=row["version"],
            first_received=row["first_received"], last_received=row["last_received"], note=row["note"],
            n_instances=row["n"] if "n" in keys else 0, purged_at=row["purged_at"],
            purged_instances=row["purged_instances"],
        )

    def series(self, series_uid: str) -> SeriesRecord | None:
        rows = self._query(
            "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.series_uid=s.series_uid) AS n"
            " FROM series s WHERE series_uid=?", (series_uid,)
        )
        return self._series(rows[0]) if rows else None

    def all_series(self, limit: int = 200) -> list[SeriesRecord]:
        rows = self._query(
            "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.series_uid=s.series_uid) AS n"
            " FROM series s ORDER BY last_received DESC LIMIT ?", (limit,)
        )
        return [self._series(r) for r in rows]

    def recent_studies(self, limit: int = 50, search: str | None = None) -> list[SeriesRecord]:
        """Every series of the ``limit`` studies that received last (newest study first, its series in the order
        they arrived); with ``search``, only studies with a series whose patient ID or accession number contains it
        (case-insensitive)."""
        needle = (search or "").strip().lower() or None
        rows = self._query(
            "WITH studies AS (SELECT study_uid, MAX(last_received) AS last FROM series"
            " WHERE ? IS NULL OR instr(lower(patient_id), ?) > 0"
            " OR instr(lower(COALESCE(json_extract(attrs, '$.AccessionNumber'), '')), ?) > 0"
            " GROUP BY study_uid ORDER BY last DESC LIMIT ?)"
            " SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.series_uid=s.series_uid) AS n"
            " FROM series s JOIN studies t ON t.study_uid = s.study_uid ORDER BY t.last DESC, s.first_received",
            (needle, needle, needle, limit),
        )
        return [self._series(r) for r in rows]

    def series_in_state(self, state: SeriesState, *, idle_before: float | None = None) -> list[SeriesRecord]:
        sql = "SELECT * FROM series WHERE state=?"
        params: list[Any] = [state]
        if idle_before is not None:
            sql += " AND last_received < ?"
            params.append(idle_before)
        return [self._series(r) for r in self._query(sql + " ORDER BY last_received", params)]

    def close_series(self, series_uid: str, *, expected_last_received: float | None = None) -> int | None:
        """Mark a receiving series complete and return its new version (1, 2, ...).

        Returns None when the series is not receiving any more, or when an instance arrived after
        ``expected_last_received`` (the caller's view is stale).
        """
        with self._tx() as db:
            row = db.execute(
                "SELECT state, version, last_received FROM series WHERE series_uid=?", (series_uid,)
            ).fetchone()
            if row is None or row["state"] != SeriesState.RECEIVING:
                return None
            if expected_last_received is not None and row["last_received"] > expected_last_received:
                return None
            version = row["version"] + 1
            db.execute(
                "UPDATE series SET state='complete', version=? WHERE series_uid=?", (version, series_uid)
            )
            return version

    def set_series_state(self, series_uid: str, state: SeriesState, note: str = "") -> None:
        with self._tx() as db:
            db.execute("UPDATE series SET state=?, note=? WHERE series_uid=?", (state, note, series_uid))

    # -- jobs ------------------------------------------------------------------------------

    def _job(self, row: sqlite3.Row) -> JobRecord:
        return JobRecord(
            id=row["id"], series_uid=row["series_uid"], version=row["version"], rule=row["rule"],
            action=row["action"], model=row["model"], state=JobState(row["state"]), reason=row["reason"],
            created_at=row["created_at"], updated_at=row["updated_at"], timings=json.loads(row["timings"]),
            attempts=row["attempts"], output_name=row["output_name"], optional_failed=row["optional_failed"],
            purged_at=row["purged_at"],
        )

    def add_job(self, *, series_uid: str, version: int, rule: str, action: str, model: str | None) -> int:
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO jobs(series_uid, version, rule, action, model, created_at, updated_at)"
                " VALUES (?,?,?,?,?,?,?)",
                (series_uid, version, rule, action, model, now, now),
            )
            db.execute("UPDATE series SET state='routed' WHERE series_uid=?", (series_uid,))
            return int(cur.lastrowid)

    def route_series(self, series_uid: str, version: int, *, rule: str, action: str, model: str | None) -> int | None:
        """Queue the job of a ``complete`` series at ``version`` and mark it routed, in one transaction; None when
        the series is no longer complete at that version (another process routed it first: exactly one job)."""
        now = time.time()
        with self._tx() as db:
            taken = db.execute("UPDATE series SET state='routed' WHERE series_uid=? AND state='complete' AND version=?",
                               (series_uid, version)).rowcount
            if taken != 1:
                return None
            cur = db.execute(
                "INSERT INTO jobs(series_uid, version, rule, action, model, created_at, updated_at)"
                " VALUES (?,?,?,?,?,?,?)",
                (series_uid, version, rule, action, model, now, now),
            )
            return int(cur.lastrowid)

    def ignore_series(self, series_uid: str, version: int, note: str) -> bool:
        """Mark a ``complete`` series at ``version`` not processed (``note``: why); False when another process
        routed it first."""
        with self._tx() as db:
            return db.execute("UPDATE series SET state='ignored', note=? WHERE series_uid=? AND state='complete'"
                              " AND version=?", (note, series_uid, version)).rowcount == 1

    def job(self, job_id: int) -> JobRecord:
        rows = self._query("SELECT * FROM jobs WHERE id=?", (job_id,))
        if not rows:
            raise KeyError(job_id)
        return self._job(rows[0])

    def jobs(self, *, states: Sequence[JobState] | None = None, limit: int = 200) -> list[JobRecord]:
        if states:
            marks = ",".join("?" * len(states))
            rows = self._query(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id", list(states))
        else:
            rows = self._query("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
        return [self._job(r) for r in rows]

    def jobs_in_study(self, study_uid: str) -> list[JobRecord]:
        """Every job of every series in a study, oldest first."""
        rows = self._query(
            "SELECT j.* FROM jobs j JOIN series s ON s.series_uid = j.series_uid WHERE s.study_uid=? ORDER BY j.id",
            (study_uid,),
        )
        return [self._job(r) for r in rows]

    def set_job_state(
        self, job_id: int, state: JobState, reason: str = "", timings: dict[str, float] | None = None
    ) -> None:
        with self._tx() as db:
            if timings is None:
                db.execute(
                    "UPDATE jobs SET state=?, reason=?, updated_at=? WHERE id=?",
                    (state, reason, time.time(), job_id),
                )
            else:
                db.execute(
                    "UPDATE jobs SET state=?, reason=?, updated_at=?, timings=? WHERE id=?",
                    (state, reason, time.time(), json.dumps(timings), job_id),
                )

    def start_job(self, job_id: int) -> int:
        """Mark a job ``running`` and count the attempt; returns how many runs it has started."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state='running', reason='', optional_failed='', attempts=attempts+1, updated_at=?"
                " WHERE id=?",
                (time.time(), job_id),
            )
            row = db.execute("SELECT attempts FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            return int(row["attempts"])

    def recover_jobs(self, max_attempts: int, *, own: str | None = NODE_WORKER,
                     ) -> tuple[list[JobRecord], list[JobRecord]]:
        """At start-up (and on each sweep): (jobs to run again, jobs quarantined now).

        A ``queued`` job is run again as it is. A ``running`` job was interrupted when its claim is ``own``'s
        (the caller's previous life: the node stopped or crashed during it; rows started before schema 6 count
        as the node's) or its lease expired (its worker died or stalled); one claimed by a worker whose lease
        still holds is left to it. An interrupted job is queued again while it has started fewer than
        ``max_attempts`` runs, otherwise it is failed with the reason ``quarantined: interrupted N times``, so a
        job that kills its worker on every run cannot block the queue. ``own=None``: expired leases only.
        """
        with self._tx() as db:
            quarantined = self._requeue_interrupted(db, "jobs", max_attempts, own)
            rows = db.execute("SELECT * FROM jobs WHERE state='queued' ORDER BY id").fetchall()
            resumed = [self._job(r) for r in rows]
            gone = [self._job(r) for r in db.execute(
                f"SELECT * FROM jobs WHERE id IN ({','.join('?' * len(quarantined))}) ORDER BY id", quarantined
            )] if quarantined else []
        return resumed, gone

    @staticmethod
    def _requeue_interrupted(db: sqlite3.Connection, table: str, max_attempts: int, own: str | None) -> list[int]:
        """Queue the interrupted ``running`` rows of ``table`` (jobs, follow_ups: claimed by ``own`` or by no one,
        or with an expired lease) again, or fail those that used their attempts (quarantined); returns the ids
        quarantined."""
        now = time.time()
        quarantined: list[int] = []
        mine = "" if own is None else "worker IN ('', ?) OR "
        for row in db.execute(f"SELECT id, attempts FROM {table} WHERE state='running' AND ({mine}lease_until < ?)",
                              ([] if own is None else [own]) + [now]).fetchall():
            if row["attempts"] >= max_attempts:
                reason = (f"quarantined: interrupted {row['attempts']} times while running (the node "
                          f"stopped or crashed during each run); not run again")
                db.execute(f"UPDATE {table} SET state='failed', reason=?, updated_at=? WHERE id=?",
                           (reason, now, row["id"]))
                quarantined.append(row["id"])
            else:
                reason = f"interrupted during run {row['attempts']} of at most {max_attempts}: queued again"
                db.execute(f"UPDATE {table} SET state='queued', reason=?, updated_at=? WHERE id=?",
                           (reason, now, row["id"]))
        return quarantined

    # -- claims: one worker per run, with a lease -------------------------------------------

    def claim(self, kind: str, task_id: int, worker: str, lease_s: float) -> Claim | None:
        """Claim a ``queued`` job or follow-up (``kind``: "job", "follow_up") for ``worker``: it becomes
        ``running`` with this run counted (a job's reason and optional failures cleared) and a lease until
        ``lease_s`` from now. One atomic UPDATE: of workers racing for the same row exactly one gets it; the
        others (and anyone asking for a row that is not queued) get None."""
        table = _CLAIMABLE[kind]
        clear = ", optional_failed=''" if table == "jobs" else ""
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                f"UPDATE {table} SET state='running', reason=''{clear}, attempts=attempts+1, worker=?,"
                " lease_until=?, updated_at=? WHERE id=? AND state='queued' RETURNING attempts",
                (worker, now + lease_s, now, task_id),
            ).fetchone()
        return None if row is None else Claim(worker, int(row["attempts"]))

    def renew(self, kind: str, task_id: int, claim: Claim, lease_s: float) -> bool:
        """Extend a running claim's lease to ``lease_s`` from now; False when the claim is no longer held."""
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE {_CLAIMABLE[kind]} SET lease_until=? WHERE id=? AND state='running' AND worker=?"
                " AND attempts=?", (time.time() + lease_s, task_id, claim.worker, claim.attempt))
            return cur.rowcount == 1

    @staticmethod
    def _fence(db: sqlite3.Connection, table: str, task_id: int, claim: Claim | None) -> None:
        """Raise :class:`ClaimLost` (rolling back the transaction) unless ``claim`` still holds the row
        (no claim: the caller runs outside the claims, as the tests and the CLI may)."""
        if claim is None:
            return
        held = db.execute(f"SELECT 1 FROM {table} WHERE id=? AND state='running' AND worker=? AND attempts=?",
                          (task_id, claim.worker, claim.attempt)).fetchone()
        if held is None:
            raise ClaimLost(f"{table[:-1].replace('_', '-')} {task_id}: run {claim.attempt} of {claim.worker} "
                            "is no longer its claim (its lease expired and another worker took it over)")

    def expired_claims(self) -> bool:
        """Whether a running job or follow-up has a claim whose lease expired (its worker died or stalled)."""
        now = time.time()
        return bool(self._query("SELECT 1 FROM jobs WHERE state='running' AND lease_until < ? UNION ALL"
                                " SELECT 1 FROM follow_ups WHERE state='running' AND lease_until < ? LIMIT 1",
                                (now, now)))

    def next_queued(self) -> tuple[str, int] | None:
        """The work a worker should claim next: the oldest queued follow-up (short, and its job's delivery waits
        for it), else the oldest queued job; as (kind, id)."""
        for kind, table in (("follow_up", "follow_ups"), ("job", "jobs")):
            rows = self._query(f"SELECT id FROM {table} WHERE state='queued' ORDER BY id LIMIT 1")
            if rows:
                return kind, int(rows[0]["id"])
        return None

    def fail_job(self, job_id: int, reason: str, claim: Claim | None = None) -> None:
        """A run of a job failed: ``failed`` with its reason (fenced by ``claim``: :class:`ClaimLost`)."""
        with self._tx() as db:
            self._fence(db, "jobs", job_id, claim)
            db.execute("UPDATE jobs SET state='failed', reason=?, updated_at=? WHERE id=?",
                       (reason, time.time(), job_id))

    def note_optional_failure(self, job_id: int, step: str, error: str) -> None:
        """Record that an optional step of a job failed (``step: error``), leaving its state alone."""
        with self._tx() as db:
            self._note_optional_failure(db, job_id, step, error)

    @staticmethod
    def _note_optional_failure(db: sqlite3.Connection, job_id: int, step: str, error: str) -> None:
        db.execute(
            "UPDATE jobs SET optional_failed = optional_failed"
            " || CASE WHEN optional_failed = '' THEN '' ELSE '; ' END || ?, updated_at=? WHERE id=?",
            (f"{step}: {error}", time.time(), job_id),
        )

    # -- follow-ups -------------------------------------------------------------------------

    @staticmethod
    def _follow_up(row: sqlite3.Row) -> FollowUpRecord:
        return FollowUpRecord(row["id"], row["job_id"], row["step"], FollowUpState(row["state"]), row["reason"],
                              row["attempts"], row["seconds"], row["created_at"], row["updated_at"])

    def follow_up(self, follow_up_id: int) -> FollowUpRecord:
        rows = self._query("SELECT * FROM follow_ups WHERE id=?", (follow_up_id,))
        if not rows:
            raise KeyError(follow_up_id)
        return self._follow_up(rows[0])

    def follow_ups(self, job_id: int | None = None) -> list[FollowUpRecord]:
        """The follow-ups of one job (or of every job), oldest first."""
        if job_id is None:
            return [self._follow_up(r) for r in self._query("SELECT * FROM follow_ups ORDER BY id")]
        return [self._follow_up(r) for r in self._query("SELECT * FROM follow_ups WHERE job_id=? ORDER BY id",
                                                        (job_id,))]

    def start_follow_up(self, follow_up_id: int) -> int:
        """Mark a follow-up ``running`` and count the attempt; returns how many runs it has started."""
        with self._tx() as db:
            db.execute("UPDATE follow_ups SET state='running', reason='', attempts=attempts+1, updated_at=?"
                       " WHERE id=?", (time.time(), follow_up_id))
            row = db.execute("SELECT attempts FROM follow_ups WHERE id=?", (follow_up_id,)).fetchone()
            if row is None:
                raise KeyError(follow_up_id)
            return int(row["attempts"])

    def finish_follow_up(self, follow_up_id: int, produced: Sequence[tuple[str, str]],
                         items: Sequence[tuple[str, str, str, str]], *, files: Sequence[OutputFile] = (),
                         seconds: float = 0.0, note: str = "", claim: Claim | None = None) -> None:
        """In one transaction: a follow-up's outputs recorded and queued as its job's (:meth:`add_outputs`), its
        time among the job's timings (when it wrote something), and the follow-up ``done`` (``note``: what it
        found when it wrote nothing); fenced by ``claim`` (:class:`ClaimLost`: nothing recorded)."""
        with self._tx() as db:
            self._fence(db, "follow_ups", follow_up_id, claim)
            row = db.execute("SELECT job_id, step FROM follow_ups WHERE id=?", (follow_up_id,)).fetchone()
            if row is None:
                raise KeyError(follow_up_id)
            self._add_outputs(db, row["job_id"], produced, items, files)
            if produced:
                timings = json.loads(db.execute("SELECT timings FROM jobs WHERE id=?",
                                                (row["job_id"],)).fetchone()["timings"])
                timings[row["step"]] = seconds
                db.execute("UPDATE jobs SET timings=? WHERE id=?", (json.dumps(timings), row["job_id"]))
            db.execute("UPDATE follow_ups SET state='done', reason=?, seconds=?, updated_at=? WHERE id=?",
                       (note, seconds, time.time(), follow_up_id))

    def fail_follow_up(self, follow_up_id: int, error: str, claim: Claim | None = None) -> None:
        """A follow-up failed: ``failed`` with its reason, and noted beside its job's state
        (:attr:`JobRecord.optional_failed`); the job's state and its core outputs are left alone. Fenced by
        ``claim`` (:class:`ClaimLost`)."""
        with self._tx() as db:
            self._fence(db, "follow_ups", follow_up_id, claim)
            row = db.execute("SELECT job_id, step FROM follow_ups WHERE id=?", (follow_up_id,)).fetchone()
            if row is None:
                raise KeyError(follow_up_id)
            db.execute("UPDATE follow_ups SET state='failed', reason=?, updated_at=? WHERE id=?",
                       (error, time.time(), follow_up_id))
            self._note_optional_failure(db, row["job_id"], row["step"], error)

    def recover_follow_ups(self, max_attempts: int, *, own: str | None = NODE_WORKER,
                           ) -> tuple[list[FollowUpRecord], list[FollowUpRecord]]:
        """As :meth:`recover_jobs` for jobs: (follow-ups to run again, follow-ups quarantined now; noted beside
        their job's state)."""
        with self._tx() as db:
            quarantined = self._requeue_interrupted(db, "follow_ups", max_attempts, own)
            rows = {r["id"]: self._follow_up(r) for r in db.execute(
                "SELECT * FROM follow_ups WHERE state='queued' OR id IN"
                f" ({','.join('?' * len(quarantined))}) ORDER BY id", quarantined)}
            for follow_up_id in quarantined:
                record = rows[follow_up_id]
                self._note_optional_failure(db, record.job_id, record.step, record.reason)
        resumed = [r for r in rows.values() if r.state == FollowUpState.QUEUED]
        return resumed, [rows[i] for i in quarantined]

    def set_job_timings(self, job_id: int, timings: dict[str, float]) -> None:
        """Store a job's timings without touching its state (the dispatcher may be settling it)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET timings=? WHERE id=?", (json.dumps(timings), job_id))

    def count_versions_sent(self, series_uid: str) -> int:
        rows = self._query("SELECT COUNT(*) AS n FROM jobs WHERE series_uid=?", (series_uid,))
        return int(rows[0]["n"])

    # -- outputs and outbox ----------------------------------------------------------------

    def record_outputs(
        self, job_id: int, produced: Sequence[tuple[str, str]], items: Sequence[tuple[str, str, str, str]], *,
        files: Sequence[OutputFile] = (), output_name: str = "", follow_ups: Sequence[str] = (),
        claim: Claim | None = None,
    ) -> None:
        """In one transaction: the series the job produced ``(series_uid, kind)``, its outbox items
        ``(destination, path, sop_class_uid, sop_instance_uid)``, the files it wrote, the output name it
        wrote under, the job state ``written`` and its ``follow_ups`` (the optional steps' names) queued.
        Fenced by ``claim``: a run whose claim was taken over records nothing (:class:`ClaimLost`)."""
        now = time.time()
        with self._tx() as db:
            self._fence(db, "jobs", job_id, claim)
            self._insert_outputs(db, job_id, produced, items, files, now)
            state = JobState.WRITTEN if items else JobState.SENT
            reason = "" if items else "no destination configured: outputs kept on disk only"
            db.execute(
                "UPDATE jobs SET state=?, reason=?, updated_at=?, output_name=? WHERE id=?",
                (state, reason, now, output_name, job_id),
            )
            db.executemany("INSERT OR IGNORE INTO follow_ups(job_id, step, created_at, updated_at) VALUES (?,?,?,?)",
                           [(job_id, step, now, now) for step in follow_ups])

    def add_outputs(
        self, job_id: int, produced: Sequence[tuple[str, str]], items: Sequence[tuple[str, str, str, str]], *,
        files: Sequence[OutputFile] = (),
    ) -> None:
        """Outputs of a step that ran after :meth:`record_outputs` (an optional step): recorded like those;
        a job already delivered becomes ``written`` again while the new items are pending."""
        with self._tx() as db:
            self._add_outputs(db, job_id, produced, items, files)

    def _add_outputs(self, db: sqlite3.Connection, job_id: int, produced: Sequence[tuple[str, str]],
                     items: Sequence[tuple[str, str, str, str]], files: Sequence[OutputFile]) -> None:
        now = time.time()
        self._insert_outputs(db, job_id, produced, items, files, now)
        if items:
            db.execute("UPDATE jobs SET state='written', reason='', updated_at=? WHERE id=? AND state='sent'",
                       (now, job_id))

    def record_notice(
        self, job_id: int, produced: Sequence[tuple[str, str]], items: Sequence[tuple[str, str, str, str]], *,
        files: Sequence[OutputFile] = (),
    ) -> None:
        """The "not processed" notice of a job that failed: recorded (produced: the loop guard knows it) and queued
        like any output, in one transaction; the job stays ``failed`` with its reason."""
        with self._tx() as db:
            self._insert_outputs(db, job_id, produced, items, files, time.time())

    @staticmethod
    def _insert_outputs(db: sqlite3.Connection, job_id: int, produced: Sequence[tuple[str, str]],
                        items: Sequence[tuple[str, str, str, str]], files: Sequence[OutputFile], now: float) -> None:
        db.executemany(
            "INSERT OR IGNORE INTO produced(series_uid, job_id, kind) VALUES (?,?,?)",
            [(uid, job_id, kind) for uid, kind in produced],
        )
        db.executemany(
            "INSERT OR IGNORE INTO outbox(job_id, destination, path, sop_class_uid, sop_instance_uid,"
            " next_attempt_at, queued_at) VALUES (?,?,?,?,?,?,?)",
            [(job_id, dest, path, cls, uid, now, now) for dest, path, cls, uid in items],
        )
        db.executemany(
            "INSERT OR REPLACE INTO output_files(job_id, kind, path, series_uid, sop_class_uid, sop_instance_uid)"
            " VALUES (?,?,?,?,?,?)",
            [(job_id, *f) for f in files],
        )

    def output_files(self, job_id: int, kind: str | None = None) -> list[OutputFile]:
        """The files a job recorded (of one kind), in the order written."""
        sql, params = "SELECT * FROM output_files WHERE job_id=?", [job_id]
        if kind is not None:
            sql += " AND kind=?"
            params.append(kind)
        rows = self._query(sql + " ORDER BY id", params)
        return [OutputFile(r["kind"], r["path"], r["series_uid"], r["sop_class_uid"], r["sop_instance_uid"])
                for r in rows]

    def is_produced(self, series_uid: str) -> bool:
        return bool(self._query("SELECT 1 FROM produced WHERE series_uid=?", (series_uid,)))

    def destinations_of(self, job_id: int) -> list[str]:
        """The destinations a job's outputs were queued to, in the order they were."""
        rows = self._query("SELECT destination FROM outbox WHERE job_id=? GROUP BY destination ORDER BY MIN(id)",
                           (job_id,))
        return [r["destination"] for r in rows]

    def produced_by(self, job_id: int) -> list[tuple[str, str]]:
        rows = self._query("SELECT series_uid, kind FROM produced WHERE job_id=?", (job_id,))
        return [(r["series_uid"], r["kind"]) for r in rows]

    def _item(self, row: sqlite3.Row) -> OutboxItem:
        return OutboxItem(
            id=row["id"], job_id=row["job_id"], destination=row["destination"], path=row["path"],
            sop_class_uid=row["sop_class_uid"], sop_instance_uid=row["sop_instance_uid"],
            state=OutboxState(row["state"]),
            tries=row["tries"], next_attempt_at=row["next_attempt_at"], last_error=row["last_error"],
            sent_at=row["sent_at"],
            queued_at=row["queued_at"],
        )

    def due_items(self, now: float | None = None) -> list[OutboxItem]:
        now = time.time() if now is None else now
        rows = self._query(
            "SELECT * FROM outbox WHERE state='pending' AND next_attempt_at <= ? ORDER BY job_id, id", (now,)
        )
        return [self._item(r) for r in rows]

    def outbox(self, job_id: int | None = None) -> list[OutboxItem]:
        if job_id is None:
            rows = self._query("SELECT * FROM outbox ORDER BY id")
        else:
            rows = self._query("SELECT * FROM outbox WHERE job_id=? ORDER BY id", (job_id,))
        return [self._item(r) for r in rows]

    def mark_sent(self, item_ids: Sequence[int], *, durable: bool = True) -> None:
        """Items acknowledged by their destination. ``durable=False`` (the C-STORE dispatcher, one commit per
        object): not synced to disk, so a SIGKILL of the node never makes it send them again, but a power loss
        right after may (the destination then gets the same SOP Instance again, which a PACS files once)."""
        with self._tx(durable=durable) as db:
            now = time.time()
            db.executemany("UPDATE outbox SET state='sent', last_error='', sent_at=? WHERE id=?",
                           [(now, i) for i in item_ids])
            self._settle_jobs(db, item_ids)

    def mark_failed_try(
        self, item_ids: Sequence[int], error: str, *,
        next_attempt: Callable[[int, float, float], float | None], now: float | None = None,
    ) -> list[OutboxItem]:
        """Count one failed try and ask the retry policy (the dispatcher's) when to try next:
        ``next_attempt(tries, first_failed_at, now)`` gives a time, or None to fail for good. Returns the
        items that failed for good now."""
        now = time.time() if now is None else now
        given_up: list[int] = []
        with self._tx() as db:
            for item_id in item_ids:
                row = db.execute("SELECT tries, first_failed_at FROM outbox WHERE id=?", (item_id,)).fetchone()
                tries = row["tries"] + 1
                first = row["first_failed_at"] or now
                when = next_attempt(tries, first, now)
                if when is None:
                    db.execute(
                        "UPDATE outbox SET state='failed', tries=?, last_error=?, first_failed_at=? WHERE id=?",
                        (tries, error, first, item_id),
                    )
                    given_up.append(item_id)
                else:
                    db.execute(
                        "UPDATE outbox SET tries=?, last_error=?, next_attempt_at=?, first_failed_at=? WHERE id=?",
                        (tries, error, when, first, item_id),
                    )
            self._settle_jobs(db, item_ids)
            if not given_up:
                return []
            rows = db.execute(f"SELECT * FROM outbox WHERE id IN ({','.join('?' * len(given_up))}) ORDER BY id",
                              given_up).fetchall()
            return [self._item(r) for r in rows]

    def retry_failed(self, destination: str | None = None, *, job_id: int | None = None) -> int:
        """Put permanently failed items back in the queue (an operator's decision): all of them, those of one
        destination and/or those of one job. Returns how many."""
        with self._tx() as db:
            now = time.time()
            sql = ("UPDATE outbox SET state='pending', tries=0, first_failed_at=0, next_attempt_at=?, queued_at=?"
                   " WHERE state='failed'")
            params: list[Any] = [now, now]
            if destination:
                sql += " AND destination=?"
                params.append(destination)
            if job_id is not None:
                sql += " AND job_id=?"
                params.append(job_id)
            n = db.execute(sql, params).rowcount
            db.execute(
                "UPDATE jobs SET state='written' WHERE state='failed' AND reason=? AND id IN"
                " (SELECT job_id FROM outbox WHERE state='pending')", (DELIVERY_FAILED,)
            )
            return n

    @staticmethod
    def _settle_jobs(db: sqlite3.Connection, item_ids: Sequence[int]) -> None:
        if not item_ids:
            return
        marks = ",".join("?" * len(item_ids))
        job_ids = [r["job_id"] for r in db.execute(
            f"SELECT DISTINCT job_id FROM outbox WHERE id IN ({marks})", list(item_ids)
        )]
        for job_id in job_ids:
            job = db.execute("SELECT state, reason FROM jobs WHERE id=?", (job_id,)).fetchone()
            if job is not None and job["state"] == JobState.FAILED and job["reason"] != DELIVERY_FAILED:
                continue  # failed while it ran: its notice is delivered, the job stays failed with its reason
            states = {r["state"] for r in db.execute("SELECT state FROM outbox WHERE job_id=?", (job_id,))}
            if states == {OutboxState.SENT}:
                db.execute("UPDATE jobs SET state='sent', reason='', updated_at=? WHERE id=?", (time.time(), job_id))
            elif OutboxState.PENDING not in states and OutboxState.FAILED in states:
                db.execute("UPDATE jobs SET state='failed', reason=?, updated_at=? WHERE id=?",
                           (DELIVERY_FAILED, time.time(), job_id))

    # -- reprocessing ----------------------------------------------------------------------

    def request_reprocess(self, *, series_uid: str | None = None, study_uid: str | None = None,
                          patient_id: str | None = None) -> list[str]:
        """Mark stored series to be routed again with the current rules, as a new version; returns their UIDs.

        Exactly one selector: a series, every series of a study, or of a patient (PatientID). A series that was
        routed or ignored becomes ``complete`` with its version bumped (its outputs are then named ``v2``, ...),
        and the node routes it on its next sweep (or at its next start). Left alone: the node's own outputs
        (``produced``), series still receiving (they close and are routed by themselves), series already
        waiting to be routed, series with a job queued or running, and series with no instance on disk (retention
        deleted them; a series received again after that has its new instances and is reprocessed).
        """
        selectors = {"series_uid": series_uid, "study_uid": study_uid, "patient_id": patient_id}
        given = {k: v for k, v in selectors.items() if v}
        if len(given) != 1:
            raise ValueError("request_reprocess needs exactly one of series_uid, study_uid, patient_id")
        ((column, value),) = given.items()
        with self._tx() as db:
            rows = db.execute(
                f"SELECT series_uid FROM series WHERE {column}=? AND state IN ('routed', 'ignored')"
                " AND EXISTS (SELECT 1 FROM instances i WHERE i.series_uid = series.series_uid)"
                " AND series_uid NOT IN (SELECT series_uid FROM produced)"
                " AND series_uid NOT IN (SELECT series_uid FROM jobs WHERE state IN ('queued', 'running'))"
                " ORDER BY first_received, series_uid", (value,)
            ).fetchall()
            marked = [r["series_uid"] for r in rows]
            db.executemany(
                "UPDATE series SET state='complete', version=version+1, note=? WHERE series_uid=?",
                [(f"reprocess requested {time.strftime('%Y-%m-%d %H:%M:%S')}", uid) for uid in marked],
            )
        return marked

    # -- retention -------------------------------------------------------------------------

    def purge_candidates(self, *, delivered_before: float, not_processed_before: float) -> list[PurgeCandidate]:
        """Series whose files may be deleted now (the conditions: :data:`_PURGEABLE`), oldest first."""
        rows = self._query(
            "SELECT s.series_uid, s.study_uid, s.description, s.state,"
            " (SELECT COUNT(*) FROM instances i WHERE i.series_uid = s.series_uid) AS n,"
            " (SELECT GROUP_CONCAT(j.id) FROM jobs j WHERE j.series_uid = s.series_uid AND j.purged_at = 0) AS jobs,"
            " EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid AND j.state = 'sent') AS delivered,"
            " MAX(s.last_received, COALESCE((SELECT MAX(j.updated_at) FROM jobs j"
            "     WHERE j.series_uid = s.series_uid), 0)) AS settled"
            f" FROM series s WHERE {_PURGEABLE} ORDER BY settled",
            {"delivered_before": delivered_before, "not_processed_before": not_processed_before},
        )
        return [PurgeCandidate(r["series_uid"], r["study_uid"], r["description"], SeriesState(r["state"]), r["n"],
                               tuple(int(j) for j in (r["jobs"] or "").split(",") if j), bool(r["delivered"]),
                               r["settled"]) for r in rows]

    def begin_purge(self, series_uid: str, *, delivered_before: float, not_processed_before: float,
                    job_folder: Callable[[int], str], now: float | None = None) -> list[PurgeFile] | None:
        """Decide to delete a series' files, in one transaction: checks again that it may be purged (None if
        not any more: it was received again, reprocessed, ...), records every file to delete in
        ``purge_files`` (its instances, and its jobs' output files and folders ``job_folder(job_id)``),
        removes its instance rows (counted in ``series.purged_instances``) and stamps ``purged_at`` on it
        and its jobs. The files are deleted afterwards by :meth:`finish_purge`."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(f"SELECT 1 FROM series s WHERE s.series_uid = :uid AND {_PURGEABLE}",
                             {"uid": series_uid, "delivered_before": delivered_before,
                              "not_processed_before": not_processed_before}).fetchone()
            if row is None:
                return None
            files = [PurgeFile(r["path"], "instance", series_uid, r["sop_instance_uid"]) for r in db.execute(
                "SELECT path, sop_instance_uid FROM instances WHERE series_uid=?", (series_uid,))]
            job_ids = [r["id"] for r in db.execute(
                "SELECT id FROM jobs WHERE series_uid=? AND purged_at=0 ORDER BY id", (series_uid,))]
            for job_id in job_ids:
                folder = job_folder(job_id)
                files.append(PurgeFile(folder, "folder", series_uid))
                inside = folder.rstrip("/") + "/"
                outputs = {r["path"] for r in db.execute(
                    "SELECT path FROM output_files WHERE job_id=? UNION SELECT path FROM outbox WHERE job_id=?",
                    (job_id, job_id))}
                files += [PurgeFile(path, "output", series_uid) for path in sorted(outputs)
                          if not path.startswith(inside)]
            db.executemany(
                "INSERT OR REPLACE INTO purge_files(path, kind, series_uid, sop_instance_uid, recorded_at)"
                " VALUES (?,?,?,?,?)",
                [(f.path, f.kind, f.series_uid, f.sop_instance_uid, now) for f in files],
            )
            n = db.execute("DELETE FROM instances WHERE series_uid=?", (series_uid,)).rowcount
            db.execute("UPDATE series SET purged_at=?, purged_instances=purged_instances+? WHERE series_uid=?",
                       (now, n, series_uid))
            db.executemany("UPDATE jobs SET purged_at=? WHERE id=?", [(now, j) for j in job_ids])
            return files

    def pending_purges(self, limit: int = 1000) -> list[PurgeFile]:
        """Files a sweep decided to delete and has not deleted yet (an interrupted sweep's, or the current one's)."""
        rows = self._query("SELECT path, kind, series_uid, sop_instance_uid FROM purge_files"
                           " ORDER BY recorded_at, path LIMIT ?", (limit,))
        return [PurgeFile(r["path"], r["kind"], r["series_uid"], r["sop_instance_uid"]) for r in rows]

    def finish_purge(self, files: Sequence[PurgeFile], remove: Callable[[PurgeFile], None]) -> list[PurgeFile]:
        """Delete ``files`` (``remove`` each) and their ``purge_files`` rows, in one transaction; returns the
        files kept because an instance row points at them again (the same SOP Instance UID was received
        again after its series was purged: the file at that path is the new copy).

        The file is removed while the transaction holds the journal's write lock: a C-STORE filing the same
        path commits its row either before (the file is kept) or after (the SCP finds its file gone and
        writes it again before it answers, see ``StorageSCP._store``). If ``remove`` raises, nothing of the
        batch is forgotten: the next sweep removes what is left (``remove`` must accept a missing file)."""
        kept: list[PurgeFile] = []
        with self._tx() as db:
            for f in files:
                if f.kind == "instance" and db.execute(  # the path is made of the UIDs: same path, same UID
                        "SELECT 1 FROM instances WHERE sop_instance_uid=? AND path=?",
                        (f.sop_instance_uid, f.path)).fetchone():
                    kept.append(f)
                else:
                    remove(f)
                db.execute("DELETE FROM purge_files WHERE path=?", (f.path,))
        return kept

    def outbox_summary(self) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT destination, state, COUNT(*) AS n, MAX(tries) AS max_tries, MAX(last_error) AS last_error,"
            " MIN(next_attempt_at) AS next_at, MIN(queued_at) AS oldest_queued_at"
            " FROM outbox GROUP BY destination, state ORDER BY destination, state"
        )
        return [dict(r) for r in rows]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for table in ("series", "jobs", "outbox", "follow_ups"):
            rows = self._query(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")
            out[table] = {r["state"]: r["n"] for r in rows}
        out["instances"] = {"total": self._query("SELECT COUNT(*) AS n FROM instances")[0]["n"]}
        purged = self._query("SELECT COUNT(*) AS n, COALESCE(SUM(purged_instances), 0) AS i FROM series"
                             " WHERE purged_at > 0")[0]
        out["purged"] = {"series": purged["n"], "instances": purged["i"]}
        return out


def journal_path(config: NodeConfig) -> Path:
    """Where the embedded (SQLite) journal of this configuration lives."""
    return config.node.data_dir / "journal.sqlite3"


def open_journal(config: NodeConfig, *, read_only: bool = False) -> Journal:
    """The journal this configuration names: every process (receiver, worker, command) opens it through here."""
    if read_only:
        return Journal(journal_path(config), read_only=True)
    return Journal(journal_path(config), fsync=config.node.fsync)
