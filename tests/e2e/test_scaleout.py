"""Beyond one process: one receiver and two worker processes (``serve --role receiver|worker``) sharing a data_dir
on 127.0.0.1, a series sent with dcmtk's storescu, its outputs delivered to dcmtk's storescp. A job is claimed by
exactly one worker; a worker SIGKILLed during a job leaves it to the other once its lease expired; nothing is lost
or sent twice. Each twice: with the workers polling the journal (``[executor] kind = "thread"``), and with Celery on
a real Redis (``kind = "celery"``: the receiver publishes, the workers consume; their journal poll is set far
apart, so that the messages, not the poll, carry the work)."""

from __future__ import annotations

import re
import socket
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_node.journal import Journal
from tests.dicom_factory import make_mr_series
from tests.onnx_fixtures import make_synthesis_model
from tests.redis_server import RedisServer, redis_server
from tests.test_jobs import MODEL, SHAPE, SPACING

from .node_proc import REPO, NodeProcess
from .peers import failed_stores, free_port, storescu

RULE = {"name": "t1-2d", "series_description": "t1", "model": MODEL, "output_name": "sT12DT1", "volumetry": False}
LEASE_S = 2.0


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    make_synthesis_model(folder, model_id=MODEL, tile=(16, 16, 16), overlap=4, divisible_by=8)
    return folder


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["thread", "celery"])
def executor(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The ``[executor]`` table of the site: the journal poll, or Celery on a Redis of the module's own."""
    if request.param == "thread":
        return {"kind": "thread"}
    server: RedisServer = request.getfixturevalue("redis")
    prefix = f"scaleout{abs(hash(request.node.name)) % 10**6}"
    return {"kind": "celery", "broker_url": server.url, "queue_prefix": prefix, "poll_interval_s": 60.0}


@contextmanager
def _site(tmp_path: Path, models_dir: Path, store_scp: Any, synth_delay_s: float,
          executor: dict[str, Any]) -> Iterator[list[NodeProcess]]:
    """A receiver and two workers on one data_dir (the workers' synthesis slowed by ``synth_delay_s``)."""
    common: dict[str, Any] = {
        "models_dir": models_dir, "rules": [RULE],
        "destinations": [{"name": "scp", "ae_title": store_scp.aet, "host": "127.0.0.1", "port": store_scp.port}],
        "extra": {"jobs": {"lease_s": LEASE_S, "poll_interval_s": 0.2}, "executor": executor},
    }
    receiver = NodeProcess(tmp_path / "receiver", role="receiver", **common)
    # each worker with its own /metrics port
    workers = [NodeProcess(tmp_path / f"worker-{i}", role="worker", data_dir=receiver.data_dir,
                           module="tests.e2e.slow_serve", env={"DICOM_NODE_TEST_SYNTH_DELAY_S": str(synth_delay_s)},
                           **{**common, "extra": {**common["extra"], "executor": {
                               **executor, "worker_metrics_port": free_port()}}}) for i in (1, 2)]
    started: list[NodeProcess] = []
    try:
        for process in (receiver, *workers):
            started.append(process.start())
        yield started
    finally:
        for process in started:
            process.stop()


def _send_series(receiver: NodeProcess, tmp_path: Path) -> list[Path]:
    files = make_mr_series(tmp_path / "series", shape=SHAPE, spacing=SPACING)
    result = storescu(receiver.port, files, called_ae=receiver.ae_title, calling_ae="SCANNER")
    assert result.returncode == 0 and not failed_stores(result), result.stderr
    return files


def _claims(data_dir: Path) -> list[tuple[int, str, str, int]]:
    """(id, state, worker, attempts) of every job, read as another process would."""
    db = sqlite3.connect(data_dir / "journal.sqlite3")
    try:
        return db.execute("SELECT id, state, worker, attempts FROM jobs ORDER BY id").fetchall()
    finally:
        db.close()


def _sent_job(journal: Journal) -> Any:
    jobs = journal.jobs()
    return jobs if jobs and all(j.state == "sent" for j in jobs) else None


def _delivered_once(journal: Journal, store_scp: Any) -> None:
    """One set of outputs: every outbox item sent once, and storescp got each object exactly once."""
    (job,) = journal.jobs()
    items = journal.outbox(job.id)
    assert items and {i.state for i in items} == {"sent"}, items
    received = sorted(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                      for p in store_scp.directory.rglob("*.dcm"))
    assert received == sorted(i.sop_instance_uid for i in items)


def _metrics_port(worker: NodeProcess) -> int:
    match = re.search(r"^worker_metrics_port = (\d+)$", worker.config_path.read_text(), flags=re.MULTILINE)
    assert match is not None
    return int(match.group(1))


def _scrape(worker: NodeProcess) -> str:
    url = f"http://127.0.0.1:{_metrics_port(worker)}/metrics"
    return urllib.request.urlopen(url, timeout=10).read().decode()


def _published(receiver: NodeProcess, executor: dict[str, Any]) -> None:
    """With Celery, the receiver published the job (to the queue of the workers holding its model)."""
    if executor["kind"] == "celery":
        assert f"job 1 published to queue {executor['queue_prefix']}.cpu.{MODEL}" in receiver.log()


def test_a_series_is_processed_once_by_one_of_two_workers(tmp_path: Path, models_dir: Path, store_scp: Any,
                                                          executor: dict[str, Any]) -> None:
    with _site(tmp_path, models_dir, store_scp, 0.0, executor) as (receiver, first, second):
        _send_series(receiver, tmp_path)
        (job,) = receiver.wait_for(_sent_job, timeout=90, what="the job sent")
        assert job.attempts == 1 and job.rule == "t1-2d"
        ((_, _, worker, _),) = _claims(receiver.data_dir)
        assert worker in {f"worker@{socket.gethostname()}:{p.pid}" for p in (first, second)}
        _published(receiver, executor)
        journal = receiver.journal()
        try:
            _delivered_once(journal, store_scp)
            assert len(journal.instances(job.series_uid)) == SHAPE[0]
        finally:
            journal.close()
        # every worker exports its own metrics: the one that ran the job counts it
        done = {p.pid: _scrape(p) for p in (first, second)}
        assert sorted(v.count('dicom_node_worker_tasks_total{kind="job",outcome="done"} 1.0') for v in done.values()) \
            == [0, 1]
        for process, body in done.items():
            assert f'role="worker",worker="worker@{socket.gethostname()}:{process}"}} 1.0' in body
        status = subprocess.run([sys.executable, "-m", "dicom_node.cli", "status", "--config",
                                 str(receiver.config_path)], capture_output=True, text=True, timeout=60, cwd=REPO)
        for process in (first, second):
            port = _metrics_port(process)
            assert f"process {process.pid}: worker as worker@{socket.gethostname()}:{process.pid}, /metrics on port " \
                   f"{port}" in status.stdout, status.stdout


def test_a_worker_killed_during_a_job_leaves_it_to_the_other(tmp_path: Path, models_dir: Path,
                                                            store_scp: Any, executor: dict[str, Any]) -> None:
    with _site(tmp_path, models_dir, store_scp, 6.0, executor) as (receiver, first, second):
        _send_series(receiver, tmp_path)
        ((job_id, _, worker, _),) = receiver.wait_for(
            lambda _j: [c for c in _claims(receiver.data_dir) if c[1] == "running"], timeout=60, what="a claim")
        holder, other = (first, second) if worker.endswith(f":{first.pid}") else (second, first)
        assert worker.endswith(f":{holder.pid}")
        holder.kill()  # SIGKILL in the middle of the (slowed) synthesis
        (job,) = receiver.wait_for(_sent_job, timeout=90, what="the job taken over and sent")
        assert job.id == job_id and job.attempts == 2
        ((_, _, taken_by, _),) = _claims(receiver.data_dir)
        assert taken_by.endswith(f":{other.pid}")
        assert "interrupted during run 1" in other.log() or "interrupted during run 1" in receiver.log()
        _published(receiver, executor)
        if executor["kind"] == "celery":  # taken over by a message: the receiver's sweep published it again
            assert receiver.log().count(f"job {job_id} published to queue") == 2
        journal = receiver.journal()
        try:
            _delivered_once(journal, store_scp)
        finally:
            journal.close()
