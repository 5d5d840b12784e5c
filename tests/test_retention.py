"""Tests for dicom_node.retention: what is deleted when, what never is, a crash mid-sweep, a re-send after a purge.

Real files in a real spool and journal; the SCP in process on loopback for the re-sends (pynetdicom as the
scanner); ``now`` moved forward instead of waiting days.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE

import dicom_node.retention as retention
from dicom_node import cli
from dicom_node.config import NodeConfig, NodeSettings, RetentionSettings
from dicom_node.headers import describe
from dicom_node.journal import JobState, Journal, OutputFile, SeriesState
from dicom_node.rebuild import unknown_files
from dicom_node.retention import DAY, Retention
from dicom_node.scp import StorageSCP, stored_digest
from dicom_node.spool import Spool
from dicom_node.steps import counterpart_side
from tests.dicom_factory import make_mr_series, make_study
from tests.e2e.node_proc import config_toml
from tests.e2e.peers import free_port

NODE_AE = "RETENTION_NODE"
GIVE_UP = lambda *_: None  # noqa: E731 - the retry policy of a destination that failed for good


class Site:
    """A data directory (spool, journal, outputs) and the series received into it."""

    def __init__(self, tmp_path: Path, **retention_settings: Any) -> None:
        self.data_dir = tmp_path / "data"
        self.config = NodeConfig(
            node=NodeSettings(ae_title=NODE_AE, host="127.0.0.1", port=free_port(), data_dir=self.data_dir,
                              fsync=False, network_timeout_s=10),
            retention=RetentionSettings(**retention_settings),
        )
        self.journal = Journal(self.data_dir / "journal.sqlite3", fsync=False)
        self.spool = Spool(self.data_dir / "spool", fsync=False)
        self.retention = Retention(self.config, self.journal)
        self.sources = tmp_path / "sources"
        self._n = 0

    def receive(self, n: int = 3, description: str = "t1_fl2d_sag") -> tuple[str, list[Path]]:
        """File a new series as the SCP would (spool file, journal row); returns its UID and spool paths."""
        self._n += 1
        files = make_mr_series(self.sources / str(self._n), shape=(n, 8, 8), series_description=description,
                               study=make_study())
        paths = []
        for file in files:
            ds = dcmread(file)
            received = describe(ds)
            path = self.spool.write(received.study_uid, received.series_uid, received.sop_instance_uid,
                                    file.read_bytes())
            self.journal.add_instance(received, transfer_syntax=ExplicitVRLittleEndian, path=str(path),
                                      calling_ae="MR1", sha256=stored_digest(path))
            paths.append(path)
        return str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID), paths

    def process(self, series_uid: str, destinations: tuple[str, ...] = ("PACS",)) -> tuple[int, Path]:
        """Close the series and run a (pretend) job: its folder with two output files, queued per destination."""
        version = self.journal.close_series(series_uid)
        assert version is not None
        job = self.journal.add_job(series_uid=series_uid, version=version, rule="t1-2d", action="synthesize",
                                   model="m")
        folder = self.data_dir / "outputs" / f"job-{job:06d}"
        folder.mkdir(parents=True)
        outputs = []
        for k in range(2):
            path = folder / f"sT1-{k}.dcm"
            path.write_bytes(b"output" * 100)
            outputs.append((str(path), f"1.9.{job}.{k}"))
        (folder / "t1.mha").write_bytes(b"kept volume")
        items = [(d, p, "1.2.840.10008.5.1.4.1.1.4", uid) for d in destinations for p, uid in outputs]
        files = [OutputFile("sT1", p, f"1.9.{job}", "1.2.840.10008.5.1.4.1.1.4", uid) for p, uid in outputs]
        files.append(OutputFile("T1_VOLUME", str(folder / "t1.mha")))
        self.journal.record_outputs(job, [(f"1.9.{job}", "sT1")], items, files=files, output_name="sT12DT1")
        return job, folder

    def deliver(self, job: int) -> None:
        self.journal.mark_sent([i.id for i in self.journal.outbox(job)])

    def ignore(self, series_uid: str) -> None:
        assert self.journal.close_series(series_uid) is not None
        self.journal.set_series_state(series_uid, SeriesState.IGNORED, "no rule matched")

    def age(self, series_uid: str, days: float) -> None:
        """Make a series and its jobs ``days`` older (received, updated and sent that much earlier)."""
        shift = days * DAY
        db = sqlite3.connect(self.data_dir / "journal.sqlite3")
        with db:
            db.execute("UPDATE series SET first_received=first_received-?, last_received=last_received-?"
                       " WHERE series_uid=?", (shift, shift, series_uid))
            db.execute("UPDATE jobs SET created_at=created_at-?, updated_at=updated_at-? WHERE series_uid=?",
                       (shift, shift, series_uid))
        db.close()

    def close(self) -> None:
        self.journal.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    yield s
    s.close()


def later(days: float) -> float:
    return time.time() + days * DAY


def on_disk(paths: list[Path]) -> list[bool]:
    return [p.exists() for p in paths]


# -- what is deleted, and when -----------------------------------------------------------------------------

def test_delivered_series_is_deleted_after_its_age_and_the_record_stays(site: Site) -> None:
    uid, spooled = site.receive()
    job, folder = site.process(uid)
    site.deliver(job)
    assert site.retention.sweep(now=later(29)).series == []  # 30 days by default
    assert all(on_disk(spooled)) and folder.is_dir()

    result = site.retention.sweep(now=later(31))
    assert [c.series_uid for c in result.series] == [uid] and result.instances == 3 and result.jobs == 1
    assert result.bytes_freed > 3 * 128 and result.refused == [] and result.kept == 0
    assert not any(on_disk(spooled)) and not folder.exists()
    assert not spooled[0].parent.exists() and not spooled[0].parent.parent.exists()  # empty folders go too
    assert (site.data_dir / "spool").is_dir() and (site.data_dir / "outputs").is_dir()
    # the record: who sent what when, what was produced and sent where, when
    series = site.journal.series(uid)
    assert series.purged_at > 0 and series.purged_instances == 3 and series.n_instances == 0
    assert series.state == SeriesState.ROUTED and series.calling_ae == "MR1" and series.description == "t1_fl2d_sag"
    assert site.journal.job(job).state == JobState.SENT and site.journal.job(job).purged_at > 0
    sent = site.journal.outbox(job)
    assert [(i.destination, i.state) for i in sent] == [("PACS", "sent")] * 2 and all(i.sent_at > 0 for i in sent)
    assert site.journal.is_produced(f"1.9.{job}")  # the loop guard still knows the node's own series
    assert site.journal.counts()["purged"] == {"series": 1, "instances": 3}
    assert site.journal.pending_purges() == []
    assert site.retention.sweep(now=later(60)).series == []  # nothing left to delete


def test_not_processed_series_have_their_own_age(tmp_path: Path) -> None:
    site = Site(tmp_path, delivered_days=30, not_processed_days=5)
    try:
        ignored, ignored_files = site.receive(description="localizer")
        site.ignore(ignored)
        failed, failed_files = site.receive()
        job, folder = site.process(failed, destinations=())  # no destination: sent at once ...
        site.journal.set_job_state(job, JobState.FAILED, "too few slices")  # ... say it failed instead
        delivered, delivered_files = site.receive()
        site.deliver(site.process(delivered)[0])

        assert site.retention.sweep(now=later(4)).series == []
        result = site.retention.sweep(now=later(6))
        assert {c.series_uid for c in result.series} == {ignored, failed}
        assert not any(on_disk(ignored_files + failed_files)) and not folder.exists()
        assert all(on_disk(delivered_files))
        assert site.journal.job(job).reason == "too few slices"  # why it was not processed stays
        assert site.journal.series(ignored).note == "no rule matched"
        assert [c.series_uid for c in site.retention.sweep(now=later(31)).series] == [delivered]
    finally:
        site.close()


def test_what_is_still_needed_is_never_deleted(site: Site) -> None:
    receiving, receiving_files = site.receive()
    complete, complete_files = site.receive()
    assert site.journal.close_series(complete) is not None  # closed, not routed yet
    queued, queued_files = site.receive()
    site.journal.add_job(series_uid=queued, version=site.journal.close_series(queued), rule="r", action="a",
                         model=None)
    running, running_files = site.receive()
    site.journal.claim("job", site.journal.add_job(series_uid=running, version=site.journal.close_series(running),
                                                   rule="r", action="a", model=None), "worker@h:1", 60)
    pending, pending_files = site.receive()
    pending_job, pending_folder = site.process(pending, destinations=("PACS", "ARCHIVE"))
    site.journal.mark_sent([i.id for i in site.journal.outbox(pending_job) if i.destination == "PACS"])
    failed, failed_files = site.receive()
    failed_job, failed_folder = site.process(failed)
    site.journal.mark_failed_try([i.id for i in site.journal.outbox(failed_job)], "refused", next_attempt=GIVE_UP)
    assert site.journal.job(failed_job).state == JobState.FAILED

    kept = receiving_files + complete_files + queued_files + running_files + pending_files + failed_files
    assert site.retention.due(now=later(10_000)) == []
    assert site.retention.sweep(now=later(10_000)).series == []
    assert all(on_disk(kept)) and pending_folder.is_dir() and failed_folder.is_dir()

    # once `retry` delivers what had failed for good, it ages like any delivered series
    assert site.journal.retry_failed() == 2
    site.deliver(failed_job)
    assert [c.series_uid for c in site.retention.sweep(now=later(31)).series] == [failed]


def test_retention_measures_from_the_last_delivery(site: Site) -> None:
    uid, files = site.receive()
    job, _ = site.process(uid)
    site.journal.record_outputs(job, [], [], follow_ups=["agreement"])  # queued with the core outputs
    site.deliver(job)
    # the optional step's output queued later: the job is 'written' again, then delivered again
    (follow_up,) = site.journal.follow_ups(job)
    site.journal.finish_follow_up(follow_up.id, [("1.9.99", "AGREEMENT")],
                                  [("PACS", "/nowhere/agreement.dcm", "1.2", "1.9.99.1")],
                                  claim=site.journal.claim("follow_up", follow_up.id, "w1", 60))
    assert site.journal.job(job).state == JobState.WRITTEN
    assert site.retention.sweep(now=later(31)).series == []
    site.deliver(job)
    assert [c.series_uid for c in site.retention.sweep(now=later(31)).series] == [uid]


def test_a_series_waits_for_its_follow_ups(site: Site) -> None:
    """A follow-up still to run reads the job's files: the series is kept until it has run."""
    uid, files = site.receive()
    job, folder = site.process(uid)
    site.journal.record_outputs(job, [], [], follow_ups=["agreement"])  # queued with the core outputs
    site.deliver(job)
    assert site.retention.sweep(now=later(31)).series == []
    (follow_up,) = site.journal.follow_ups(job)
    site.journal.claim("follow_up", follow_up.id, "w1", 60)
    assert site.retention.sweep(now=later(31)).series == []
    site.journal.finish_follow_up(follow_up.id, [], [], note="nothing to compare with")
    assert [c.series_uid for c in site.retention.sweep(now=later(31)).series] == [uid]
    assert not any(on_disk(files)) and not folder.exists()


def test_dry_run_deletes_nothing(site: Site) -> None:
    uid, files = site.receive()
    site.ignore(uid)
    result = site.retention.sweep(now=later(31), dry_run=True)
    assert [c.series_uid for c in result.series] == [uid] and result.instances == 3
    assert all(on_disk(files)) and site.journal.series(uid).n_instances == 3
    assert site.journal.series(uid).purged_at == 0


def test_a_purged_job_is_no_counterpart_for_an_agreement_check(site: Site) -> None:
    uid, _ = site.receive()
    job, _ = site.process(uid)
    site.deliver(job)
    study = site.journal.series(uid).study_uid
    # a volumetry job of the same study looks for an sT1 to compare with: found while its files are there ...
    real_t1 = replace(site.journal.job(job), id=0, action="volumetry")
    site.journal.record_notice(job, [], [], files=[OutputFile("LABEL_VOLUME", "/l.mha"), OutputFile("SEG", "/s.dcm")])
    assert counterpart_side(site.journal, real_t1, study) is not None
    site.retention.sweep(now=later(31))
    assert counterpart_side(site.journal, real_t1, study) is None  # ... not once they are deleted


# -- crash safety ------------------------------------------------------------------------------------------

def test_a_crash_mid_sweep_loses_nothing_needed_and_the_next_start_finishes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = Site(tmp_path)
    old, old_files = site.receive(n=5)
    old_job, old_folder = site.process(old)
    site.deliver(old_job)
    undelivered, undelivered_files = site.receive()
    undelivered_job, undelivered_folder = site.process(undelivered)

    real_remove = retention.remove
    removed: list[Path] = []

    def crash_after_two(path: Path) -> int | None:
        if len(removed) == 2:
            raise KeyboardInterrupt("the process dies here")  # not an Exception: nothing may catch it
        removed.append(path)
        return real_remove(path)

    monkeypatch.setattr(retention, "remove", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        site.retention.sweep(now=later(31))
    site.close()
    monkeypatch.setattr(retention, "remove", real_remove)

    # the decision is durable: the instances are forgotten, every file not yet deleted is recorded
    journal = Journal(site.data_dir / "journal.sqlite3", fsync=False)
    try:
        assert journal.series(old).purged_instances == 5 and journal.instances(old) == []
        pending = {f.path for f in journal.pending_purges()}
        assert len(removed) == 2 and pending  # the batch's deletions were rolled back in the journal only
        assert {str(p) for p in old_files if p.exists()} <= pending
        assert not unknown_files(journal, site.data_dir / "spool")  # no "unknown spool file" warning meanwhile
        assert journal.instances(undelivered) and journal.job(undelivered_job).purged_at == 0
    finally:
        journal.close()

    # the next start of the node finishes the sweep before anything else
    from dicom_node.service import Node

    (tmp_path / "models").mkdir()
    config = tmp_path / "node.toml"
    config.write_text(config_toml({
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": free_port(), "data_dir": str(site.data_dir),
                 "fsync": False},
        "inference": {"models_dir": str(tmp_path / "models")},
        "rules": [],
    }))
    node = Node(cli.load_config(config))
    node.start()
    try:
        assert node.journal.pending_purges() == []
    finally:
        node.stop()
    assert not any(on_disk(old_files)) and not old_folder.exists()
    assert all(on_disk(undelivered_files)) and undelivered_folder.is_dir()  # never touched
    assert all(Path(i.path).exists() for i in Journal(site.data_dir / "journal.sqlite3").outbox(undelivered_job))


def test_a_crash_while_deciding_changes_nothing(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    uid, files = site.receive()
    job, folder = site.process(uid)
    site.deliver(job)

    def dies(job_id: int) -> str:
        raise KeyboardInterrupt("the process dies inside the transaction")

    monkeypatch.setattr(site.retention, "job_folder", dies)
    with pytest.raises(KeyboardInterrupt):
        site.retention.sweep(now=later(31))
    assert len(site.journal.instances(uid)) == 3 and site.journal.series(uid).purged_at == 0
    assert site.journal.pending_purges() == [] and all(on_disk(files)) and folder.is_dir()


def test_a_recorded_path_outside_the_data_directory_is_never_deleted(site: Site, tmp_path: Path) -> None:
    outside = tmp_path / "precious.dcm"
    outside.write_bytes(b"not the node's")
    uid, files = site.receive()
    job, _ = site.process(uid)
    site.journal.record_notice(job, [], [("PACS", str(outside), "1.2", "1.9.77")])  # a corrupt or edited row
    site.deliver(job)
    result = site.retention.sweep(now=later(31))
    assert result.refused == [str(outside)] and outside.exists() and not any(on_disk(files))


# -- received again after the purge ------------------------------------------------------------------------

class Scanner:
    """The SCP of ``site`` on loopback, and pynetdicom as the scanner."""

    def __init__(self, site: Site) -> None:
        self.released: list[set[str]] = []
        self.scp = StorageSCP(site.config, site.spool, site.journal, on_released=self.released.append)
        self.scp.start()

    def send(self, files: list[Path]) -> list[int]:
        ae = AE(ae_title="MR1")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", self.scp.port, ae_title=NODE_AE)
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(dcmread(f)).Status) for f in files]
        assoc.release()
        return statuses

    def stop(self) -> None:
        self.scp.stop()


@pytest.fixture
def scanner(site: Site) -> Iterator[Scanner]:
    s = Scanner(site)
    yield s
    s.stop()


def _sources(site: Site, n: int) -> list[Path]:
    return sorted((site.sources / str(n)).glob("*.dcm"))


def test_a_series_sent_again_after_its_purge_is_received_and_processed_again(site: Site, scanner: Scanner) -> None:
    uid, spooled = site.receive()
    job, _ = site.process(uid)
    site.deliver(job)
    site.retention.sweep(now=later(31))
    assert not any(on_disk(spooled))

    assert scanner.send(_sources(site, 1)) == [0, 0, 0]
    # new instances, not duplicates of forgotten rows: stored, and the series receives again
    assert all(on_disk(spooled)) and len(site.journal.instances(uid)) == 3
    series = site.journal.series(uid)
    assert series.state == SeriesState.RECEIVING and series.purged_instances == 3
    assert site.journal.close_series(uid) == 2  # processed again as version 2
    assert site.journal.counts()["instances"] == {"total": 3}


def test_a_resend_racing_the_purge_is_stored(site: Site, scanner: Scanner, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same objects arrive while a sweep purges their series: each one the SCP acknowledges is on disk."""
    uid, spooled = site.receive()
    job, _ = site.process(uid)
    site.deliver(job)
    now = later(31)

    # 1. the look-up finds the instance, then the sweep decides the purge before the SCP confirms it
    confirm = site.journal.confirm_instance
    raced = []

    def purge_first(sop_uid: str, now_: float | None = None) -> bool:
        if not raced:
            raced.append(site.journal.begin_purge(uid, job_folder=site.retention.job_folder, now=now,
                                                  **site.retention._cutoffs(now)))
        return confirm(sop_uid)

    monkeypatch.setattr(site.journal, "confirm_instance", purge_first)
    assert scanner.send(_sources(site, 1)[:1]) == [0]
    assert raced[0] is not None and len(site.journal.instances(uid)) == 1  # stored as new
    # 2. the purge's deletions then keep the file received again
    assert site.retention.finish_pending().kept == 1 and spooled[0].exists()
    assert not any(on_disk(spooled[1:]))
    monkeypatch.undo()

    # 3. the sweep deletes a file between the SCP's write and its journal row: written again before the answer
    add_instance = site.journal.add_instance
    uid2, spooled2 = site.receive()
    job2, _ = site.process(uid2)
    site.deliver(job2)
    assert site.journal.begin_purge(uid2, job_folder=site.retention.job_folder, now=now,
                                    **site.retention._cutoffs(now)) is not None

    def purge_in_between(*args: Any, **kwargs: Any) -> bool:
        site.retention.finish_pending()  # deletes the file just written: no row points at it yet
        return add_instance(*args, **kwargs)

    monkeypatch.setattr(site.journal, "add_instance", purge_in_between)
    assert scanner.send(_sources(site, 2)) == [0, 0, 0]
    assert all(on_disk(spooled2)) and len(site.journal.instances(uid2)) == 3


def test_a_known_instance_whose_file_is_missing_is_written_again(site: Site, scanner: Scanner) -> None:
    """E.g. the SCP's second write after a sweep took its file failed: the sender's retry restores it."""
    uid, spooled = site.receive()
    spooled[0].unlink()
    assert scanner.send(_sources(site, 1)) == [0, 0, 0]
    assert all(on_disk(spooled)) and len(site.journal.instances(uid)) == 3
    assert stored_digest(spooled[0]) == site.journal.instance(str(dcmread(spooled[0]).SOPInstanceUID)).sha256


def test_a_duplicate_keeps_its_series_from_this_sweep(site: Site, scanner: Scanner) -> None:
    """A re-send of stored objects acknowledged as duplicates counts as received now: the sweep leaves them."""
    uid, spooled = site.receive()
    job, _ = site.process(uid)
    site.deliver(job)
    site.age(uid, 40)  # delivered 40 days ago: due
    assert [c.series_uid for c in site.retention.due()] == [uid]
    assert scanner.send(_sources(site, 1)) == [0, 0, 0]  # acknowledged as already stored ...
    assert len(site.journal.instances(uid)) == 3 and site.journal.series(uid).state == SeriesState.ROUTED
    assert site.retention.sweep().series == []  # ... so kept for now
    assert all(on_disk(spooled))
    assert [c.series_uid for c in site.retention.sweep(now=later(31)).series] == [uid]


# -- the command ---------------------------------------------------------------------------------------------

def test_purge_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = Site(tmp_path)
    uid, files = site.receive()
    site.ignore(uid)
    site.age(uid, 2)
    site.journal.close()
    config = tmp_path / "node.toml"
    config.write_text(config_toml({"node": {"data_dir": str(site.data_dir), "fsync": False},
                                   "retention": {"not_processed_days": 3}}))
    assert cli.main(["purge", "--config", str(config), "--dry-run"]) == 0
    assert "would delete 0 series" in capsys.readouterr().out
    config.write_text(config_toml({"node": {"data_dir": str(site.data_dir), "fsync": False},
                                   "retention": {"not_processed_days": 1.5}}))
    assert cli.main(["purge", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete: series 't1_fl2d_sag'" in out and "not processed" in out and all(on_disk(files))
    assert cli.main(["purge", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "deleted 1 series (3 instance(s)" in out and not any(on_disk(files))
    assert cli.main(["status", "--config", str(config)]) == 3  # the node is not running
    out = capsys.readouterr().out
    assert "instances received: 3 (3 deleted by retention, from 1 series)" in out
    assert "[3 inst deleted" in out

    config.write_text(config_toml({"node": {"data_dir": str(site.data_dir)}, "retention": {"enabled": False}}))
    assert cli.main(["purge", "--config", str(config)]) == 0
    assert "retention is disabled" in capsys.readouterr().out


def test_job_folders_are_deleted_outside_the_journal_transaction(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's folder may take long to delete: the journal's write lock is not held meanwhile (C-STORE acks and lease
    renewals go on); an instance file is removed under it (a C-STORE of the same path waits, see finish_purge)."""
    uid, files = site.receive()
    job, folder = site.process(uid)
    site.deliver(job)
    other = Journal(site.data_dir / "journal.sqlite3", fsync=False)  # another process's connection
    other._db.db.execute("PRAGMA busy_timeout=0")  # a held write lock fails it at once
    real_remove = retention.remove
    writable: dict[str, bool] = {}

    def remove(path: Path) -> int | None:
        try:
            other.probe_write()
            writable[path.name] = True
        except sqlite3.OperationalError:  # database is locked
            writable[path.name] = False
        return real_remove(path)

    monkeypatch.setattr(retention, "remove", remove)
    try:
        result = site.retention.sweep(now=later(31))
    finally:
        other.close()
    assert [c.series_uid for c in result.series] == [uid] and not folder.exists() and not any(on_disk(files))
    assert writable[folder.name]
    assert [writable[p.name] for p in files] == [False] * len(files)
    assert site.journal.pending_purges() == []


def test_a_folder_that_cannot_be_deleted_stays_recorded(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    uid, files = site.receive()
    job, folder = site.process(uid)
    site.deliver(job)
    real_remove = retention.remove

    def refuse_folders(path: Path) -> int | None:
        if path.is_dir():
            raise PermissionError(13, "Permission denied", str(path))
        return real_remove(path)

    monkeypatch.setattr(retention, "remove", refuse_folders)
    result = site.retention.sweep(now=later(31))
    assert result.undeleted == [str(folder)]
    assert folder.is_dir() and {f.path for f in site.journal.pending_purges()} == {str(folder)}
    assert not any(on_disk(files))  # the rest of the batch went on
    monkeypatch.setattr(retention, "remove", real_remove)
    site.retention.finish_pending()
    assert not folder.exists() and site.journal.pending_purges() == []


def test_a_file_that_cannot_be_deleted_does_not_stop_later_purges(site: Site, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A PermissionError (or NFS's EBUSY) deleting one file came out of finish_purge, and every sweep began with the
    same oldest batch of purge_files: no later series was ever purged and the disk filled. Now the file is logged,
    stays recorded behind the others, and is tried again at each sweep; the other purges go on."""
    first, first_files = site.receive()
    job, _ = site.process(first)
    site.deliver(job)
    stuck = first_files[0]
    real_remove = retention.remove

    def refuse_one(path: Path) -> int | None:
        if path == stuck:
            raise PermissionError(13, "Permission denied", str(path))
        return real_remove(path)

    monkeypatch.setattr(retention, "remove", refuse_one)
    with caplog.at_level("ERROR", logger="dicom_node.retention"):
        assert [c.series_uid for c in site.retention.sweep(now=later(31)).series] == [first]
    assert f"cannot delete {stuck}: Permission denied" in caplog.text
    second, second_files = site.receive()
    site.ignore(second)
    result = site.retention.sweep(now=later(31))
    assert [c.series_uid for c in result.series] == [second] and not any(on_disk(second_files))
    assert result.undeleted == [str(stuck)]  # tried again once in this sweep, still refused
    assert on_disk(first_files) == [True] + [False] * (len(first_files) - 1)
    assert [f.path for f in site.journal.pending_purges()] == [str(stuck)]
    monkeypatch.setattr(retention, "remove", real_remove)  # the permission is fixed: the next sweep deletes it
    assert not site.retention.sweep(now=later(31)).undeleted
    assert not stuck.exists() and site.journal.pending_purges() == []
