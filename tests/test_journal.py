"""Tests for dicom_node.journal: the series, job and outbox state machines, durability settings."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node.dispatch import RetryPolicy
from dicom_node.headers import InstanceHeader, ReceivedInstance, SeriesAttributes
from dicom_node.journal import (
    DELIVERY_FAILED,
    NODE_WORKER,
    SCHEMA_VERSION,
    Claim,
    ClaimLost,
    FollowUpState,
    JobState,
    Journal,
    JournalError,
    OutboxState,
    OutputFile,
    SeriesState,
)
from dicom_node.journal_sql import PostgresTarget, connection_errors

SERIES = "1.2.3.4.100"
GIVE_UP = RetryPolicy(max_tries=1, backoff_initial_s=1, backoff_max_s=1).next_attempt
STUDY = "1.2.3.4"


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """Every test of the journal's interface runs on both backends."""
    return str(request.param)


@pytest.fixture
def open_journal(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[[], Journal]]:
    """Opens another connection to the test's journal (another process's, as far as the database can tell)."""
    target: Path | PostgresTarget = tmp_path / "journal.sqlite3"
    if backend == "postgresql":
        target = request.getfixturevalue("postgres_journal")
    opened: list[Journal] = []

    def make() -> Journal:
        opened.append(Journal(target, fsync=False))
        return opened[-1]

    yield make
    for j in opened:
        j.close()


@pytest.fixture
def journal(open_journal: Callable[[], Journal]) -> Journal:
    return open_journal()


@pytest.fixture
def integrity_error(backend: str) -> type[Exception]:
    if backend == "postgresql":
        import psycopg

        return psycopg.IntegrityError
    return sqlite3.IntegrityError


ATTRIBUTES = SeriesAttributes(series_description="t1_fl2d_sag", modality="MR", series_number=2)


def add(journal: Journal, sop: str, *, series: str = SERIES, now: float | None = None, **extra: Any) -> bool:
    received = ReceivedInstance(
        sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.4", study_uid=STUDY, series_uid=series,
        patient_id="PAT1", header=InstanceHeader(image_position=(0.0, 0.0, float(len(sop))), number_of_frames=1),
        series=ATTRIBUTES,
    )
    fields: dict[str, Any] = dict(transfer_syntax="1.2.840.10008.1.2.1", path=f"/spool/{sop}.dcm",
                                  calling_ae="SCANNER", now=now)
    fields.update(extra)
    return journal.add_instance(received, **fields)


def job_with_outbox(journal: Journal, destinations: tuple[str, ...] = ("PACS",), n: int = 2) -> tuple[int, list[int]]:
    add(journal, "1.9.1")
    version = journal.close_series(SERIES)
    assert version is not None
    job = journal.add_job(series_uid=SERIES, version=version, rule="t1-2d", action="synthesize", model="m")
    items = [(d, f"/out/{k}.dcm", "1.2.840.10008.5.1.4.1.1.4", f"1.9.9.{k}") for d in destinations for k in range(n)]
    journal.record_outputs(job, [("1.9.9", "sT1")], items)
    return job, [i.id for i in journal.outbox(job)]


# -- setup -------------------------------------------------------------------------------------

def test_wal_mode_and_schema(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "j.sqlite3"
    journal = Journal(path)
    journal.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION) == "7"
    db.close()


def _older_journal(path: Path, version: int, *statements: str) -> int:
    """A journal with one instance and one job, then made what schema ``version`` had by ``statements``."""
    journal = Journal(path)
    add(journal, "1.9.1")
    job = journal.add_job(series_uid=SERIES, version=1, rule="r", action="synthesize", model="m")
    journal.close()
    db = sqlite3.connect(path)
    for statement in statements:
        db.execute(statement)
    db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version),))
    db.commit()
    db.close()
    return job


def test_a_version_1_journal_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    job = _older_journal(path, 1, "ALTER TABLE jobs DROP COLUMN attempts",  # schema 1: no attempts, no sha256
                         "ALTER TABLE instances DROP COLUMN sha256", "ALTER TABLE outbox DROP COLUMN first_failed_at",
                         "ALTER TABLE outbox DROP COLUMN queued_at")
    journal = Journal(path)
    assert journal.job(job).attempts == 0 and journal.claim("job", job, "w1", 30) == Claim("w1", 1)
    assert [(i.sop_instance_uid, i.sha256) for i in journal.instances(SERIES)] == [("1.9.1", "")]
    add(journal, "1.9.2", sha256="ab" * 32)
    assert journal.instance("1.9.2").sha256 == "ab" * 32 and journal.instance("1.9.3") is None
    journal.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    db.close()


def test_a_version_2_journal_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    job = _older_journal(path, 2, "DROP TABLE output_files",  # schema 2: no output files, no output name
                         "ALTER TABLE jobs DROP COLUMN output_name", "ALTER TABLE outbox DROP COLUMN queued_at")
    journal = Journal(path)
    assert journal.job(job).output_name == "" and journal.output_files(job) == []
    seg = OutputFile("SEG", "/o/seg.dcm", "1.9.9", "1.2", "1.9.9.1")
    journal.record_outputs(job, [("1.9.9", "SEG")], [], files=[seg], output_name="rT1")
    assert journal.output_files(job) == [("SEG", "/o/seg.dcm", "1.9.9", "1.2", "1.9.9.1")]
    assert journal.job(job).output_name == "rT1"
    journal.close()


def test_a_version_3_journal_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    job = _older_journal(path, 3)  # schema 3: no optional_failed (nor anything schema 7 drops)
    journal = Journal(path)
    assert journal.job(job).optional_failed == ""
    journal.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "7"
    db.close()


def test_a_version_6_optional_failure_reads_the_same_after_schema_7(tmp_path: Path) -> None:
    """Schema 7 drops jobs.optional_failed: the failed follow-ups are what it is read from. A text written before
    follow-ups existed is kept as one failed follow-up that reads back as the same text; a job whose failed
    follow-up holds it already gets nothing more."""
    path = tmp_path / "j.sqlite3"
    old = "agreement: RuntimeError: registration diverged; other: ValueError: x"
    first = Journal(path)
    add(first, "1.9.1")
    job, twin = (first.add_job(series_uid=SERIES, version=v, rule="r", action="synthesize", model="m") for v in (1, 2))
    first.close()
    db = sqlite3.connect(path)
    for statement in ("ALTER TABLE outbox DROP COLUMN worker", "ALTER TABLE outbox DROP COLUMN lease_until",
                      "ALTER TABLE outbox DROP COLUMN claim_token",
                      "ALTER TABLE jobs ADD COLUMN optional_failed TEXT NOT NULL DEFAULT ''",
                      "UPDATE meta SET value='6' WHERE key='schema_version'"):
        db.execute(statement)
    db.execute("UPDATE jobs SET optional_failed = ?, state = 'sent' WHERE id = ?", (old, job))
    db.execute("INSERT INTO follow_ups(job_id, step, state, reason, created_at, updated_at)"
               " VALUES (?, 'agreement', 'failed', 'RuntimeError: boom', 1, 1)", (twin,))
    db.execute("UPDATE jobs SET optional_failed = 'agreement: RuntimeError: boom' WHERE id = ?", (twin,))
    db.commit()
    db.close()
    journal = Journal(path)
    try:
        assert journal.job(job).optional_failed == old and journal.job(job).state == "sent"
        assert journal.job(twin).optional_failed == "agreement: RuntimeError: boom"
        assert [(f.step, f.state) for f in journal.follow_ups(twin)] == [("agreement", "failed")]
    finally:
        journal.close()
    db = sqlite3.connect(path)
    columns = {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
    assert ("optional_failed" in columns) == (sqlite3.sqlite_version_info < (3, 35))
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "7"
    db.close()


def test_a_version_3_outbox_gets_queued_at(tmp_path: Path) -> None:
    """Schema 4 added outbox.queued_at: an item queued before takes its next try's time (the best it knows)."""
    path = tmp_path / "j.sqlite3"
    journal = Journal(path)
    job, ids = job_with_outbox(journal, ("PACS",), n=2)
    journal.mark_failed_try(ids[:1], "down", next_attempt=lambda tries, first, now: 5000.0, now=1000.0)
    journal.close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE outbox DROP COLUMN queued_at")
    db.execute("UPDATE outbox SET next_attempt_at = 700.0 WHERE id = ?", (ids[1],))
    db.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
    db.commit()
    db.close()
    journal = Journal(path)
    assert {i.id: i.queued_at for i in journal.outbox(job)} == {ids[0]: 5000.0, ids[1]: 700.0}
    (pending,) = [r for r in journal.outbox_summary() if r["state"] == "pending"]
    assert pending["oldest_queued_at"] == 700.0
    journal.close()


def test_a_version_3_journal_gets_the_retention_columns(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    job = _older_journal(path, 3, "DROP TABLE purge_files",  # schema 3: no retention columns nor purge_files
                         "ALTER TABLE series DROP COLUMN purged_at", "ALTER TABLE series DROP COLUMN purged_instances",
                         "ALTER TABLE jobs DROP COLUMN purged_at", "ALTER TABLE outbox DROP COLUMN sent_at")
    journal = Journal(path)
    series = journal.series(SERIES)
    assert (series.purged_at, series.purged_instances, journal.job(job).purged_at) == (0, 0, 0)
    assert journal.pending_purges() == [] and journal.counts()["purged"] == {"series": 0, "instances": 0}
    journal.record_outputs(job, [("1.9.9", "sT1")], [("PACS", "/o/1.dcm", "1.2", "1.9.9.1")])
    journal.mark_sent([journal.outbox(job)[0].id])
    assert journal.outbox(job)[0].sent_at > 0
    journal.close()


def test_a_journal_of_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    Journal(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(JournalError, match="schema version 99, written by a newer dicom-node"):
        Journal(path)
    db = sqlite3.connect(path)  # left as it was
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "99"
    db.close()


def test_data_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    journal = Journal(path)
    add(journal, "1.9.1")
    journal.close()
    again = Journal(path)
    assert [i.sop_instance_uid for i in again.instances(SERIES)] == ["1.9.1"]
    assert again.series(SERIES).n_instances == 1
    again.close()


# -- receiving ---------------------------------------------------------------------------------

def test_add_instance_creates_series_with_attributes(journal: Journal) -> None:
    assert add(journal, "1.9.1", now=100.0)
    assert add(journal, "1.9.2", now=105.0)
    series = journal.series(SERIES)
    assert series is not None
    assert series.state == "receiving" and series.version == 0
    assert series.first_received == 100.0 and series.last_received == 105.0
    assert series.n_instances == 2
    assert series.attributes == SeriesAttributes(series_description="t1_fl2d_sag", modality="MR", series_number=2)
    assert (series.study_uid, series.patient_id, series.calling_ae) == (STUDY, "PAT1", "SCANNER")
    records = journal.instances(SERIES)
    assert [r.sop_instance_uid for r in records] == ["1.9.1", "1.9.2"]
    assert records[0].header == InstanceHeader(image_position=(0.0, 0.0, 5.0), number_of_frames=1)
    assert records[0].path == "/spool/1.9.1.dcm"
    assert journal.series("nope") is None


def test_duplicate_instance_is_idempotent(journal: Journal) -> None:
    assert add(journal, "1.9.1", now=100.0)
    assert not add(journal, "1.9.1", now=200.0)
    assert len(journal.instances(SERIES)) == 1
    assert journal.series(SERIES).last_received == 100.0
    assert journal.counts()["instances"] == {"total": 1}


def test_duplicate_does_not_reopen_a_closed_series(journal: Journal) -> None:
    add(journal, "1.9.1")
    journal.close_series(SERIES)
    assert not add(journal, "1.9.1")
    assert journal.series(SERIES).state == "complete"


# -- series state machine ----------------------------------------------------------------------

def test_close_series_versions_and_late_arrival(journal: Journal) -> None:
    add(journal, "1.9.1", now=100.0)
    assert journal.close_series(SERIES, expected_last_received=100.0) == 1
    assert journal.series(SERIES).state == "complete"
    assert journal.close_series(SERIES) is None  # not receiving any more
    journal.add_job(series_uid=SERIES, version=1, rule="t1-2d", action="synthesize", model="m")
    assert journal.series(SERIES).state == "routed"
    # a late arrival re-opens the routed series ...
    assert add(journal, "1.9.2", now=300.0)
    series = journal.series(SERIES)
    assert series.state == "receiving" and series.last_received == 300.0 and series.version == 1
    # ... and the next close gives version 2
    assert journal.close_series(SERIES, expected_last_received=300.0) == 2
    assert journal.series(SERIES).version == 2


def test_late_arrival_reopens_an_ignored_series(journal: Journal) -> None:
    add(journal, "1.9.1")
    journal.close_series(SERIES)
    journal.set_series_state(SERIES, "ignored", "not processed: no rule matches")
    series = journal.series(SERIES)
    assert series.state == "ignored" and series.note == "not processed: no rule matches"
    add(journal, "1.9.2")
    assert journal.series(SERIES).state == "receiving"


def test_close_series_refuses_a_stale_view(journal: Journal) -> None:
    add(journal, "1.9.1", now=100.0)
    add(journal, "1.9.2", now=110.0)  # arrived after the caller looked at the series
    assert journal.close_series(SERIES, expected_last_received=100.0) is None
    assert journal.series(SERIES).state == "receiving"
    assert journal.close_series(SERIES, expected_last_received=110.0) == 1


def test_close_unknown_series(journal: Journal) -> None:
    assert journal.close_series("9.9.9") is None


def test_series_in_state_idle_before(journal: Journal) -> None:
    add(journal, "1.9.1", series="1.1", now=100.0)
    add(journal, "1.9.2", series="1.2", now=200.0)
    add(journal, "1.9.3", series="1.3", now=300.0)
    journal.close_series("1.3")
    assert [s.series_uid for s in journal.series_in_state("receiving")] == ["1.1", "1.2"]
    assert [s.series_uid for s in journal.series_in_state("receiving", idle_before=150.0)] == ["1.1"]
    assert [s.series_uid for s in journal.series_in_state("complete")] == ["1.3"]
    assert [s.series_uid for s in journal.all_series()] == ["1.3", "1.2", "1.1"]
    assert [s.n_instances for s in journal.all_series(limit=1)] == [1]


# -- jobs --------------------------------------------------------------------------------------

def test_job_lifecycle(journal: Journal) -> None:
    add(journal, "1.9.1")
    version = journal.close_series(SERIES)
    job_id = journal.add_job(series_uid=SERIES, version=version, rule="t1-2d", action="synthesize", model="m")
    job = journal.job(job_id)
    assert (job.state, job.version, job.rule, job.model, job.timings) == ("queued", 1, "t1-2d", "m", {})
    journal.set_job_state(job_id, "running")
    journal.set_job_state(job_id, "running", timings={"load": 0.5})
    journal.set_job_state(job_id, "failed", "boom")
    job = journal.job(job_id)
    assert (job.state, job.reason, job.timings) == ("failed", "boom", {"load": 0.5})
    assert [j.id for j in journal.jobs(states=["failed"])] == [job_id]
    assert journal.jobs(states=["queued"]) == []
    assert journal.count_versions_sent(SERIES) == 1
    with pytest.raises(KeyError):
        journal.job(9999)


def test_recover_jobs_requeues_interrupted_runs_then_quarantines(journal: Journal) -> None:
    add(journal, "1.9.1")
    jobs = [journal.add_job(series_uid=SERIES, version=1, rule="r", action="synthesize", model="m")
            for _ in range(4)]
    queued, once, twice, done = jobs
    assert journal.claim("job", once, NODE_WORKER, 60) == Claim(NODE_WORKER, 1)
    journal.claim("job", twice, NODE_WORKER, 60)
    journal.set_job_state(twice, "queued")
    assert journal.claim("job", twice, NODE_WORKER, 60) == Claim(NODE_WORKER, 2)
    journal.claim("job", done, NODE_WORKER, 60)
    journal.set_job_state(done, "failed", "boom")
    resumed, quarantined = journal.recover_jobs(max_attempts=2)
    assert [j.id for j in resumed] == [queued, once]
    assert journal.job(once).state == "queued" and journal.job(once).attempts == 1
    assert journal.job(once).reason == "interrupted during run 1 of at most 2: queued again"
    assert [j.id for j in quarantined] == [twice]
    record = journal.job(twice)
    assert record.state == "failed" and record.reason.startswith("quarantined: interrupted 2 times")
    assert journal.job(done).reason == "boom"  # settled jobs are left alone
    assert journal.jobs(states=["running"]) == []
    assert journal.claim("job", 9999, NODE_WORKER, 60) is None


def test_set_job_timings_keeps_the_state(journal: Journal) -> None:
    job, ids = job_with_outbox(journal, ("PACS",), n=1)
    journal.mark_sent(ids)
    journal.set_job_timings(job, {"total": 1.5})
    record = journal.job(job)
    assert (record.state, record.timings) == ("sent", {"total": 1.5})


def test_job_needs_an_existing_series(journal: Journal, integrity_error: type[Exception]) -> None:
    with pytest.raises(integrity_error):
        journal.add_job(series_uid="no.such", version=1, rule="r", action="synthesize", model="m")


def test_record_outputs_then_mark_sent_settles_the_job(journal: Journal) -> None:
    job, ids = job_with_outbox(journal, ("PACS", "ARCHIVE"), n=2)
    assert journal.job(job).state == "written"
    assert journal.is_produced("1.9.9") and not journal.is_produced(SERIES)
    assert journal.produced_by(job) == [("1.9.9", "sT1")]
    assert len(ids) == 4 and len(journal.due_items()) == 4
    journal.mark_sent(ids[:3])
    assert journal.job(job).state == "written"  # one item still pending
    journal.mark_sent(ids[3:])
    assert journal.job(job).state == "sent"
    assert {i.state for i in journal.outbox(job)} == {"sent"}
    assert journal.due_items() == []


def test_outputs_added_after_delivery_reopen_the_job(journal: Journal) -> None:
    job, (follow_up,) = _job_with_follow_ups(journal, "agreement")
    journal.mark_sent([i.id for i in journal.outbox(job)])
    assert journal.job(job).state == "sent"
    claim = journal.claim("follow_up", follow_up, "w1", 30)
    journal.finish_follow_up(follow_up, [("1.9.9", "AGREEMENT")], [("PACS", "/out/agreement.dcm", "1.2", "1.9.9.1")],
                             files=[OutputFile("AGREEMENT", "/out/agreement.dcm", "1.9.9", "1.2", "1.9.9.1")],
                             claim=claim)
    assert journal.job(job).state == "written"
    assert [f.kind for f in journal.output_files(job)] == ["sT1", "AGREEMENT"]
    journal.mark_sent([i.id for i in journal.outbox(job) if i.state == "pending"])
    assert journal.job(job).state == "sent"


def test_record_outputs_without_destination_is_sent_at_once(journal: Journal) -> None:
    add(journal, "1.9.1")
    job = journal.add_job(series_uid=SERIES, version=1, rule="r", action="synthesize", model="m")
    journal.record_outputs(job, [("1.9.9", "sT1")], [])
    record = journal.job(job)
    assert record.state == "sent" and "no destination" in record.reason


def test_outbox_item_is_unique_per_destination_and_instance(journal: Journal) -> None:
    job, ids = job_with_outbox(journal, ("PACS",), n=1)
    journal.record_outputs(job, [("1.9.9", "sT1")], [("PACS", "/out/other.dcm", "1.2", "1.9.9.0")])
    assert len(journal.outbox()) == 1


# -- outbox retries ----------------------------------------------------------------------------

def test_failed_tries_back_off_exponentially_then_fail(journal: Journal) -> None:
    job, ids = job_with_outbox(journal, ("PACS",), n=1)
    policy = dict(next_attempt=RetryPolicy(max_tries=4, backoff_initial_s=10.0, backoff_max_s=25.0).next_attempt)
    expected_delays = [10.0, 20.0, 25.0]  # capped by backoff_max_s
    for tries, delay in enumerate(expected_delays, start=1):
        journal.mark_failed_try(ids, "association rejected", now=1000.0, **policy)
        item = journal.outbox(job)[0]
        assert (item.state, item.tries, item.last_error) == ("pending", tries, "association rejected")
        assert item.next_attempt_at == pytest.approx(1000.0 + delay)
        assert journal.job(job).state == "written"
    assert journal.due_items(now=1000.0 + 24.0) == []
    assert [i.id for i in journal.due_items(now=1000.0 + 25.0)] == ids
    journal.mark_failed_try(ids, "status 0xA700", now=1000.0, **policy)
    item = journal.outbox(job)[0]
    assert (item.state, item.tries, item.last_error) == ("failed", 4, "status 0xA700")
    job_record = journal.job(job)
    assert job_record.state == "failed" and "delivery failed" in job_record.reason
    assert journal.due_items(now=1e12) == []


def test_retries_go_on_for_the_policy_window_after_the_first_failure(journal: Journal) -> None:
    job, ids = job_with_outbox(journal, ("PACS",), n=1)
    policy = RetryPolicy(backoff_initial_s=10.0, backoff_max_s=25.0, retry_for_s=100.0).next_attempt
    for now in (1000.0, 1040.0, 1099.0):  # no max_tries: only the window counts
        journal.mark_failed_try(ids, "down", next_attempt=policy, now=now)
        assert journal.outbox(job)[0].state == "pending"
    assert journal.outbox(job)[0].next_attempt_at == pytest.approx(1099.0 + 25.0)
    journal.mark_failed_try(ids, "still down", next_attempt=policy, now=1100.0)  # 100 s after the first
    item = journal.outbox(job)[0]
    assert (item.state, item.tries, item.last_error) == ("failed", 4, "still down")
    assert journal.retry_failed() == 1  # an operator's retry starts a new window
    journal.mark_failed_try(ids, "down", next_attempt=policy, now=5000.0)
    assert journal.outbox(job)[0].state == "pending"


def test_job_fails_only_when_no_item_is_pending(journal: Journal) -> None:
    job, ids = job_with_outbox(journal, ("PACS", "ARCHIVE"), n=1)
    pacs = [i.id for i in journal.outbox(job) if i.destination == "PACS"]
    journal.mark_failed_try(pacs, "down", next_attempt=GIVE_UP)
    assert journal.job(job).state == "written"  # ARCHIVE still pending
    journal.mark_sent([i for i in ids if i not in pacs])
    # sent + failed, nothing pending: the job has failed (until an operator retries)
    assert journal.job(job).state == "failed"


def test_retry_failed_requeues(journal: Journal) -> None:
    job, ids = job_with_outbox(journal, ("PACS", "ARCHIVE"), n=1)
    journal.mark_failed_try(ids, "down", next_attempt=GIVE_UP)
    assert journal.job(job).state == "failed"
    assert journal.retry_failed("NOWHERE") == 0
    assert journal.retry_failed("PACS") == 1
    states = {i.destination: (i.state, i.tries) for i in journal.outbox(job)}
    assert states == {"PACS": ("pending", 0), "ARCHIVE": ("failed", 1)}
    assert journal.job(job).state == "written"
    assert journal.retry_failed() == 1
    assert len(journal.due_items(now=time.time() + 1)) == 2
    journal.mark_sent(ids)
    assert journal.job(job).state == "sent"


def test_mark_failed_try_returns_the_items_given_up(journal: Journal) -> None:
    job, ids = job_with_outbox(journal, ("PACS", "ARCHIVE"), n=1)
    keep_trying = RetryPolicy(max_tries=5, backoff_initial_s=1, backoff_max_s=1).next_attempt
    assert journal.mark_failed_try(ids, "down", next_attempt=keep_trying) == []
    gone = journal.mark_failed_try(ids[:1], "status 0xA700", next_attempt=GIVE_UP)
    assert [(i.id, i.state, i.destination, i.last_error) for i in gone] == [(ids[0], "failed", "PACS",
                                                                              "status 0xA700")]


def test_an_optional_failure_is_noted_beside_the_state(journal: Journal) -> None:
    job, (agreement, other) = _job_with_follow_ups(journal, "agreement", "other")
    ids = [i.id for i in journal.outbox(job)]
    assert journal.job(job).optional_failed == ""
    journal.fail_follow_up(agreement, "RuntimeError: registration diverged", journal.claim("follow_up", agreement,
                                                                                           "w1", 30))
    journal.fail_follow_up(other, "ValueError: x", journal.claim("follow_up", other, "w1", 30))
    record = journal.job(job)
    assert record.state == "written" and record.reason == ""
    assert record.optional_failed == "agreement: RuntimeError: registration diverged; other: ValueError: x"
    assert [j.optional_failed for j in journal.jobs()] == [record.optional_failed]
    journal.mark_sent(ids)
    assert journal.job(job).state == "sent" and journal.job(job).optional_failed.startswith("agreement")


def _job_with_follow_ups(journal: Journal, *steps: str) -> tuple[int, list[int]]:
    add(journal, "1.9.1")
    version = journal.close_series(SERIES)
    assert version is not None
    job = journal.add_job(series_uid=SERIES, version=version, rule="t1-2d", action="synthesize", model="m")
    claim = journal.claim("job", job, NODE_WORKER, 60)
    journal.record_outputs(job, [("1.9.8", "sT1")], [("PACS", "/out/1.dcm", "1.2", "1.9.8.1")],
                           files=[OutputFile("sT1", "/out/1.dcm", "1.9.8", "1.2", "1.9.8.1")], follow_ups=steps,
                           claim=claim)
    return job, [f.id for f in journal.follow_ups(job)]


def test_follow_ups_are_queued_with_the_core_outputs_and_end_on_their_own(journal: Journal) -> None:
    job, (agreement, other) = _job_with_follow_ups(journal, "agreement", "other")
    assert [(f.step, f.state, f.attempts) for f in journal.follow_ups(job)] == [("agreement", "queued", 0),
                                                                               ("other", "queued", 0)]
    journal.mark_sent([i.id for i in journal.outbox(job)])
    assert journal.claim("follow_up", agreement, NODE_WORKER, 60) == Claim(NODE_WORKER, 1)
    assert journal.follow_up(agreement).state == "running"
    journal.finish_follow_up(agreement, [("1.9.9", "AGREEMENT")], [("PACS", "/out/a.dcm", "1.2", "1.9.9.1")],
                             files=[OutputFile("AGREEMENT", "/out/a.dcm", "1.9.9", "1.2", "1.9.9.1")], seconds=2.5)
    record = journal.job(job)
    # the follow-up's output is the job's: queued to be sent, the job 'written' again until it is
    assert record.state == "written" and record.timings["agreement"] == 2.5
    assert [f.kind for f in journal.output_files(job)] == ["sT1", "AGREEMENT"] and journal.is_produced("1.9.9")
    assert journal.destinations_of(job) == ["PACS"]
    journal.claim("follow_up", other, NODE_WORKER, 60)
    journal.fail_follow_up(other, "RuntimeError: boom")
    assert (journal.follow_up(other).state, journal.follow_up(other).reason) == ("failed", "RuntimeError: boom")
    record = journal.job(job)
    assert record.state == "written" and record.reason == "" and record.optional_failed == "other: RuntimeError: boom"
    assert journal.counts()["follow_ups"] == {"done": 1, "failed": 1}


def test_a_follow_up_that_wrote_nothing_is_done_with_a_note(journal: Journal) -> None:
    job, (follow_up,) = _job_with_follow_ups(journal, "agreement")
    journal.claim("follow_up", follow_up, NODE_WORKER, 60)
    journal.finish_follow_up(follow_up, [], [], seconds=0.1, note="nothing to compare with")
    record = journal.follow_up(follow_up)
    assert (record.state, record.reason) == (FollowUpState.DONE, "nothing to compare with")
    assert "agreement" not in journal.job(job).timings and journal.job(job).state == "written"


def test_interrupted_follow_ups_are_queued_again_then_quarantined(journal: Journal) -> None:
    job, (follow_up,) = _job_with_follow_ups(journal, "agreement")
    journal.claim("follow_up", follow_up, NODE_WORKER, 60)  # the node dies during the run
    resumed, gone = journal.recover_follow_ups(max_attempts=2)
    assert [f.id for f in resumed] == [follow_up] and gone == []
    assert journal.follow_up(follow_up).reason.startswith("interrupted during run 1 of at most 2")
    journal.claim("follow_up", follow_up, NODE_WORKER, 60)  # and again
    resumed, gone = journal.recover_follow_ups(max_attempts=2)
    assert resumed == [] and [(f.id, f.state) for f in gone] == [(follow_up, "failed")]
    assert gone[0].reason.startswith("quarantined: interrupted 2 times")
    assert journal.job(job).state == "written" and journal.job(job).optional_failed.startswith("agreement: quarantined")
    assert journal.recover_jobs(max_attempts=2) == ([], [])  # the job itself was never interrupted


# -- a job that failed while running: its "not processed" notice ---------------------------------

def _failed_job_with_notice(journal: Journal, destinations: tuple[str, ...] = ("PACS",)) -> tuple[int, list[int]]:
    add(journal, "1.9.1")
    version = journal.close_series(SERIES)
    job = journal.add_job(series_uid=SERIES, version=version, rule="t1-2d", action="synthesize", model="m")
    journal.fail_job(job, "inconsistent geometry: gap", journal.claim("job", job, NODE_WORKER, 60))
    notice = OutputFile("NOT_PROCESSED", "/out/not_processed.dcm", "1.9.7", "1.2.840.10008.5.1.4.1.1.7", "1.9.7.1")
    journal.record_notice(job, [("1.9.7", "NOT_PROCESSED")],
                          [(d, notice.path, notice.sop_class_uid, notice.sop_instance_uid) for d in destinations],
                          files=[notice])
    return job, [i.id for i in journal.outbox(job)]


def test_a_failed_job_stays_failed_when_its_notice_is_delivered(journal: Journal) -> None:
    job, ids = _failed_job_with_notice(journal)
    assert journal.is_produced("1.9.7")  # the loop guard knows the notice
    assert [f.kind for f in journal.output_files(job)] == ["NOT_PROCESSED"]
    assert [i.state for i in journal.outbox(job)] == ["pending"]
    journal.mark_sent(ids)
    record = journal.job(job)
    assert (record.state, record.reason) == ("failed", "inconsistent geometry: gap")
    assert journal.outbox(job)[0].state == "sent"


def test_a_failed_notice_and_its_retry_leave_the_job_failed_with_its_reason(journal: Journal) -> None:
    job, ids = _failed_job_with_notice(journal)
    (gone,) = journal.mark_failed_try(ids, "down", next_attempt=GIVE_UP)
    assert gone.state == "failed"
    assert journal.job(job).reason == "inconsistent geometry: gap"  # not "delivery failed"
    assert journal.retry_failed() == 1
    assert journal.outbox(job)[0].state == "pending"
    assert (journal.job(job).state, journal.job(job).reason) == ("failed", "inconsistent geometry: gap")
    # a job failed by its delivery is still put back by a retry
    other = journal.add_job(series_uid=SERIES, version=2, rule="t1-2d", action="synthesize", model="m")
    journal.record_outputs(other, [("1.9.9", "sT1")], [("PACS", "/out/o.dcm", "1.2", "1.9.9.1")])
    journal.mark_failed_try([i.id for i in journal.outbox(other)], "down", next_attempt=GIVE_UP)
    assert (journal.job(other).state, journal.job(other).reason) == ("failed", DELIVERY_FAILED)
    journal.retry_failed()
    assert journal.job(other).state == "written"


# -- reprocessing ------------------------------------------------------------------------------

def _routed(journal: Journal, series: str, sop: str, *, patient: str = "PAT1") -> int:
    received = ReceivedInstance(
        sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.4", study_uid=STUDY if patient == "PAT1"
        else "1.2.3.5", series_uid=series, patient_id=patient,
        header=InstanceHeader(image_position=(0.0, 0.0, 1.0), number_of_frames=1), series=ATTRIBUTES,
    )
    journal.add_instance(received, transfer_syntax="1.2.840.10008.1.2.1", path=f"/spool/{sop}.dcm", calling_ae="MR")
    version = journal.close_series(series)
    assert version is not None
    return journal.add_job(series_uid=series, version=version, rule="r", action="synthesize", model="m")


def test_request_reprocess_marks_stored_series_complete_with_a_new_version(journal: Journal) -> None:
    done = _routed(journal, "1.5.1", "1.5.1.1")
    journal.record_outputs(done, [("1.5.9", "sT1")], [])  # its output series: never reprocessed
    journal.set_job_state(_routed(journal, "1.5.2", "1.5.2.1"), JobState.FAILED, "boom")
    busy = _routed(journal, "1.5.3", "1.5.3.1")  # its job is still queued
    add(journal, "1.5.4.1", series="1.5.4")
    journal.close_series("1.5.4")
    journal.set_series_state("1.5.4", SeriesState.IGNORED, "not processed: no rule matches")
    add(journal, "1.5.5.1", series="1.5.5")  # still receiving
    journal.set_job_state(_routed(journal, "1.6.1", "1.6.1.1", patient="PAT2"), JobState.SENT)  # another patient
    add(journal, "1.5.9.1", series="1.5.9")  # the output, sent back to the node
    journal.close_series("1.5.9")
    journal.set_series_state("1.5.9", SeriesState.IGNORED, "not processed: a series this node produced")

    assert journal.request_reprocess(study_uid=STUDY) == ["1.5.1", "1.5.2", "1.5.4"]
    for uid, version in (("1.5.1", 2), ("1.5.2", 2), ("1.5.4", 2)):
        series = journal.series(uid)
        assert (series.state, series.version) == ("complete", version) and "reprocess requested" in series.note
    assert journal.series("1.5.3").state == "routed" and journal.job(busy).state == "queued"
    assert journal.series("1.5.5").state == "receiving"
    assert journal.series("1.5.9").state == "ignored"
    assert journal.series("1.6.1").state == "routed"
    # already waiting to be routed: not bumped twice
    assert journal.request_reprocess(series_uid="1.5.1") == []
    assert journal.series("1.5.1").version == 2
    assert journal.request_reprocess(patient_id="PAT2") == ["1.6.1"]
    assert journal.request_reprocess(series_uid="9.9.9") == []
    with pytest.raises(ValueError, match="exactly one"):
        journal.request_reprocess(series_uid="1.5.1", study_uid=STUDY)
    with pytest.raises(ValueError, match="exactly one"):
        journal.request_reprocess()


def test_retry_failed_of_one_job(journal: Journal) -> None:
    job, ids = job_with_outbox(journal, ("PACS",), n=1)
    add(journal, "1.9.7", series="2.2")
    other = journal.add_job(series_uid="2.2", version=1, rule="t1-2d", action="synthesize", model="m")
    journal.record_outputs(other, [("2.9", "sT1")], [("PACS", "/out/o.dcm", "1.2", "2.9.1")])
    everything = [i.id for i in journal.outbox()]
    before = time.time()
    journal.mark_failed_try(everything, "down", next_attempt=GIVE_UP)
    assert journal.retry_failed(job_id=other) == 1
    assert [(i.state, i.tries) for i in journal.outbox(other)] == [("pending", 0)]
    assert journal.outbox(other)[0].queued_at >= before  # queued again now: its age counts from the retry
    assert [i.state for i in journal.outbox(job)] == ["failed"]
    assert journal.job(other).state == "written" and journal.job(job).state == "failed"
    assert journal.retry_failed(job_id=other) == 0


def test_an_items_age_counts_from_when_it_was_queued(journal: Journal) -> None:
    before = time.time()
    job, ids = job_with_outbox(journal, ("PACS",), n=2)
    journal.mark_failed_try(ids, "down", next_attempt=lambda tries, first, now: now + 60)
    (item, _) = journal.outbox(job)
    assert before <= item.queued_at <= time.time() < item.next_attempt_at
    (pending,) = journal.outbox_summary()
    assert pending["oldest_queued_at"] == item.queued_at


# -- reprocess, dashboard, health ----------------------------------------------------------------

def _study(journal: Journal, study: str, patient: str, accession: str, series: list[str], now: float) -> None:
    for k, uid in enumerate(series):
        attrs = SeriesAttributes(series_description=f"s{k}", modality="MR", accession_number=accession,
                                 study_date="20240315")
        received = ReceivedInstance(f"{uid}.1", "1.2.840.10008.5.1.4.1.1.4", study, uid, patient,
                                    InstanceHeader(), attrs)
        journal.add_instance(received, transfer_syntax="", path=f"/s/{uid}", calling_ae="MR", now=now + k)


def test_recent_studies_newest_first_and_searched(journal: Journal) -> None:
    _study(journal, "1.1", "PAT-OLD", "ACC-100", ["1.1.1"], now=1000.0)
    _study(journal, "1.2", "PAT-NEW", "ACC-200", ["1.2.1", "1.2.2"], now=2000.0)
    _study(journal, "1.3", "other", "", ["1.3.1"], now=1500.0)
    assert [s.series_uid for s in journal.recent_studies()] == ["1.2.1", "1.2.2", "1.3.1", "1.1.1"]
    assert [s.series_uid for s in journal.recent_studies(limit=1)] == ["1.2.1", "1.2.2"]
    assert [s.series_uid for s in journal.recent_studies(search="pat-old")] == ["1.1.1"]  # any case
    assert [s.series_uid for s in journal.recent_studies(search="ACC-2")] == ["1.2.1", "1.2.2"]
    assert [s.series_uid for s in journal.recent_studies(search="PAT")] == ["1.2.1", "1.2.2", "1.1.1"]
    assert journal.recent_studies(search="%") == [] and journal.recent_studies(search="nobody") == []
    assert journal.recent_studies(search="  ")[0].attributes.accession_number == "ACC-200"  # blank: all


def test_probe_write_commits(open_journal: Callable[[], Journal]) -> None:
    journal, other = open_journal(), open_journal()
    assert journal.probe_write() >= 0
    assert float(other._query("SELECT value FROM meta WHERE key='health_probe'")[0][0]) > time.time() - 60
    journal.close()
    with pytest.raises(connection_errors()):
        journal.probe_write()


# -- summaries ---------------------------------------------------------------------------------

def test_counts_and_outbox_summary(journal: Journal) -> None:
    job, ids = job_with_outbox(journal, ("PACS",), n=3)
    add(journal, "1.9.5", series="2.2")
    journal.mark_sent(ids[:1])
    journal.mark_failed_try(ids[1:2], "refused", next_attempt=GIVE_UP)
    counts = journal.counts()
    assert counts["instances"] == {"total": 2}
    assert counts["series"] == {"routed": 1, "receiving": 1}
    assert counts["jobs"] == {"written": 1}
    assert counts["outbox"] == {"sent": 1, "failed": 1, "pending": 1}
    summary = {(r["destination"], r["state"]): r for r in journal.outbox_summary()}
    assert summary[("PACS", "failed")]["last_error"] == "refused"
    assert summary[("PACS", "pending")]["n"] == 1


# -- group commit ------------------------------------------------------------------------------

def test_concurrent_instances_are_group_committed(journal: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    batches: list[int] = []
    real_commit = Journal._commit_instances

    def spy(self: Journal, batch: list) -> None:  # noqa: ANN001
        batches.append(len(batch))
        real_commit(self, batch)

    monkeypatch.setattr(Journal, "_commit_instances", spy)
    results: dict[str, bool] = {}
    with journal._lock:  # a commit in progress: every caller queues behind it
        threads = [threading.Thread(target=lambda k=k: results.update({k: add(journal, k)}))
                   for k in (f"1.9.{i}" for i in range(6))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(journal._pending) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(journal._pending) == 6 and not results  # nobody returned before its commit
    for t in threads:
        t.join()
    assert batches == [6]  # one transaction for all six
    assert results == {f"1.9.{i}": True for i in range(6)}
    assert len(journal.instances(SERIES)) == 6


def test_a_bad_row_fails_only_its_own_caller(journal: Journal, integrity_error: type[Exception]) -> None:
    from dicom_node.journal import _PendingInstance

    good = {"sop_instance_uid": "1.9.1", "sop_class_uid": "1.2", "transfer_syntax": "1.2.840.10008.1.2.1",
            "path": "/spool/a.dcm", "geometry": "{}", "series_uid": SERIES, "study_uid": STUDY,
            "patient_id": "", "description": "", "modality": "MR", "calling_ae": "A", "series_attrs": "{}",
            "now": 100.0}
    bad = {**good, "sop_instance_uid": "1.9.2", "series_uid": "1.2.3.4.999", "study_uid": None}  # NOT NULL
    entries = [_PendingInstance(dict(good)), _PendingInstance(bad),
               _PendingInstance({**good, "sop_instance_uid": "1.9.3"})]
    with journal._lock:
        journal._commit_instances(entries)
    assert all(e.done for e in entries)
    assert entries[0].is_new and entries[2].is_new and entries[0].error is None and entries[2].error is None
    assert isinstance(entries[1].error, integrity_error)
    assert sorted(i.sop_instance_uid for i in journal.instances(SERIES)) == ["1.9.1", "1.9.3"]


def test_states_are_enums_stored_as_their_values(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    journal = Journal(path)
    job, ids = job_with_outbox(journal, ("PACS",), 1)
    assert journal.job(job).state is JobState.WRITTEN and journal.job(job).state == "written"
    assert journal.series(SERIES).state is SeriesState.ROUTED
    assert journal.outbox(job)[0].state is OutboxState.PENDING
    journal.close()
    db = sqlite3.connect(path)  # the values in the file are the plain words they always were
    assert db.execute("SELECT state FROM jobs").fetchone()[0] == "written"
    assert db.execute("SELECT state FROM series").fetchone()[0] == "routed"
    assert db.execute("SELECT state FROM outbox").fetchone()[0] == "pending"
    db.close()


# -- claims and leases (schema 6): one worker per run, taken over when its worker died ----------

def _queued_job(journal: Journal) -> int:
    add(journal, "1.9.1")
    version = journal.close_series(SERIES)
    assert version is not None
    return journal.add_job(series_uid=SERIES, version=version, rule="t1-2d", action="synthesize", model="m")


def test_a_queued_job_is_claimed_by_exactly_one_worker(open_journal: Callable[[], Journal]) -> None:
    """Two journals (two processes' connections) race for the same job: exactly one claim wins."""
    first, second = open_journal(), open_journal()
    job = _queued_job(first)
    assert first.next_queued() == ("job", job)
    won = [j.claim("job", job, worker, 30) for j, worker in ((first, "w1"), (second, "w2"))]
    assert won == [Claim("w1", 1), None]
    record = second.job(job)
    assert (record.state, record.attempts) == ("running", 1) and second.next_queued() is None
    assert first.claim("job", job, "w1", 30) is None  # not queued any more, even for its holder


def test_a_lease_is_renewed_while_held_and_only_by_its_holder(journal: Journal) -> None:
    job = _queued_job(journal)
    claim = journal.claim("job", job, "w1", 0.5)
    assert claim is not None
    lease = journal._query("SELECT lease_until FROM jobs WHERE id=?", (job,))[0][0]
    assert journal.renew("job", job, claim, 30)
    assert journal._query("SELECT lease_until FROM jobs WHERE id=?", (job,))[0][0] > lease + 20
    assert not journal.renew("job", job, Claim("w2", 1), 30) and not journal.renew("job", job, Claim("w1", 2), 30)


def test_an_expired_claim_is_taken_over_and_the_old_run_records_nothing(journal: Journal) -> None:
    job = _queued_job(journal)
    old = journal.claim("job", job, "w1", 0.2)
    assert old is not None
    # a live worker's claim is left alone, by another worker's pass and by a node starting beside it
    assert journal.recover_jobs(max_attempts=3, own=None) == ([], [])
    assert journal.recover_jobs(max_attempts=3) == ([], [])
    assert journal.job(job).state == "running"
    time.sleep(0.3)  # w1 died: its lease runs out
    resumed, gone = journal.recover_jobs(max_attempts=3, own=None)
    assert [j.id for j in resumed] == [job] and gone == []
    assert journal.job(job).reason == "interrupted during run 1 of at most 3: queued again"
    new = journal.claim("job", job, "w2", 30)
    assert new == Claim("w2", 2)
    assert not journal.renew("job", job, old, 30)
    items = [("PACS", "/o/1.dcm", "1.2", "1.9.9.1")]
    with pytest.raises(ClaimLost):  # w1 was only stalled: what it wrote is refused, in full
        journal.record_outputs(job, [("1.9.9", "sT1")], items, claim=old, follow_ups=["agreement"])
    with pytest.raises(ClaimLost):
        journal.fail_job(job, "late", old)
    assert journal.outbox(job) == [] and journal.follow_ups(job) == [] and not journal.is_produced("1.9.9")
    journal.record_outputs(job, [("1.9.9", "sT1")], items, claim=new, follow_ups=["agreement"])
    assert journal.job(job).state == "written" and len(journal.outbox(job)) == 1


def test_an_expired_claim_out_of_attempts_is_quarantined(journal: Journal) -> None:
    job = _queued_job(journal)
    assert journal.claim("job", job, "w1", 0.0) is not None
    time.sleep(0.01)
    resumed, gone = journal.recover_jobs(max_attempts=1, own=None)
    assert resumed == [] and [(j.id, j.state) for j in gone] == [(job, "failed")]
    assert gone[0].reason.startswith("quarantined: interrupted 1 times")


def test_a_node_takes_back_its_own_claims_at_once(journal: Journal) -> None:
    """A receiving node restarting takes back the runs it (NODE_WORKER) held, without waiting for their lease;
    a worker process's live claim stays with it."""
    own, other = _queued_job(journal), journal.add_job(series_uid=SERIES, version=1, rule="r", action="a", model="m")
    assert journal.claim("job", own, NODE_WORKER, 60) and journal.claim("job", other, "worker@h:1", 60)
    resumed, gone = journal.recover_jobs(max_attempts=3)
    assert [j.id for j in resumed] == [own] and gone == []
    assert journal.job(other).state == "running"


def test_follow_up_claims_are_fenced_too(journal: Journal) -> None:
    job, (follow_up,) = _job_with_follow_ups(journal, "agreement")
    assert journal.next_queued() == ("follow_up", follow_up)
    old = journal.claim("follow_up", follow_up, "w1", 0.0)
    assert old is not None and journal.claim("follow_up", follow_up, "w2", 30) is None
    time.sleep(0.01)
    resumed, _ = journal.recover_follow_ups(max_attempts=3, own=None)
    assert [f.id for f in resumed] == [follow_up]
    new = journal.claim("follow_up", follow_up, "w2", 30)
    with pytest.raises(ClaimLost):
        journal.finish_follow_up(follow_up, [], [], note="late", claim=old)
    with pytest.raises(ClaimLost):
        journal.fail_follow_up(follow_up, "late", old)
    journal.finish_follow_up(follow_up, [], [], note="nothing to compare with", claim=new)
    assert (journal.follow_up(follow_up).state, journal.job(job).optional_failed) == ("done", "")


def test_a_version_5_journal_gets_claims(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    job = _older_journal(path, 5, "ALTER TABLE jobs DROP COLUMN worker", "ALTER TABLE jobs DROP COLUMN lease_until",
                         "ALTER TABLE follow_ups DROP COLUMN worker", "ALTER TABLE follow_ups DROP COLUMN lease_until",
                         "UPDATE jobs SET state='running', attempts=1")  # a run interrupted under schema 5
    journal = Journal(path)
    try:
        resumed, _ = journal.recover_jobs(max_attempts=3)  # the node's own: taken back at once
        assert [j.id for j in resumed] == [job]
        assert journal.claim("job", job, "w1", 30) == Claim("w1", 2)
    finally:
        journal.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "7"
    db.close()


def test_a_series_purged_then_received_again_can_be_reprocessed(journal: Journal) -> None:
    """Retention took its instances: nothing to reprocess. Received again: its new instances are (review finding:
    the series' purged_at alone used to refuse it for good)."""
    add(journal, "1.9.1", now=1000.0)
    journal.close_series(SERIES)
    journal.set_series_state(SERIES, SeriesState.IGNORED, "no rule matched")
    assert journal.begin_purge(SERIES, delivered_before=2e9, not_processed_before=2e9,
                               job_folder=lambda job: f"/out/job-{job}") is not None
    assert journal.request_reprocess(series_uid=SERIES) == []
    add(journal, "1.9.2")
    journal.close_series(SERIES)
    journal.set_series_state(SERIES, SeriesState.IGNORED, "no rule matched")
    assert journal.request_reprocess(series_uid=SERIES) == [SERIES]


def test_a_complete_series_is_routed_once_by_racing_receivers(journal: Journal) -> None:
    """Receivers sharing the journal all sweep: of those routing one closed series, exactly one queues its job."""
    add(journal, "1.2.3.4.100.1")
    version = journal.close_series(SERIES)
    assert version is not None
    barrier = threading.Barrier(4)
    results: list[int | None] = []

    def route() -> None:
        barrier.wait()
        results.append(journal.route_series(SERIES, version, rule="r", action="synthesize", model="m"))

    threads = [threading.Thread(target=route) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    [job_id] = [r for r in results if r is not None]
    assert results.count(None) == 3 and [j.id for j in journal.jobs()] == [job_id]
    assert journal.series(SERIES).state == "routed"
    assert not journal.ignore_series(SERIES, version, "no rule")  # routed already: not overwritten
    assert journal.route_series(SERIES, version + 1, rule="r", action="synthesize", model="m") is None  # stale


def test_a_series_no_rule_matches_is_ignored_once(journal: Journal) -> None:
    add(journal, "1.2.3.4.100.1")
    version = journal.close_series(SERIES)
    assert version is not None
    assert journal.ignore_series(SERIES, version, "not processed: no rule matches")
    assert journal.series(SERIES).state == "ignored"
    assert journal.route_series(SERIES, version, rule="r", action="synthesize", model="m") is None
    assert journal.jobs() == []


# -- outbox claims (schema 7): several dispatchers sharing one outbox --------------------------------

def test_outbox_items_are_claimed_per_destination_by_one_dispatcher_each(open_journal: Callable[[], Journal]) -> None:
    first, second = open_journal(), open_journal()
    job, ids = job_with_outbox(first, ("PACS", "ARCHIVE"), n=3)  # PACS: ids[0:3], ARCHIVE: ids[3:6]
    a = first.claim_outbox("d1", 30, limit=2)
    assert a is not None and a.destination == "PACS" and [i.id for i in a.items] == ids[:2]
    assert {i.worker for i in a.items} == {"d1"} and all(i.lease_until > time.time() + 20 for i in a.items)
    b = second.claim_outbox("d2", 30)
    assert b is not None and b.destination == "PACS" and [i.id for i in b.items] == ids[2:3]
    c = second.claim_outbox("d2", 30, destination="ARCHIVE", limit=10)
    assert c is not None and [i.id for i in c.items] == ids[3:]
    assert first.claim_outbox("d1", 30) is None  # everything due is held
    assert len({a.token, b.token, c.token}) == 3
    # not due yet: a retry's next attempt lies ahead
    first.mark_failed_try(ids[2:3], "refused", next_attempt=lambda tries, first_at, now: now + 100, claim=b)
    assert first.claim_outbox("d1", 30) is None
    first.mark_sent(ids[:2], claim=a)
    later = first.claim_outbox("d1", 30, now=time.time() + 101)  # due again; the claims of 30 s have expired
    assert later is not None and [i.id for i in later.items] == ids[2:3]


def test_an_outbox_outcome_is_fenced_by_its_claim(journal: Journal) -> None:
    job, ids = job_with_outbox(journal, ("PACS",), n=2)
    old = journal.claim_outbox("d1", 0.05)
    assert old is not None and [i.id for i in old.items] == ids
    assert journal.renew_outbox(old, 0.05) == ids
    time.sleep(0.1)  # d1 stalled: its lease ran out
    new = journal.claim_outbox("d2", 30)
    assert new is not None and [i.id for i in new.items] == ids and new.token != old.token
    assert journal.renew_outbox(old, 30) == []
    with pytest.raises(ClaimLost, match="no longer claimed by d1"):
        journal.mark_sent(ids[:1], claim=old)
    with pytest.raises(ClaimLost):
        journal.mark_failed_try(ids, "late", next_attempt=GIVE_UP, claim=old)
    assert [(i.state, i.tries) for i in journal.outbox(job)] == [("pending", 0), ("pending", 0)]  # nothing recorded
    journal.mark_sent(ids[:1], claim=new)
    assert journal.renew_outbox(new, 30) == ids[1:]  # the sent one is no longer held
    journal.mark_failed_try(ids[1:], "refused", next_attempt=GIVE_UP, claim=new)
    assert [i.state for i in journal.outbox(job)] == ["sent", "failed"]
    assert journal.job(job).state == JobState.FAILED and journal.job(job).reason == DELIVERY_FAILED
    with pytest.raises(ClaimLost):  # settled: no claim holds it any more
        journal.mark_sent(ids[1:], claim=new)


def test_a_released_outbox_claim_is_taken_at_once(journal: Journal) -> None:
    job, ids = job_with_outbox(journal, ("PACS",), n=2)
    claim = journal.claim_outbox("d1", 60)
    assert claim is not None and journal.claim_outbox("d2", 60) is None
    journal.mark_sent(ids[:1], claim=claim)
    assert journal.release_outbox(claim) == 1
    again = journal.claim_outbox("d2", 60)
    assert again is not None and [i.id for i in again.items] == ids[1:]
    journal.mark_sent(ids[1:], claim=again)
    assert journal.job(job).state == JobState.SENT
