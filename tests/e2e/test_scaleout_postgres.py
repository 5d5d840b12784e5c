"""Issue 16's site on 127.0.0.1: two receivers, two workers and a dispatcher (``serve --role
receiver|worker|dispatcher``) sharing a PostgreSQL journal (Debian's PostgreSQL 15) and a data directory (the shared
storage), jobs published through Celery on Debian's Redis, results to Orthanc. A study sent half to each receiver is
assembled once and processed once, and its results reach Orthanc once; a worker SIGKILLed during the job leaves it
to the other, nothing lost, nothing sent twice (the audit trail's delivery records add up to one send per object)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from dicom_node.journal import Journal
from tests.dicom_factory import make_mr_series
from tests.postgres import PASSWORD
from tests.redis_server import RedisServer, redis_server
from tests.test_jobs import SHAPE, SPACING

from .node_proc import NodeProcess, synthesis_rule
from .peers import failed_stores, storescu

LEASE_S = 2.0


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@contextmanager
def _site(tmp_path: Path, models_dir: Path, orthanc: Any, dsn: str, redis: RedisServer,
          synth_delay_s: float) -> Iterator[tuple[list[NodeProcess], list[NodeProcess]]]:
    secret = tmp_path / "journal.password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    data_dir = tmp_path / "shared"  # what every machine would mount (NFS, CephFS)
    common: dict[str, Any] = {
        "models_dir": models_dir, "data_dir": data_dir, "rules": [synthesis_rule("t1", "t1", "pacs")],
        "destinations": [{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}],
        "extra": {"journal": {"backend": "postgresql", "dsn": dsn, "password_file": str(secret)},
                  "executor": {"kind": "celery", "broker_url": redis.url, "queue_prefix": f"pg{id(tmp_path) % 10**6}",
                               "poll_interval_s": 60.0},
                  "jobs": {"lease_s": LEASE_S, "poll_interval_s": 0.2}},
    }
    receivers = [NodeProcess(tmp_path / f"receiver-{i}", role="receiver", **common) for i in (1, 2)]
    workers = [NodeProcess(tmp_path / f"worker-{i}", role="worker", module="tests.e2e.slow_serve",
                           env={"DICOM_NODE_TEST_SYNTH_DELAY_S": str(synth_delay_s)}, **common) for i in (1, 2)]
    # a dispatcher too: it and both receivers claim the outbox's items (each is sent by one of them)
    dispatcher = NodeProcess(tmp_path / "dispatcher", role="dispatcher", **common)
    started: list[NodeProcess] = []
    try:
        for process in (*receivers, *workers, dispatcher):
            started.append(process.start())
        yield receivers, workers
    finally:
        for process in started:
            process.stop()


def _send_half_to_each(receivers: list[NodeProcess], tmp_path: Path) -> list[Path]:
    """The study's one series, half to each receiver at once. Neither half is evenly spaced by itself (slices 0, 2,
    5 and 1, 3, 4 of 6): a contiguous half would be whole on its own, closed and processed when its association
    ends, and the other half would then make a second version (the node's rule for series without
    ImagesInAcquisition, one receiver or several)."""
    files = make_mr_series(tmp_path / "series", shape=SHAPE, spacing=SPACING, series_description="t1")
    assert len(files) == 6
    halves = [[files[i] for i in (0, 2, 5)], [files[i] for i in (1, 3, 4)]]
    results: list[Any] = []

    def send(receiver: NodeProcess, part: list[Path]) -> None:
        results.append(storescu(receiver.port, part, called_ae=receiver.ae_title, calling_ae="SCANNER"))

    threads = [threading.Thread(target=send, args=(r, h)) for r, h in zip(receivers, halves, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for result in results:
        assert result.returncode == 0 and not failed_stores(result), result.stderr
    return files


def _sent(journal: Journal) -> Any:
    jobs = journal.jobs()
    return jobs if jobs and all(j.state == "sent" for j in jobs) else None


def _delivered_once(receiver: NodeProcess, orthanc: Any, n_inputs: int) -> Any:
    """One series of n_inputs instances, closed once, one job; every output in Orthanc, each sent exactly once."""
    journal = receiver.journal()
    try:
        (series,) = [s for s in journal.all_series() if s.n_instances]
        assert series.n_instances == n_inputs and series.version == 1 and series.state == "routed"
        (job,) = journal.jobs()
        items = journal.outbox(job.id)
        assert items and {i.state for i in items} == {"sent"}
    finally:
        journal.close()
    assert int(orthanc.get("/statistics")["CountInstances"]) == len(items)
    audit = receiver.data_dir / "audit.jsonl"
    deliveries = [json.loads(line) for line in audit.read_text().splitlines() if '"event":"delivery"' in line]
    assert sum(d["sent"] for d in deliveries) == len(items), deliveries  # nothing sent twice
    return job


def test_a_study_sent_half_to_each_receiver_is_processed_once(tmp_path: Path, models_dir: Path, orthanc: Any,
                                                              postgres_dsn: str, redis: RedisServer) -> None:
    with _site(tmp_path, models_dir, orthanc, postgres_dsn, redis, 0.0) as (receivers, _workers):
        files = _send_half_to_each(receivers, tmp_path)
        receivers[0].wait_for(_sent, timeout=120, what="the job sent")
        job = _delivered_once(receivers[0], orthanc, len(files))
        assert job.attempts == 1
        published = [r.log().count(f"job {job.id} published to queue") for r in receivers]
        assert sorted(published) == [0, 1]  # routed (and published) by one receiver only


def test_a_worker_killed_during_the_job_leaves_it_to_the_other(tmp_path: Path, models_dir: Path, orthanc: Any,
                                                               postgres_dsn: str, redis: RedisServer) -> None:
    with _site(tmp_path, models_dir, orthanc, postgres_dsn, redis, 6.0) as (receivers, workers):
        files = _send_half_to_each(receivers, tmp_path)

        def running(journal: Journal) -> Any:
            return [j for j in journal.jobs() if j.state == "running"]

        (job,) = receivers[0].wait_for(running, timeout=60, what="a worker running the job")
        holder_id = _claimed_by(postgres_dsn, job.id)
        (holder,) = [w for w in workers if holder_id.endswith(f":{w.pid}")]
        (other,) = [w for w in workers if w is not holder]
        holder.kill()  # SIGKILL in the middle of the (slowed) synthesis
        (done,) = receivers[0].wait_for(_sent, timeout=120, what="the job taken over and sent")
        assert done.id == job.id and done.attempts == 2
        assert _claimed_by(postgres_dsn, job.id).endswith(f":{other.pid}")
        _delivered_once(receivers[0], orthanc, len(files))


def _claimed_by(dsn: str, job_id: int) -> str:
    """The worker id a job's (last) claim was made under, read from the database as an operator would."""
    import psycopg

    with psycopg.connect(dsn, password=PASSWORD) as db:
        row = db.execute("SELECT worker FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return str(row[0])
