"""Tests for dicom_node.service: crash recovery of jobs, with the real node in child processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from pydicom import dcmread

from dicom_node.journal import Journal
from tests.dicom_factory import make_mr_series
from tests.e2e.peers import free_port
from tests.onnx_fixtures import make_synthesis_model
from tests.test_jobs import MODEL, SHAPE, SPACING, record_series

if TYPE_CHECKING:
    from dicom_node.service import Node

REPO = Path(__file__).resolve().parents[1]

#: The node as `dicom-node serve` runs it, except that reading a "poison" series kills the process
#: (what a fatal crash in a decoder or the model does), and with $KILL_IN_AGREEMENT so does an agreement check;
#: exits 0 once every job and follow-up has settled.
CHILD = r"""
import os, sys, time
from pathlib import Path

import dicom_node.steps as jobs
from dicom_node.config import load_config
from dicom_node.service import Node

real_load = jobs.load_series

def load_series(paths):
    paths = list(paths)
    if any("poison" in str(p) for p in paths):
        os._exit(3)
    return real_load(paths)

def compare(*args, **kwargs):
    os._exit(3)

jobs.load_series = load_series
if os.environ.get("KILL_IN_AGREEMENT"):
    jobs.compare = compare
node = Node(load_config(Path(sys.argv[1])))
node.start()
try:
    deadline = time.monotonic() + 60
    while ({j.state for j in node.journal.jobs()} | {f.state for f in node.journal.follow_ups()}) & {"queued",
                                                                                                    "running"}:
        if time.monotonic() > deadline:
            sys.exit(4)
        time.sleep(0.05)
finally:
    node.stop()
"""


RULE = f"""
[[rules]]
name = "t1-2d"
series_description = "t1"
model = "{MODEL}"
output_name = "sT12DT1"
volumetry = false
"""


def _config(tmp_path: Path, models_dir: Path, max_attempts: int, destination: bool = False, rules: str = RULE,
            segmenter: str = "") -> Path:
    path = tmp_path / "node.toml"
    # a destination nobody listens on: outputs stay pending in the outbox
    pacs = f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {free_port()}\n'
    path.write_text(f"""
[node]
host = "127.0.0.1"
port = {free_port()}
data_dir = "{tmp_path / 'data'}"
fsync = false

[inference]
models_dir = "{models_dir}"
threads = 1
{segmenter}

[jobs]
max_attempts = {max_attempts}

[http]
port = {free_port()}

{rules}
{pacs if destination else ""}""")
    return path


def _queue(journal: Journal, paths: list[Path]) -> int:
    uid = record_series(journal, paths)
    version = journal.close_series(uid)
    assert version is not None
    return journal.add_job(series_uid=uid, version=version, rule="t1-2d", action="synthesize", model=MODEL)


@pytest.mark.parametrize("max_attempts", [1, 2])
def test_a_job_that_kills_the_node_every_time_is_quarantined(tmp_path: Path, max_attempts: int) -> None:
    models_dir = tmp_path / "models"
    make_synthesis_model(models_dir, model_id=MODEL, tile=(16, 16, 16), overlap=4, divisible_by=8)
    config = _config(tmp_path, models_dir, max_attempts, destination=True)
    journal = Journal(tmp_path / "data" / "journal.sqlite3", fsync=False)
    poison = _queue(journal, make_mr_series(tmp_path / "poison", shape=SHAPE, spacing=SPACING))
    good = _queue(journal, make_mr_series(tmp_path / "good", shape=SHAPE, spacing=SPACING, series_number=5))
    journal.close()

    codes = []
    for _ in range(max_attempts + 2):  # a node that never quarantines would crash every time
        child = subprocess.run([sys.executable, "-c", CHILD, str(config)], cwd=REPO, capture_output=True,
                               text=True, timeout=120)
        codes.append(child.returncode)
        if child.returncode != 3:
            break
    # the poison job crashed the node on each of its runs; the next start quarantined it and went on
    assert codes == [3] * max_attempts + [0], child.stderr[-3000:]
    assert f"quarantined: interrupted {max_attempts} times" in child.stderr

    journal = Journal(tmp_path / "data" / "journal.sqlite3", fsync=False)
    try:
        quarantined = journal.job(poison)
        assert quarantined.state == "failed" and quarantined.attempts == max_attempts
        assert quarantined.reason.startswith(f"quarantined: interrupted {max_attempts} times")
        processed = journal.job(good)
        assert processed.state == "written" and processed.attempts == 1, processed.reason  # PACS down
        # the reader gets a "not processed" page for the quarantined series (from its header only)
        (notice,) = journal.output_files(poison, "NOT_PROCESSED")
        assert dcmread(notice.path, stop_before_pixels=True).ImageComments.startswith(
            f"NOT PROCESSED: quarantined: interrupted {max_attempts} times")
        assert [(i.destination, i.sop_instance_uid) for i in journal.outbox(poison)] == [
            ("pacs", notice.sop_instance_uid)]
    finally:
        journal.close()


def test_a_follow_up_that_kills_the_node_is_quarantined_and_costs_its_job_nothing(tmp_path: Path) -> None:
    """The agreement check of a job kills the node: the job's core outputs were recorded and queued before, the
    next start finds the check interrupted and (its attempts used) quarantines it; the job stays written."""
    from tests.test_jobs import _real_and_thick

    models_dir = tmp_path / "models"
    make_synthesis_model(models_dir, model_id=MODEL, tile=(16, 16, 16), overlap=4, divisible_by=8)
    rules = RULE.replace("volumetry = false", "volumetry = true") + f"""
[[rules]]
name = "rt1"
series_description = "mprage"
action = "volumetry"
model = "{MODEL}"
output_name = "rT1"
"""
    config = _config(tmp_path, models_dir, 1, destination=True, rules=rules, segmenter='segmenter = ""')
    journal = Journal(tmp_path / "data" / "journal.sqlite3", fsync=False)
    real, thick = _real_and_thick(tmp_path)
    synth_job = _queue(journal, thick)
    uid = record_series(journal, real)
    version = journal.close_series(uid)
    assert version is not None
    real_job = journal.add_job(series_uid=uid, version=version, rule="rt1", action="volumetry", model=MODEL)
    journal.close()

    env = {**os.environ, "KILL_IN_AGREEMENT": "1"}
    codes = [subprocess.run([sys.executable, "-c", CHILD, str(config)], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env=env) for _ in range(2)]
    assert [c.returncode for c in codes] == [3, 0], codes[-1].stderr[-3000:]
    assert "follow-up agreement of job" in codes[1].stderr and "quarantined" in codes[1].stderr

    journal = Journal(tmp_path / "data" / "journal.sqlite3", fsync=False)
    try:
        (check,) = journal.follow_ups(real_job)
        assert check.state == "failed" and check.reason.startswith("quarantined: interrupted 1 times")
        job = journal.job(real_job)
        assert job.state == "written" and job.reason == "", job.reason  # PACS down: its outputs wait in the outbox
        assert job.optional_failed.startswith("agreement: quarantined")
        assert {f.kind for f in journal.output_files(real_job)} >= {"SEG", "SR", "SUMMARY"}
        assert {i.path for i in journal.outbox(real_job)} == {f.path for f in journal.output_files(real_job)
                                                               if f.kind in ("SEG", "SR", "SUMMARY")}
        assert journal.job(synth_job).state == "written"
    finally:
        journal.close()


GOOD_GEOMETRY = {"ipp": [0.0, 0.0, 0.0], "iop": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], "ps": [1.0, 1.0], "rows": 8, "cols": 8}


def _ruleless_node(tmp_path: Path, **node: float | bool) -> Node:
    """A node (not started) with no rules and no models, its journal in ``tmp_path``."""
    from dicom_node.config import load_config
    from dicom_node.service import Node
    from tests.e2e.node_proc import config_toml

    (tmp_path / "models").mkdir()
    config = tmp_path / "node.toml"
    config.write_text(config_toml({
        "node": {"ae_title": "NODE", "port": free_port(), "data_dir": str(tmp_path / "data"), "fsync": False,
                 **node},
        "inference": {"models_dir": str(tmp_path / "models")},
        "rules": [],
    }))
    return Node(load_config(config))


def _idle_series(journal: Journal, series_uid: str, geometry: dict, *, n: int = 1, now: float = 100.0) -> None:
    """Instance ``n`` of a series, received at ``now`` (by default long ago: idle)."""
    from dicom_node.headers import InstanceHeader, ReceivedInstance, SeriesAttributes

    received = ReceivedInstance(series_uid + f".{n}", "1.2.840.10008.5.1.4.1.1.4", "1.2.3", series_uid, "P",
                                InstanceHeader.from_json(geometry),
                                SeriesAttributes(series_description="t1", modality="MR"))
    journal.add_instance(received, transfer_syntax="1.2.840.10008.1.2.1", path="/nonexistent.dcm",
                         calling_ae="MR1", now=now)


def test_a_series_sent_one_association_per_image_is_looked_at_once(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Each image in an association of its own: the series is looked at ``release_grace_s`` after the last
    release, once (looking at every release read 1 + 2 + ... + n headers), and closed then."""
    import dicom_node.service as service

    node = _ruleless_node(tmp_path, release_grace_s=3.0)  # the 8 releases come well within it
    looks: list[int] = []
    real = service.completeness
    monkeypatch.setattr(service, "completeness", lambda instances: (looks.append(len(instances)), real(instances))[1])
    node.scheduler.start()
    try:
        for n in range(1, 9):
            _idle_series(node.journal, "1.2.7", {**GOOD_GEOMETRY, "ipp": [0.0, 0.0, float(n)]}, n=n, now=time.time())
            node.on_released({"1.2.7"})
        assert node.journal.series("1.2.7").state == "receiving" and looks == []
        deadline = time.monotonic() + 10
        while node.journal.series("1.2.7").state == "receiving" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert node.journal.series("1.2.7").state == "ignored"  # closed; no rule wants it
        assert looks == [8]
    finally:
        node.scheduler.shutdown()
        node.journal.close()


@pytest.mark.parametrize("poison", ["geometry", "any error"])
def test_one_series_cannot_stop_the_idle_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, poison: str) -> None:
    """Found by fuzzing: an ImagePositionPatient of four values made the sweep raise on that series every
    time, so no later series ever closed on its idle timeout. Every idle series closes, whatever one does."""
    import dicom_node.service as service

    node = _ruleless_node(tmp_path)
    poisoned = {**GOOD_GEOMETRY, "ipp": [0.0, 0.0, 0.0, 1.0]}  # four values
    _idle_series(node.journal, "1.2.1", poisoned if poison == "geometry" else GOOD_GEOMETRY)
    _idle_series(node.journal, "1.2.2", GOOD_GEOMETRY)
    if poison == "any error":
        real = service.completeness

        def failing(instances):  # noqa: ANN001, ANN202
            if instances and instances[0].series_uid == "1.2.1":
                raise RuntimeError("boom")
            return real(instances)

        monkeypatch.setattr(service, "completeness", failing)
    try:
        node.sweep()
        node.on_released({"1.2.1"})  # nothing to close any more, and no error either
        states = {uid: node.journal.series(uid).state for uid in ("1.2.1", "1.2.2")}
    finally:
        node.journal.close()
    assert states == {"1.2.1": "ignored", "1.2.2": "ignored"}, states


def test_reprocess_routes_stored_series_again_as_a_new_version(tmp_path: Path) -> None:
    """A series ignored under the old rules, and one processed under them, are routed again with the current rules
    by Node.reprocess (the dashboard's way) and by the sweep (the CLI's way, the node running); their outputs are
    version 2. The node's own output series is never among them."""
    from dicom_node.config import load_config
    from dicom_node.journal import SeriesState
    from dicom_node.service import Node

    models_dir = tmp_path / "models"
    make_synthesis_model(models_dir, model_id=MODEL, tile=(16, 16, 16), overlap=4, divisible_by=8)
    node = Node(load_config(_config(tmp_path, models_dir, max_attempts=1)))
    ignored = record_series(node.journal, make_mr_series(tmp_path / "a", shape=SHAPE, spacing=SPACING,
                                                         series_description="t1_a", series_number=3))
    processed = record_series(node.journal, make_mr_series(tmp_path / "b", shape=SHAPE, spacing=SPACING,
                                                           series_description="t1_b", series_number=4))
    for uid in (ignored, processed):
        node.journal.close_series(uid)
    node.journal.set_series_state(ignored, SeriesState.IGNORED, "not processed: no rule matches")
    done = node.journal.add_job(series_uid=processed, version=1, rule="t1-2d", action="synthesize", model=MODEL)
    node.journal.record_outputs(done, [("1.2.826.0.1.3680043.10.999.7", "sT1")], [], output_name="sT12DT1")

    def settled() -> list:
        deadline = time.monotonic() + 60
        while {j.state for j in node.journal.jobs()} & {"queued", "running"} and time.monotonic() < deadline:
            time.sleep(0.05)
        return node.journal.jobs()

    node.start()
    try:
        assert node.reprocess(series_uid=ignored) == [ignored]
        jobs = settled()
        assert [(j.series_uid, j.version, j.state) for j in jobs if j.series_uid == ignored] == [(ignored, 2, "sent")]
        # as the CLI does it: marked in the journal; the running node's sweep routes it
        assert node.journal.request_reprocess(series_uid=processed) == [processed]
        deadline = time.monotonic() + 30
        while node.journal.series(processed).state == "complete" and time.monotonic() < deadline:
            time.sleep(0.05)
        jobs = settled()
        again = [j for j in jobs if j.series_uid == processed and j.id != done]
        assert [(j.version, j.state) for j in again] == [(2, "sent")]
        header = dcmread(node.journal.output_files(again[0].id, "sT1")[0].path, stop_before_pixels=True)
        assert header.SeriesDescription == "sT12DT1 v2" and header.SeriesNumber == 402
        assert node.reprocess(series_uid="1.2.826.0.1.3680043.10.999.7") == []  # an output: never
    finally:
        node.stop()


def test_an_unreadable_receipt_log_fails_its_check_and_the_rest_still_answers(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    node = _ruleless_node(tmp_path, fsync=True)  # the receipt log as shipped
    try:
        assert node.receipts is not None
        health = node.health()
        assert health.checks["receipt_log"].ok, health.checks["receipt_log"]
        assert b"dicom_node_receipt_segments" in node.metrics_exposition()

        def unreadable() -> None:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(node.receipts, "status", unreadable)
        check = node.health().checks["receipt_log"]
        assert not check.ok and "Permission denied" in check.detail
        text = node.metrics_exposition()
        assert b"dicom_node_receipt_segments" not in text and b"dicom_node_series" in text
    finally:
        node.receipts.shutdown()
        node.journal.close()


def test_a_task_lost_to_a_journal_error_is_handed_again_by_the_sweep(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process executor took a job off its queue, then a transient journal error (SQLite busy for longer than
    its timeout, a PostgreSQL reconnect) hit its claim: "crashed its worker", and the job stayed queued for good
    (only a start-up or an expired claim queued it again). The sweep hands the executor again what the journal has
    queued and no worker thread holds, so the job runs (its rule is gone here: it fails at once, with that reason)."""
    import sqlite3
    import threading

    from dicom_node.jobs import Task, ThreadExecutor

    node = _ruleless_node(tmp_path, sweep_interval_s=0.2)
    runs: list[str] = []
    ended = threading.Semaphore(0)

    def perform(task: Task) -> object:
        try:
            runs.append(node.runner.perform(task))
        finally:
            ended.release()  # (also when it raised: "crashed its worker")
        return runs[-1]

    executor = ThreadExecutor(perform)
    node.executor, node.runner.submit = executor, executor.submit
    _idle_series(node.journal, "1.2.9", GOOD_GEOMETRY, now=time.time())  # still receiving: the sweep leaves it
    job = node.journal.add_job(series_uid="1.2.9", version=1, rule="gone", action="synthesize", model="m")
    real_claim, busy = node.journal.claim, [1]

    def claim(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if busy and busy.pop():
            raise sqlite3.OperationalError("database is locked")
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(node.journal, "claim", claim)
    try:
        executor.submit(Task("job", job))
        assert ended.acquire(timeout=10) and runs == []  # it raised: lost to the journal error
        assert node.journal.job(job).state == "queued"
        time.sleep(0.3)  # queued for longer than a sweep interval
        node.sweep()
        node.sweep()  # (held by the executor or done: not handed a second time)
        assert ended.acquire(timeout=10) and runs == ["failed"]
        assert not ended.acquire(timeout=0.3)
        record = node.journal.job(job)
    finally:
        executor.shutdown()
        node.journal.close()
    assert (record.state, record.attempts, record.reason) == ("failed", 1, "rule 'gone' is no longer configured")
