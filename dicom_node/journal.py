"""The journal: a SQLite (WAL) or PostgreSQL store of instances, series, jobs and the outbox.

This is the only module with SQL in it (its database seam is :mod:`dicom_node.journal_sql`); the rest of the
node talks to :class:`Journal`, opened by :func:`open_journal` from ``[journal]`` (the embedded SQLite file in
``data_dir`` by default; a PostgreSQL database shared by several processes on several machines). One
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
outbox: ``pending`` → ``sent`` | ``failed`` (after the last try); a pending item may be claimed by one dispatcher
        with a lease (:meth:`Journal.claim_outbox`), its outcome fenced by that claim
follow-up: ``queued`` → ``running`` → ``done`` | ``failed`` (an optional step of a job that recorded its core
        outputs, queued in the same transaction; its outputs are the job's, its failure is its own and noted
        beside the job's state; interrupted ones are queued again at start-up like jobs)

A stored series is routed again with the current rules (a new version) when an operator asks for it:
:meth:`Journal.request_reprocess` sets it ``complete`` with its version bumped, and the node routes
``complete`` series at start-up and on each sweep.
Retention (``dicom_node.retention``) deletes files in two steps: :meth:`Journal.begin_purge` records, in one
transaction, the files to delete (``purge_files``), removes the series' instance rows (their count is kept
in ``series.purged_instances``) and stamps ``purged_at`` on the series and its jobs; then
:meth:`Journal.finish_purge` deletes each file and its ``purge_files`` row (job folders and output files before
its transaction, instance files inside it). A crash in between leaves the
intent, which the next sweep (or the next start) finishes. The series, job, produced, output_files and
outbox rows stay: what was received and sent, when and to whom.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .headers import InstanceHeader, ReceivedInstance, SeriesAttributes
from .journal_sql import Connection, PostgresConnection, PostgresTarget, SQLiteConnection, connection_errors

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
SCHEMA_VERSION = 7

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
    # schema 7: the claim of an outbox item by a dispatcher: who, until when, and which claim (fences its outcome)
    ("outbox", "worker", "TEXT NOT NULL DEFAULT ''"),
    ("outbox", "lease_until", "REAL NOT NULL DEFAULT 0"),
    ("outbox", "claim_token", "TEXT NOT NULL DEFAULT ''"),
]
# Schema 4 also added jobs.optional_failed (optional steps that failed, and why), which schema 7 drops: it is
# derived from the failed follow_ups (schema 5) where it is read; a schema 4-6 text is kept as a failed follow-up.
# Schema 3 also added the table output_files (created by _SCHEMA; jobs recorded before have no rows there),
# schema 4 the table purge_files (files a retention sweep decided to delete and has not deleted yet), schema 5
# the table follow_ups (optional steps run as their own work; jobs recorded before have none).

#: The advisory lock (a PostgreSQL journal) under which a process starting creates the schema.
_SCHEMA_LOCK = 0x64636D6E  # "dcmn"


def postgresql_schema() -> list[str]:
    """The current schema's statements for PostgreSQL (a new shared journal starts there): the SQLite schema with
    identity keys, double precision times, byte-wise ordered text (``COLLATE "C"``, as SQLite compares), and
    every column added since (``IF NOT EXISTS``: run on a journal of an older version, they add what it lacks;
    a column SQLite dropped, ``jobs.optional_failed``, is never made)."""
    def types(sql: str) -> str:
        return re.sub(r"\bTEXT\b", 'TEXT COLLATE "C"', re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql))

    ddl = types(_SCHEMA.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "INTEGER GENERATED BY DEFAULT AS IDENTITY"
                                " PRIMARY KEY"))
    statements = [s.strip() for s in ddl.split(";") if s.strip()]
    for table, column, definition in _ADDED_COLUMNS:
        definition = types(definition)
        statements.append(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {definition}")
    return statements


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
    #: the dispatcher that claimed it last ('' never claimed) and until when its lease holds (0: released)
    worker: str = ""
    lease_until: float = 0.0


class OutboxClaim(NamedTuple):
    """A dispatcher's claim on pending outbox items of one destination (:meth:`Journal.claim_outbox`): recording
    their outcome is fenced by ``token`` (unique to this claim), so a dispatcher whose claim expired and was taken
    over records nothing."""

    worker: str
    token: str
    destination: str
    items: list[OutboxItem]


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
    AND GREATEST(s.last_received, COALESCE((SELECT MAX(j.updated_at) FROM jobs j WHERE j.series_uid = s.series_uid), 0))
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
    durable: bool = True
    done: bool = False
    is_new: bool = False
    error: BaseException | None = None


class Journal:
    """Durable record of everything the node received, decided and sent."""

    def __init__(self, path: Path | str | PostgresTarget, *, fsync: bool = True, read_only: bool = False) -> None:
        """Open (create, upgrade) the journal at ``path``: a SQLite file, or a PostgreSQL database
        (:class:`PostgresTarget`, see :func:`open_journal`). ``read_only``: open an existing journal for reading
        only (``status``): nothing is created, upgraded or locked for writing; one of another schema version is
        refused (the node upgrades it when it starts)."""
        self._lock = threading.RLock()
        self._pending_lock = threading.Lock()
        self._pending: list[_PendingInstance] = []
        #: the SQLite file, or the PostgreSQL conninfo without its password (for messages)
        self.path: Path | str = PostgresConnection.describe(path) if isinstance(path, PostgresTarget) else Path(path)
        if isinstance(path, PostgresTarget):
            self._db: Connection = self._open_postgresql(path, fsync=fsync, read_only=read_only)
            return
        self._db = self._open_sqlite(self.path, fsync=fsync, read_only=read_only)

    def _open_sqlite(self, path: Path, *, fsync: bool, read_only: bool) -> SQLiteConnection:
        if not read_only:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = SQLiteConnection(path, read_only=read_only)
        except sqlite3.Error as exc:
            raise self._unusable(str(exc)) from None
        self._db = db
        try:
            db.db.execute("PRAGMA busy_timeout=10000")
            self._check_integrity()
            if read_only:
                self._check_version()
                return db
            db.db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before the call returns, which is what lets the SCP acknowledge.
            db.synchronous = "FULL" if fsync else "NORMAL"
            db.db.execute(f"PRAGMA synchronous={db.synchronous}")
            self._private_files()
            db.db.execute("PRAGMA foreign_keys=ON")
            db.db.executescript(_SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as exc:
            db.close()
            raise self._unusable(str(exc)) from None
        except JournalError:
            db.close()
            raise
        return db

    def _open_postgresql(self, target: PostgresTarget, *, fsync: bool, read_only: bool) -> PostgresConnection:
        """Connect to a PostgreSQL journal; unless ``read_only``, create its schema when the database is empty
        (a new shared journal starts at the current schema), or add what an older version's lacks, under an
        advisory lock, so processes starting together do it once. A journal of the current version is left
        alone (the role then needs no CREATE privilege)."""
        try:
            db = PostgresConnection(target, read_only=read_only, fsync=fsync)
        except ImportError:
            raise JournalError("a PostgreSQL journal needs psycopg 3: install dicom-node[scale] "
                               "(pip install 'psycopg[binary]')") from None
        except connection_errors() as exc:
            raise JournalError(f"journal {PostgresConnection.describe(target)} cannot be used: cannot connect: "
                               f"{str(exc).strip()}") from None
        self._db = db
        try:
            if read_only:
                self._check_version()
            elif self._schema_version(db) != SCHEMA_VERSION:
                with self._tx() as tx:
                    tx.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
                    self._refuse_newer(tx)
                    for statement in postgresql_schema():
                        tx.execute(statement)
                    self._store_version(tx)
        except connection_errors() as exc:
            db.close()
            raise JournalError(f"journal {db.where} cannot be used: {str(exc).strip()}") from None
        except JournalError:
            db.close()
            raise
        return db

    def _private_files(self) -> None:
        """The journal holds patient data (names of series, patient IDs): owner only, whatever the umask."""
        main = Path(self.path)
        for path in (main, main.with_name(main.name + "-wal"), main.with_name(main.name + "-shm")):
            try:
                if path.stat().st_mode & 0o077:
                    path.chmod(0o600)
            except FileNotFoundError:
                pass
            except PermissionError:  # e.g. a read-only copy opened for `status`
                pass

    def _unusable(self, problem: str) -> JournalError:
        if self._db_dialect() == "postgresql":
            return JournalError(f"journal {self.path} cannot be used: {problem}")
        return JournalError(
            f"journal {self.path} cannot be used: {problem}. Stop the node and restore the file from a "
            f"backup, or move it (with its -wal and -shm files) aside to start an empty journal (the node then "
            f"no longer knows what it received, processed and sent before)"
        )

    def _db_dialect(self) -> str:
        db = getattr(self, "_db", None)
        return "sqlite" if db is None else db.dialect

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._db.dialect

    def _check_integrity(self) -> None:
        """A quick structural check of an existing file (SQLite's quick_check): a truncated or corrupt
        journal is refused at start-up instead of failing on some later query. (A PostgreSQL server checks its
        own pages; the node checks that it can connect and the schema version.)"""
        rows = self._db.execute("PRAGMA quick_check").fetchall()
        problems = [str(r[0]) for r in rows if str(r[0]) != "ok"]
        if problems:
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise self._unusable(f"integrity check failed: {problems[0]}{more}")

    def _schema_version(self, db: Connection) -> int | None:
        """The stored schema version; None when the journal has no schema yet (a new PostgreSQL database)."""
        if db.dialect == "postgresql" and db.execute("SELECT to_regclass('meta') AS t").fetchone()["t"] is None:
            return None
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return None if row is None else int(row["value"])

    def _refuse_newer(self, db: Connection) -> None:
        version = self._schema_version(db)
        if version is not None and version > SCHEMA_VERSION:
            raise self._unusable(f"it has schema version {version}, written by a newer dicom-node (this one "
                                 f"reads up to {SCHEMA_VERSION})")

    def _check_version(self) -> None:
        """A journal opened read-only must be of this version's schema (it cannot be upgraded)."""
        version = self._schema_version(self._db) or 0
        if version > SCHEMA_VERSION:
            raise self._unusable(f"it has schema version {version}, written by a newer dicom-node (this one reads "
                                 f"up to {SCHEMA_VERSION})")
        if version < SCHEMA_VERSION:
            raise JournalError(f"journal {self.path} has schema version {version}, written by an older dicom-node: "
                               f"it is brought up to version {SCHEMA_VERSION} when this version's node starts")

    def _migrate(self) -> None:
        """Bring a SQLite journal written by an older version up to :data:`SCHEMA_VERSION` (in place); refuse one
        written by a newer version."""
        self._refuse_newer(self._db)
        with self._tx() as db:
            for table, column, definition in _ADDED_COLUMNS:
                have = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                    if (table, column) == ("outbox", "queued_at"):
                        # the best a schema 3 row knows: its next try (its queueing time until a try failed)
                        db.execute("UPDATE outbox SET queued_at = next_attempt_at")
            self._drop_optional_failed(db)
            self._store_version(db)

    @staticmethod
    def _drop_optional_failed(db: Connection) -> None:
        """Schema 7: ``jobs.optional_failed`` (schemas 4-6) is derived from the failed follow-ups now. A text that no
        failed follow-up of its job holds (written before schema 5) is kept as one failed follow-up (``step``: the
        text before its first ": ", ``reason``: the rest), which reads back as the same text; then the column goes
        (SQLite 3.35 and later; an older SQLite keeps the column, unused)."""
        if "optional_failed" not in {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}:
            return
        rows = db.execute("SELECT id, optional_failed, updated_at FROM jobs WHERE optional_failed != '' AND NOT EXISTS"
                          " (SELECT 1 FROM follow_ups f WHERE f.job_id = jobs.id AND f.state = 'failed')").fetchall()
        for row in rows:
            step, _, reason = str(row["optional_failed"]).partition(": ")
            db.execute("INSERT INTO follow_ups(job_id, step, state, reason, created_at, updated_at)"
                       " VALUES (?,?,'failed',?,?,?) ON CONFLICT DO NOTHING",
                       (row["id"], step, reason, row["updated_at"], row["updated_at"]))
        if sqlite3.sqlite_version_info >= (3, 35):
            db.execute("ALTER TABLE jobs DROP COLUMN optional_failed")

    @staticmethod
    def _store_version(db: Connection) -> None:
        db.execute(
            "INSERT INTO meta(key, value) VALUES ('schema_version', ?)"
            " ON CONFLICT(key) DO UPDATE SET value=excluded.value", (str(SCHEMA_VERSION),)
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def probe_write(self) -> float:
        """Commit one small row (``meta.health_probe``): proves the journal takes writes now (the disk, the file
        and the lock, or the PostgreSQL server). Returns the seconds it took; raises the database's error
        (``sqlite3.Error``, ``psycopg.Error``: :func:`dicom_node.journal_sql.connection_errors`) when it cannot
        write."""
        t0 = time.perf_counter()
        self._stamp("health_probe")
        return time.perf_counter() - t0

    def connection_epoch(self) -> int:
        """A number that changes whenever the journal connects to its database again (PostgreSQL, after the
        server restarted or the network dropped; the embedded journal never does): what was committed without
        waiting for the disk before it may be lost (:class:`dicom_node.receipts.ReceiptLog`)."""
        return int(getattr(self._db, "epoch", 0))

    def sync(self) -> None:
        """One durable commit (``meta.synced``): every transaction committed before it, durable or not, is on disk
        when it returns (SQLite's WAL and PostgreSQL's WAL are written in commit order)."""
        self._stamp("synced")

    def _stamp(self, key: str) -> None:
        """Commit the time under ``meta.key``, durably."""
        with self._tx() as db:
            db.execute("INSERT INTO meta(key, value) VALUES (?, ?)"
                       " ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, repr(time.time())))

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[Connection]:
        """One write transaction (SQLite: ``BEGIN IMMEDIATE``, one writer at a time; PostgreSQL: READ COMMITTED,
        the rows read to decide a write locked ``FOR UPDATE``). ``durable=False``: committed without waiting for
        the disk: it survives a crash or SIGKILL of the node, not a power loss or kernel crash right after it."""
        with self._lock:
            self._db.begin(durable=durable)
            try:
                yield self._db
            except BaseException:
                self._db.rollback()
                raise
            else:
                self._db.commit()

    def _query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # -- receiving -------------------------------------------------------------------------

    def add_instance(self, instance: ReceivedInstance, *, transfer_syntax: str, path: str, calling_ae: str,
                     sha256: str = "", now: float | None = None, durable: bool = True) -> bool:
        """Record a received instance; returns False when the SOP Instance UID was already known.

        ``durable=False``: the commit does not wait for the disk (the SCP's receipt log holds the object, and a
        later :meth:`sync` makes the row durable; :mod:`dicom_node.receipts`).

        A new instance for a series that was already closed re-opens it (a late arrival), so the
        series is assembled and processed again as a new version.
        """
        entry = _PendingInstance(dict(
            sop_instance_uid=instance.sop_instance_uid, sop_class_uid=instance.sop_class_uid,
            transfer_syntax=transfer_syntax, path=path, geometry=json.dumps(instance.header.to_json()),
            series_uid=instance.series_uid, study_uid=instance.study_uid, patient_id=instance.patient_id,
            description=instance.series.series_description, modality=instance.series.modality,
            calling_ae=calling_ae, series_attrs=json.dumps(instance.series.to_json()), sha256=sha256,
        ), durable=durable)
        with self._pending_lock:
            # stamped in queue order, so a batch never moves a series' last_received backwards
            entry.fields["now"] = time.time() if now is None else now
            self._pending.append(entry)
        # Group commit: whoever holds the journal lock next commits every instance queued so far in
        # one transaction (one WAL fsync, or none when no caller in it asked for durable). A caller returns
        # only after the transaction holding its row has committed, so "returned" still means "durable" when
        # it asked for that.
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
            with self._tx(durable=any(entry.durable for entry in batch)) as db:
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
    def _insert_instance(db: Connection, f: dict[str, Any]) -> bool:
        if db.execute("SELECT 1 FROM instances WHERE sop_instance_uid=?", (f["sop_instance_uid"],)).fetchone():
            return False  # a re-send: already filed (under whatever series it came with first)
        row = db.execute("SELECT state FROM series WHERE series_uid=?", (f["series_uid"],)).fetchone()
        created = False
        if row is None:  # (another process may create it at the same time: PostgreSQL)
            created = db.execute(
                "INSERT INTO series(series_uid, study_uid, patient_id, description, modality,"
                " calling_ae, attrs, first_received, last_received) VALUES (?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (series_uid) DO NOTHING",
                (f["series_uid"], f["study_uid"], f["patient_id"], f["description"], f["modality"],
                 f["calling_ae"], f["series_attrs"], f["now"], f["now"]),
            ).rowcount == 1
        cur = db.execute(
            "INSERT INTO instances(sop_instance_uid, series_uid, sop_class_uid,"
            " transfer_syntax, path, geometry, received_at, sha256) VALUES (?,?,?,?,?,?,?,?)"
            " ON CONFLICT (sop_instance_uid) DO NOTHING",
            (f["sop_instance_uid"], f["series_uid"], f["sop_class_uid"], f["transfer_syntax"], f["path"],
             f["geometry"], f["now"], f.get("sha256", "")),
        )
        is_new = cur.rowcount == 1
        if is_new and not created:  # locks the series row: a retention sweep deciding now waits (PostgreSQL)
            db.execute(
                "UPDATE series SET last_received=GREATEST(last_received, ?), state='receiving' WHERE series_uid=?",
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
            db.execute("UPDATE series SET last_received=GREATEST(last_received, ?) WHERE series_uid=?",
                       (now, row["series_uid"]))
            # the series row is locked now: a retention sweep of it has either not decided yet (and sees the new
            # last_received) or committed its purge before (PostgreSQL: the row is gone; SQLite: never here)
            return db.execute("SELECT 1 FROM instances WHERE sop_instance_uid=?",
                              (sop_instance_uid,)).fetchone() is not None

    @staticmethod
    def _instance(r: Any) -> InstanceRecord:
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

    def _series(self, row: Any) -> SeriesRecord:
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
            " WHERE CAST(? AS TEXT) IS NULL OR STRPOS(lower(patient_id), ?) > 0"
            " OR STRPOS(lower(COALESCE(JSON_TEXT(attrs, 'AccessionNumber'), '')), ?) > 0"
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
                "SELECT state, version, last_received FROM series WHERE series_uid=? FOR UPDATE", (series_uid,)
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

    @staticmethod
    def _job(row: Any, optional_failed: str = "") -> JobRecord:
        return JobRecord(
            id=row["id"], series_uid=row["series_uid"], version=row["version"], rule=row["rule"],
            action=row["action"], model=row["model"], state=JobState(row["state"]), reason=row["reason"],
            created_at=row["created_at"], updated_at=row["updated_at"], timings=json.loads(row["timings"]),
            attempts=row["attempts"], output_name=row["output_name"], optional_failed=optional_failed,
            purged_at=row["purged_at"],
        )

    def _jobs(self, rows: Sequence[Any], db: Connection | None = None) -> list[JobRecord]:
        """Job records of ``rows``, each with its optional failures: its failed follow-ups as
        ``step: reason``, joined by "; " in the order they were queued (read in ``db``'s transaction, if given)."""
        notes: dict[int, list[str]] = {}
        ids = [int(r["id"]) for r in rows]
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            sql = (f"SELECT job_id, step, reason FROM follow_ups WHERE state='failed' AND job_id IN"
                   f" ({','.join('?' * len(chunk))}) ORDER BY job_id, id")
            found = db.execute(sql, chunk).fetchall() if db is not None else self._query(sql, chunk)
            for f in found:
                notes.setdefault(int(f["job_id"]), []).append(f"{f['step']}: {f['reason']}")
        return [self._job(r, "; ".join(notes.get(int(r["id"]), []))) for r in rows]

    def add_job(self, *, series_uid: str, version: int, rule: str, action: str, model: str | None) -> int:
        now = time.time()
        with self._tx() as db:
            # the series row first: a retention sweep deciding on it (PostgreSQL: its row lock) goes before or after
            db.execute("UPDATE series SET state='routed' WHERE series_uid=?", (series_uid,))
            return self._insert_job(db, series_uid, version, rule, action, model, now)

    @staticmethod
    def _insert_job(db: Connection, series_uid: str, version: int, rule: str, action: str, model: str | None,
                    now: float) -> int:
        row = db.execute(
            "INSERT INTO jobs(series_uid, version, rule, action, model, created_at, updated_at)"
            " VALUES (?,?,?,?,?,?,?) RETURNING id",
            (series_uid, version, rule, action, model, now, now),
        ).fetchone()
        return int(row["id"])

    def route_series(self, series_uid: str, version: int, *, rule: str, action: str, model: str | None) -> int | None:
        """Queue the job of a ``complete`` series at ``version`` and mark it routed, in one transaction; None when
        the series is no longer complete at that version (another process routed it first: exactly one job)."""
        now = time.time()
        with self._tx() as db:
            taken = db.execute("UPDATE series SET state='routed' WHERE series_uid=? AND state='complete' AND version=?",
                               (series_uid, version)).rowcount
            if taken != 1:
                return None
            return self._insert_job(db, series_uid, version, rule, action, model, now)

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
        return self._jobs(rows)[0]

    def jobs(self, *, states: Sequence[JobState] | None = None, limit: int = 200) -> list[JobRecord]:
        if states:
            marks = ",".join("?" * len(states))
            rows = self._query(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id", list(states))
        else:
            rows = self._query("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
        return self._jobs(rows)

    def jobs_in_study(self, study_uid: str) -> list[JobRecord]:
        """Every job of every series in a study, oldest first."""
        rows = self._query(
            "SELECT j.* FROM jobs j JOIN series s ON s.series_uid = j.series_uid WHERE s.study_uid=? ORDER BY j.id",
            (study_uid,),
        )
        return self._jobs(rows)

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
            resumed = self._jobs(rows, db)
            gone = self._jobs(db.execute(
                f"SELECT * FROM jobs WHERE id IN ({','.join('?' * len(quarantined))}) ORDER BY id", quarantined
            ).fetchall(), db) if quarantined else []
        return resumed, gone

    @staticmethod
    def _requeue_interrupted(db: Connection, table: str, max_attempts: int, own: str | None) -> list[int]:
        """Queue the interrupted ``running`` rows of ``table`` (jobs, follow_ups: claimed by ``own`` or by no one,
        or with an expired lease) again, or fail those that used their attempts (quarantined); returns the ids
        quarantined. The rows are locked as they are read (PostgreSQL): a row claimed or renewed by another
        process in between is read again and left alone when it no longer qualifies."""
        now = time.time()
        quarantined: list[int] = []
        mine = "" if own is None else "worker IN ('', ?) OR "
        for row in db.execute(f"SELECT id, attempts FROM {table} WHERE state='running' AND ({mine}lease_until < ?)"
                              " ORDER BY id FOR UPDATE", ([] if own is None else [own]) + [now]).fetchall():
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
        ``running`` with this run counted (its reason cleared) and a lease until ``lease_s`` from now. One atomic
        UPDATE (PostgreSQL: the row is re-checked after a concurrent change, READ COMMITTED): of workers racing
        for the same row exactly one gets it; the others (and anyone asking for a row that is not queued) get
        None."""
        table = _CLAIMABLE[kind]
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                f"UPDATE {table} SET state='running', reason='', attempts=attempts+1, worker=?,"
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
    def _fence(db: Connection, table: str, task_id: int, claim: Claim | None) -> None:
        """Raise :class:`ClaimLost` (rolling back the transaction) unless ``claim`` still holds the row
        (no claim: the caller runs outside the claims, as the tests and the CLI may). The row stays locked until
        the transaction ends (PostgreSQL), so no take-over slips in between the check and the record."""
        if claim is None:
            return
        held = db.execute(f"SELECT 1 FROM {table} WHERE id=? AND state='running' AND worker=? AND attempts=?"
                          " FOR UPDATE", (task_id, claim.worker, claim.attempt)).fetchone()
        if held is None:
            raise ClaimLost(f"{table[:-1].replace('_', '-')} {task_id}: run {claim.attempt} of {claim.worker} "
                            "is no longer its claim (its lease expired and another worker took it over)")

    def expired_claims(self) -> bool:
        """Whether a running job or follow-up has a claim whose lease expired (its worker died or stalled)."""
        now = time.time()
        return bool(self._query("SELECT 1 FROM jobs WHERE state='running' AND lease_until < ? UNION ALL"
                                " SELECT 1 FROM follow_ups WHERE state='running' AND lease_until < ? LIMIT 1",
                                (now, now)))

    def next_queued(self, accept: Callable[[str, int], bool] | None = None, limit: int = 100,
                    ) -> tuple[str, int] | None:
        """The work a worker should claim next: the oldest queued follow-up (short, and its job's delivery waits
        for it), else the oldest queued job; as (kind, id). ``accept``: the worker can run it (of the oldest
        ``limit`` of each kind; a worker without a job's models leaves it to one that has them)."""
        for kind, table in (("follow_up", "follow_ups"), ("job", "jobs")):
            rows = self._query(f"SELECT id FROM {table} WHERE state='queued' ORDER BY id LIMIT ?",
                               (1 if accept is None else limit,))
            for row in rows:
                if accept is None or accept(kind, int(row["id"])):
                    return kind, int(row["id"])
        return None

    def queued_before(self, before: float) -> list[tuple[str, int]]:
        """Every queued follow-up, then every queued job, oldest first, not changed since ``before``: what an
        in-process executor should hold (:func:`dicom_node.jobs.resubmit_dropped`); as (kind, id)."""
        queued: list[tuple[str, int]] = []
        for kind, table in (("follow_up", "follow_ups"), ("job", "jobs")):
            rows = self._query(f"SELECT id FROM {table} WHERE state='queued' AND updated_at < ? ORDER BY id",
                               (before,))
            queued += [(kind, int(r["id"])) for r in rows]
        return queued

    def requeue_job(self, job_id: int, reason: str, claim: Claim) -> None:
        """A run of a job failed for a reason outside the job: ``queued`` again with ``reason`` (its run stays
        counted in ``attempts``; fenced by ``claim``: :class:`ClaimLost`)."""
        with self._tx() as db:
            self._fence(db, "jobs", job_id, claim)
            db.execute("UPDATE jobs SET state='queued', reason=?, updated_at=? WHERE id=?",
                       (reason, time.time(), job_id))

    def fail_job(self, job_id: int, reason: str, claim: Claim | None = None) -> None:
        """A run of a job failed: ``failed`` with its reason (fenced by ``claim``: :class:`ClaimLost`)."""
        with self._tx() as db:
            self._fence(db, "jobs", job_id, claim)
            db.execute("UPDATE jobs SET state='failed', reason=?, updated_at=? WHERE id=?",
                       (reason, time.time(), job_id))

    # -- follow-ups -------------------------------------------------------------------------

    @staticmethod
    def _follow_up(row: Any) -> FollowUpRecord:
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

    def finish_follow_up(self, follow_up_id: int, produced: Sequence[tuple[str, str]],
                         items: Sequence[tuple[str, str, str, str]], *, files: Sequence[OutputFile] = (),
                         seconds: float = 0.0, note: str = "", claim: Claim | None = None) -> None:
        """In one transaction: a follow-up's outputs recorded and queued as its job's (a job already delivered
        becomes ``written`` again while they are pending), its
        time among the job's timings (when it wrote something), and the follow-up ``done`` (``note``: what it
        found when it wrote nothing); fenced by ``claim`` (:class:`ClaimLost`: nothing recorded)."""
        with self._tx() as db:
            self._fence(db, "follow_ups", follow_up_id, claim)
            row = db.execute("SELECT job_id, step FROM follow_ups WHERE id=?", (follow_up_id,)).fetchone()
            if row is None:
                raise KeyError(follow_up_id)
            self._add_outputs(db, row["job_id"], produced, items, files)
            if produced:
                timings = json.loads(db.execute("SELECT timings FROM jobs WHERE id=? FOR UPDATE",
                                                (row["job_id"],)).fetchone()["timings"])
                timings[row["step"]] = seconds
                db.execute("UPDATE jobs SET timings=? WHERE id=?", (json.dumps(timings), row["job_id"]))
            db.execute("UPDATE follow_ups SET state='done', reason=?, seconds=?, updated_at=? WHERE id=?",
                       (note, seconds, time.time(), follow_up_id))

    def fail_follow_up(self, follow_up_id: int, error: str, claim: Claim | None = None) -> None:
        """A follow-up failed: ``failed`` with its reason, which is read beside its job's state
        (:attr:`JobRecord.optional_failed`); the job's state and its core outputs are left alone. Fenced by
        ``claim`` (:class:`ClaimLost`)."""
        with self._tx() as db:
            self._fence(db, "follow_ups", follow_up_id, claim)
            if db.execute("UPDATE follow_ups SET state='failed', reason=?, updated_at=? WHERE id=?",
                          (error, time.time(), follow_up_id)).rowcount == 0:
                raise KeyError(follow_up_id)

    def recover_follow_ups(self, max_attempts: int, *, own: str | None = NODE_WORKER,
                           ) -> tuple[list[FollowUpRecord], list[FollowUpRecord]]:
        """As :meth:`recover_jobs` for jobs: (follow-ups to run again, follow-ups quarantined now; read beside
        their job's state)."""
        with self._tx() as db:
            quarantined = self._requeue_interrupted(db, "follow_ups", max_attempts, own)
            also = f" OR id IN ({','.join('?' * len(quarantined))})" if quarantined else ""
            rows = {r["id"]: self._follow_up(r) for r in db.execute(
                f"SELECT * FROM follow_ups WHERE state='queued'{also} ORDER BY id", quarantined)}
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
            db.executemany("INSERT INTO follow_ups(job_id, step, created_at, updated_at) VALUES (?,?,?,?)"
                           " ON CONFLICT DO NOTHING",
                           [(job_id, step, now, now) for step in follow_ups])

    def _add_outputs(self, db: Connection, job_id: int, produced: Sequence[tuple[str, str]],
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
    def _insert_outputs(db: Connection, job_id: int, produced: Sequence[tuple[str, str]],
                        items: Sequence[tuple[str, str, str, str]], files: Sequence[OutputFile], now: float) -> None:
        db.executemany(
            "INSERT INTO produced(series_uid, job_id, kind) VALUES (?,?,?) ON CONFLICT DO NOTHING",
            [(uid, job_id, kind) for uid, kind in produced],
        )
        db.executemany(
            "INSERT INTO outbox(job_id, destination, path, sop_class_uid, sop_instance_uid,"
            " next_attempt_at, queued_at) VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
            [(job_id, dest, path, cls, uid, now, now) for dest, path, cls, uid in items],
        )
        # a file recorded again replaces its row (and goes last, in the order written)
        db.executemany("DELETE FROM output_files WHERE job_id=? AND path=?", [(job_id, f.path) for f in files])
        db.executemany(
            "INSERT INTO output_files(job_id, kind, path, series_uid, sop_class_uid, sop_instance_uid)"
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

    def _item(self, row: Any) -> OutboxItem:
        return OutboxItem(
            id=row["id"], job_id=row["job_id"], destination=row["destination"], path=row["path"],
            sop_class_uid=row["sop_class_uid"], sop_instance_uid=row["sop_instance_uid"],
            state=OutboxState(row["state"]),
            tries=row["tries"], next_attempt_at=row["next_attempt_at"], last_error=row["last_error"],
            sent_at=row["sent_at"],
            queued_at=row["queued_at"], worker=row["worker"], lease_until=row["lease_until"],
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

    def mark_sent(self, item_ids: Sequence[int], *, durable: bool = True, claim: OutboxClaim | None = None) -> None:
        """Items acknowledged by their destination. ``durable=False`` (the C-STORE dispatcher, one commit per
        object): not synced to disk, so a SIGKILL of the node never makes it send them again, but a power loss
        right after may (the destination then gets the same SOP Instance again, which a PACS files once).
        Fenced by ``claim`` (:meth:`claim_outbox`): :class:`ClaimLost` and nothing recorded unless every item is
        still pending under it; their lease is released."""
        with self._tx(durable=durable) as db:
            self._fence_outbox(db, item_ids, claim)
            now = time.time()
            db.executemany("UPDATE outbox SET state='sent', last_error='', sent_at=?, lease_until=0 WHERE id=?",
                           [(now, i) for i in item_ids])
            self._settle_jobs(db, item_ids)

    def mark_failed_try(
        self, item_ids: Sequence[int], error: str, *,
        next_attempt: Callable[[int, float, float], float | None], now: float | None = None,
        claim: OutboxClaim | None = None,
    ) -> list[OutboxItem]:
        """Count one failed try and ask the retry policy (the dispatcher's) when to try next:
        ``next_attempt(tries, first_failed_at, now)`` gives a time, or None to fail for good. Returns the
        items that failed for good now. Fenced by ``claim`` as :meth:`mark_sent` is (the items' lease released:
        any dispatcher takes them at their next try)."""
        now = time.time() if now is None else now
        given_up: list[int] = []
        with self._tx() as db:
            self._fence_outbox(db, item_ids, claim)
            for item_id in item_ids:
                row = db.execute("SELECT tries, first_failed_at FROM outbox WHERE id=? FOR UPDATE",
                                 (item_id,)).fetchone()
                tries = row["tries"] + 1
                first = row["first_failed_at"] or now
                when = next_attempt(tries, first, now)
                if when is None:
                    db.execute(
                        "UPDATE outbox SET state='failed', tries=?, last_error=?, first_failed_at=?, lease_until=0"
                        " WHERE id=?", (tries, error, first, item_id),
                    )
                    given_up.append(item_id)
                else:
                    db.execute(
                        "UPDATE outbox SET tries=?, last_error=?, next_attempt_at=?, first_failed_at=?, lease_until=0"
                        " WHERE id=?", (tries, error, when, first, item_id),
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

    # -- outbox claims: several dispatchers sharing one outbox -------------------------------------

    def claim_outbox(self, worker: str, lease_s: float, *, limit: int = 50, destination: str | None = None,
                     now: float | None = None) -> OutboxClaim | None:
        """Claim due pending items for ``worker`` with a lease until ``lease_s`` from now: those of one destination
        (``destination``, else the destination of the oldest due item), oldest first, at most ``limit``. Items
        held by another dispatcher whose lease still holds are left to it; an expired claim is taken over (its
        holder's outcome is then refused: :class:`ClaimLost`). None when nothing is due. Of dispatchers racing for
        the same items each gets a distinct share (SQLite: one writer at a time; PostgreSQL: the rows are locked
        ``FOR UPDATE SKIP LOCKED`` and re-checked after a concurrent claim)."""
        now = time.time() if now is None else now
        due = "state='pending' AND next_attempt_at <= ? AND lease_until < ?"
        with self._tx() as db:
            if destination is None:
                first = db.execute(f"SELECT destination FROM outbox WHERE {due} ORDER BY job_id, id LIMIT 1"
                                   " FOR UPDATE SKIP LOCKED", (now, now)).fetchone()
                if first is None:
                    return None
                destination = str(first["destination"])
            ids = [int(r["id"]) for r in db.execute(
                f"SELECT id FROM outbox WHERE {due} AND destination=? ORDER BY job_id, id LIMIT ?"
                " FOR UPDATE SKIP LOCKED", (now, now, destination, limit)).fetchall()]
            if not ids:
                return None
            token = uuid.uuid4().hex
            marks = ",".join("?" * len(ids))
            db.execute(f"UPDATE outbox SET worker=?, claim_token=?, lease_until=? WHERE id IN ({marks})",
                       [worker, token, now + lease_s, *ids])
            rows = db.execute(f"SELECT * FROM outbox WHERE id IN ({marks}) ORDER BY job_id, id", ids).fetchall()
        return OutboxClaim(worker, token, destination, [self._item(r) for r in rows])

    def renew_outbox(self, claim: OutboxClaim, lease_s: float) -> list[int]:
        """Extend the lease of the items ``claim`` still holds (pending, not taken over) to ``lease_s`` from now;
        returns their ids (empty: the claim is lost or done)."""
        with self._tx() as db:
            rows = db.execute("UPDATE outbox SET lease_until=? WHERE claim_token=? AND state='pending'"
                              " RETURNING id", (time.time() + lease_s, claim.token)).fetchall()
        return sorted(int(r["id"]) for r in rows)

    def release_outbox(self, claim: OutboxClaim) -> int:
        """Give back the items ``claim`` still holds without an outcome (a dispatcher stopping): any dispatcher may
        claim them at once. Returns how many."""
        with self._tx() as db:
            return int(db.execute("UPDATE outbox SET lease_until=0 WHERE claim_token=? AND state='pending'",
                                  (claim.token,)).rowcount)

    def release_outbox_of(self, worker: str) -> int:
        """Give back every pending item claimed under ``worker``: a node taking back, at its start, what its previous
        life held (only for an id no live process uses: the SQLite node's ``NODE_WORKER``). Returns how many."""
        with self._tx() as db:
            return int(db.execute("UPDATE outbox SET lease_until=0, claim_token='' WHERE worker=? AND state='pending'"
                                  " AND lease_until > 0", (worker,)).rowcount)

    @staticmethod
    def _fence_outbox(db: Connection, item_ids: Sequence[int], claim: OutboxClaim | None) -> None:
        """Raise :class:`ClaimLost` (rolling back the transaction) unless ``claim`` still holds every item (pending,
        under its token); no claim: the caller is the only dispatcher (a receiving node's own). The rows stay
        locked until the transaction ends (PostgreSQL)."""
        if claim is None or not item_ids:
            return
        marks = ",".join("?" * len(item_ids))
        held = {int(r["id"]) for r in db.execute(
            f"SELECT id FROM outbox WHERE id IN ({marks}) AND claim_token=? AND state='pending' ORDER BY id"
            " FOR UPDATE", [*item_ids, claim.token]).fetchall()}
        lost = sorted(set(item_ids) - held)
        if lost:
            raise ClaimLost(f"outbox item(s) {', '.join(map(str, lost))}: no longer claimed by {claim.worker} (the "
                            "lease expired and another dispatcher took them over, or they are settled)")

    @staticmethod
    def _settle_jobs(db: Connection, item_ids: Sequence[int]) -> None:
        if not item_ids:
            return
        marks = ",".join("?" * len(item_ids))
        job_ids = [r["job_id"] for r in db.execute(
            f"SELECT DISTINCT job_id FROM outbox WHERE id IN ({marks}) ORDER BY job_id", list(item_ids)
        )]
        for job_id in job_ids:
            # the job's row locked first (PostgreSQL; in job order: no deadlock), then its items read: of two
            # dispatchers settling items of one job at once, the second sees what the first committed
            job = db.execute("SELECT state, reason FROM jobs WHERE id=? FOR UPDATE", (job_id,)).fetchone()
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
                " ORDER BY first_received, series_uid FOR UPDATE", (value,)
            ).fetchall()
            marked = [r["series_uid"] for r in rows]
            db.executemany(
                "UPDATE series SET state='complete', version=version+1, note=? WHERE series_uid=?"
                " AND state IN ('routed', 'ignored')",
                [(f"reprocess requested {time.strftime('%Y-%m-%d %H:%M:%S')}", uid) for uid in marked],
            )
        return marked

    # -- retention -------------------------------------------------------------------------

    def purge_candidates(self, *, delivered_before: float, not_processed_before: float) -> list[PurgeCandidate]:
        """Series whose files may be deleted now (the conditions: :data:`_PURGEABLE`), oldest first."""
        rows = self._query(
            "SELECT s.series_uid, s.study_uid, s.description, s.state,"
            " (SELECT COUNT(*) FROM instances i WHERE i.series_uid = s.series_uid) AS n,"
            " (SELECT STRING_AGG(CAST(j.id AS TEXT), ',') FROM jobs j WHERE j.series_uid = s.series_uid"
            "  AND j.purged_at = 0) AS jobs,"
            " EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid AND j.state = 'sent') AS delivered,"
            " GREATEST(s.last_received, COALESCE((SELECT MAX(j.updated_at) FROM jobs j"
            "     WHERE j.series_uid = s.series_uid), 0)) AS settled"
            f" FROM series s WHERE {_PURGEABLE} ORDER BY settled",
            {"delivered_before": delivered_before, "not_processed_before": not_processed_before},
        )
        return [PurgeCandidate(r["series_uid"], r["study_uid"], r["description"], SeriesState(r["state"]), r["n"],
                               tuple(sorted(int(j) for j in (r["jobs"] or "").split(",") if j)), bool(r["delivered"]),
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
            row = db.execute(f"SELECT 1 FROM series s WHERE s.series_uid = :uid AND {_PURGEABLE} FOR UPDATE",
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
                "INSERT INTO purge_files(path, kind, series_uid, sop_instance_uid, recorded_at) VALUES (?,?,?,?,?)"
                " ON CONFLICT (path) DO UPDATE SET kind=excluded.kind, series_uid=excluded.series_uid,"
                " sop_instance_uid=excluded.sop_instance_uid, recorded_at=excluded.recorded_at",
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

    def finish_purge(self, files: Sequence[PurgeFile], remove: Callable[[PurgeFile], bool]) -> list[PurgeFile]:
        """Delete ``files`` (``remove`` each) and their ``purge_files`` rows; returns the files kept because an
        instance row points at them again (the same SOP Instance UID was received again after its series was
        purged: the file at that path is the new copy).

        Job folders and output files are removed first, outside any transaction (a folder may take long, and
        nothing writes there any more: their jobs are settled); then one transaction removes each instance file
        and forgets every row. An instance file is removed while the transaction holds the journal's write lock
        (SQLite) or its series' row (PostgreSQL, which a C-STORE of the same path updates when it files its
        row): that C-STORE commits its row either before (the file is kept) or after (the SCP finds its file
        gone and writes it again before it answers, see ``StorageSCP._file``). Crash-safe: a row is forgotten
        only after its file is gone; if ``remove`` raises, nothing of the batch is forgotten and the next sweep
        removes what is left (``remove`` must accept a missing file). ``remove`` returns False for a file it could
        not delete (a permission, a busy NFS file): its row stays, its ``recorded_at`` moved to now, so that
        :meth:`pending_purges` gives it after the others and it never holds up the queue."""
        undeleted = {f.path for f in files if f.kind != "instance" and not remove(f)}
        kept: list[PurgeFile] = []
        locked: set[str] = set()
        with self._tx() as db:
            for f in files:
                if f.kind == "instance":
                    if f.series_uid not in locked:
                        db.execute("SELECT 1 FROM series WHERE series_uid=? FOR UPDATE", (f.series_uid,))
                        locked.add(f.series_uid)
                    if db.execute(  # the path is made of the UIDs: same path, same UID
                            "SELECT 1 FROM instances WHERE sop_instance_uid=? AND path=?",
                            (f.sop_instance_uid, f.path)).fetchone():
                        kept.append(f)
                    elif not remove(f):
                        undeleted.add(f.path)
            db.executemany("DELETE FROM purge_files WHERE path=?", [(f.path,) for f in files
                                                                       if f.path not in undeleted])
            db.executemany("UPDATE purge_files SET recorded_at=? WHERE path=?",
                           [(time.time(), path) for path in sorted(undeleted)])
        return kept

    def outbox_summary(self) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT destination, state, COUNT(*) AS n, MAX(tries) AS max_tries, MAX(last_error) AS last_error,"
            " MIN(next_attempt_at) AS next_at, MIN(queued_at) AS oldest_queued_at,"
            " MIN(CASE WHEN first_failed_at > 0 THEN first_failed_at END) AS failing_since"
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


def journal_location(config: NodeConfig) -> str:
    """The journal of this configuration, for messages: the SQLite file, or the PostgreSQL conninfo (without a
    password)."""
    if config.journal.backend == "postgresql":
        return PostgresConnection.describe(PostgresTarget(config.journal.dsn or ""))
    return str(journal_path(config))


def journal_exists(config: NodeConfig) -> bool:
    """Whether the node has run with this journal: the SQLite file exists; a PostgreSQL journal is taken to
    exist (opening it read-only says when it has no schema yet)."""
    return config.journal.backend == "postgresql" or journal_path(config).exists()


def postgres_target(config: NodeConfig) -> PostgresTarget:
    """The PostgreSQL journal of ``[journal]``: its dsn, and the password read from ``password_file`` (first line;
    never logged) or None (libpq's ``PGPASSWORD``/``PGPASSFILE``, or no password)."""
    settings = config.journal
    password = None
    if settings.password_file is not None:
        try:
            lines = settings.password_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise JournalError(f"[journal] password_file {settings.password_file}: cannot read it: "
                               f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None
        password = lines[0] if lines else ""
    return PostgresTarget(settings.dsn or "", password)


def open_journal(config: NodeConfig, *, read_only: bool = False) -> Journal:
    """The journal this configuration names: every process (receiver, worker, dispatcher, command) opens it
    through here. ``read_only`` (``status``): never creates, upgrades or writes it (PostgreSQL: every transaction
    of the session is read-only, ``default_transaction_read_only``)."""
    if config.journal.backend == "postgresql":
        return Journal(postgres_target(config), fsync=config.node.fsync, read_only=read_only)
    if read_only:
        return Journal(journal_path(config), read_only=True)
    return Journal(journal_path(config), fsync=config.node.fsync)
