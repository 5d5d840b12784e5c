"""The Celery executor (``[executor] kind = "celery"``): routing by what workers declare, the configuration, and a
real Redis (``tests/redis_server.py``) with a worker running the fixture ONNX model in this process: a job
published is run once, duplicate messages run nothing more, and a job queued while the broker is down still runs
(the journal poll)."""

from __future__ import annotations

import logging
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from dicom_node.celery_app import (
    TASK_NAME,
    Announcements,
    BrokerConfigError,
    CeleryExecutor,
    broker_url,
    make_app,
    redacted,
    task_needs,
)
from dicom_node.celery_routing import (
    Capabilities,
    Needs,
    detect_device,
    model_sets,
    queue_for,
    queue_name,
    worker_queues,
)
from dicom_node.config import ConfigError, ExecutorSettings, NodeConfig, Rule, parse_config
from dicom_node.jobs import Task
from dicom_node.journal import Journal
from dicom_node.worker import Worker
from tests.dicom_factory import make_mr_series
from tests.redis_server import RedisServer, free_port, redis_server
from tests.test_jobs import MODEL, SHAPE, SPACING, make_config, record_series, rule

T = TypeVar("T")
P = "dicom_node"


# -- routing ---------------------------------------------------------------------------------------

def caps(worker: str, device: str, models: set[str], wanted: set[frozenset[str]], prefix: str = P) -> Capabilities:
    queues = worker_queues(prefix, device, models, wanted)  # type: ignore[arg-type]
    return Capabilities(worker, device, frozenset(models), frozenset(queues))  # type: ignore[arg-type]


SYNTH = frozenset({"synth"})
SYNTH_SEG = frozenset({"synth", "seg"})
WANTED = {frozenset(), SYNTH, SYNTH_SEG}


def test_a_worker_consumes_any_its_device_and_each_model_set_it_holds_whole() -> None:
    assert worker_queues(P, "cuda", {"synth", "seg", "other"}, WANTED) == [
        "dicom_node.any", "dicom_node.cuda", "dicom_node.cuda.seg+synth", "dicom_node.cuda.synth"]
    # holding only the synthesis model: not the queue of the jobs that also segment
    assert worker_queues(P, "cpu", {"synth"}, WANTED) == ["dicom_node.any", "dicom_node.cpu", "dicom_node.cpu.synth"]


def test_inference_goes_to_a_gpu_worker_when_one_is_up_else_to_the_cpu_workers() -> None:
    gpu, cpu = caps("g", "cuda", {"synth", "seg"}, WANTED), caps("c", "cpu", {"synth", "seg"}, WANTED)
    job = Needs(SYNTH_SEG, inference=True)
    assert queue_for(job, [cpu, gpu], P) == "dicom_node.cuda.seg+synth"
    assert queue_for(job, [cpu], P) == "dicom_node.cpu.seg+synth"
    # a follow-up runs no network: a CPU worker's, and a GPU worker's only when no CPU worker is up
    follow_up = Needs(SYNTH, inference=False)
    assert queue_for(follow_up, [gpu, cpu], P) == "dicom_node.cpu.synth"
    assert queue_for(follow_up, [gpu], P) == "dicom_node.cuda.synth"
    assert queue_for(Needs(), [gpu], P) == "dicom_node.cuda"


def test_a_gpu_worker_without_the_models_does_not_get_the_job_and_nobody_means_any() -> None:
    gpu_seg_only = caps("g", "cuda", {"seg"}, WANTED)
    cpu = caps("c", "cpu", {"synth", "seg"}, WANTED)
    job = Needs(SYNTH_SEG, inference=True)
    assert queue_for(job, [gpu_seg_only, cpu], P) == "dicom_node.cpu.seg+synth"
    assert queue_for(job, [gpu_seg_only], P) == "dicom_node.any"
    assert queue_for(job, [], P) == "dicom_node.any"
    assert queue_name(P, "cpu", ["b", "a", "a"]) == "dicom_node.cpu.a+b"


def test_the_device_is_cuda_only_when_onnxruntime_offers_it_and_the_config_allows() -> None:
    with_cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert detect_device("auto", with_cuda) == "cuda"
    assert detect_device("cuda", with_cuda) == "cuda"
    assert detect_device("cpu", with_cuda) == "cpu"
    assert detect_device("auto", ["CPUExecutionProvider"]) == "cpu"


def test_model_sets_are_each_rules_models_and_each_rules_own_model() -> None:
    config = NodeConfig(rules=[Rule(name="a", series_description="t1", model="synth", output_name="sT1",
                                    volumetry=True),
                               Rule(name="b", series_description="mprage", action="volumetry", output_name="rT1")])
    seg = config.inference.segmenter
    assert seg is not None
    assert model_sets(config) == {frozenset(), frozenset({"synth", seg}), frozenset({"synth"}), frozenset({seg})}


# -- configuration -----------------------------------------------------------------------------------

def test_executor_defaults_to_threads_and_celery_is_chosen_in_the_config() -> None:
    assert NodeConfig().executor.kind == "thread"
    config = parse_config('[executor]\nkind = "celery"\nbroker_url = "redis://10.0.0.5:6380/2"\n'
                          'queue_prefix = "site-a"\npoll_interval_s = 20\n')
    assert (config.executor.kind, config.executor.broker_url, config.executor.queue_prefix) == (
        "celery", "redis://10.0.0.5:6380/2", "site-a")
    for bad in ('kind = "dask"', 'broker_url = "amqp://h/"', 'broker_url = "redis://u:secret@h:6379/0"',
                'queue_prefix = "a.b"', "poll_interval_s = 0", "worker_metrics_port = 70000"):
        with pytest.raises(ConfigError, match="executor"):
            parse_config(f"[executor]\n{bad}\n")


def test_the_broker_password_comes_from_its_file_and_never_reaches_the_log(tmp_path: Path) -> None:
    secret = tmp_path / "redis.pw"
    secret.write_text("s3cret/with:odd@chars\n")
    settings = ExecutorSettings(broker_url="redis://h:6379/0", broker_password_file=secret)
    url = broker_url(settings)
    assert url == "redis://:s3cret%2Fwith%3Aodd%40chars@h:6379/0"
    assert redacted(url) == "redis://h:6379/0"
    with pytest.raises(BrokerConfigError, match="cannot read"):
        broker_url(ExecutorSettings(broker_password_file=tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(BrokerConfigError, match="empty"):
        broker_url(ExecutorSettings(broker_password_file=tmp_path / "empty"))


# -- with a real Redis ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


def _wait(check: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout} s")
        time.sleep(0.05)


class Site:
    """A data directory, its journal (the receiver's side) and a config for Celery on ``broker``."""

    def __init__(self, tmp_path: Path, models_dir: Path, broker: str, prefix: str, **executor: Any) -> None:
        base = make_config(tmp_path / "data", models_dir, [rule()])
        settings = {"kind": "celery", "broker_url": broker, "queue_prefix": prefix, "poll_interval_s": 1.0,
                    **executor}
        self.config = base.model_copy(update={"executor": ExecutorSettings(**settings)})
        self.tmp_path = tmp_path
        self.journal = Journal(tmp_path / "data" / "journal.sqlite3", fsync=False)

    def queue_job(self, name: str = "series") -> int:
        files = make_mr_series(self.tmp_path / name, shape=SHAPE, spacing=SPACING)
        uid = record_series(self.journal, files)
        version = self.journal.close_series(uid)
        assert version is not None
        return self.journal.add_job(series_uid=uid, version=version, rule="t1-2d", action="synthesize", model=MODEL)

    def written(self, job_id: int) -> Any:
        job = self.journal.job(job_id)
        return job if job.state == "written" else None


@pytest.fixture
def site(tmp_path: Path, models_dir: Path, redis: RedisServer, request: pytest.FixtureRequest) -> Iterator[Site]:
    # a queue prefix of each test's own: no message of one test reaches another's worker
    s = Site(tmp_path, models_dir, redis.url, prefix=f"t{abs(hash(request.node.name)) % 10**8}")
    yield s
    s.journal.close()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.onnx_fixtures import make_synthesis_model

    folder = tmp_path_factory.mktemp("models")
    make_synthesis_model(folder, model_id=MODEL, tile=(16, 16, 16), overlap=4, divisible_by=8)
    return folder


def _worker(config: NodeConfig, **kwargs: Any) -> Worker:
    worker = Worker(config, **kwargs)
    worker.start()
    assert worker.consumer is not None and worker.consumer.ready.wait(20), "the celery worker did not start"
    return worker


def _metric(worker: Worker, name: str, **labels: str) -> float:
    return worker.metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_published_job_runs_once_on_the_worker_and_duplicates_run_nothing(site: Site) -> None:
    worker = _worker(site.config)
    receiver = CeleryExecutor(site.config, site.journal)
    try:
        announced = _wait(lambda: Announcements(site.config.executor).live(), "the worker's announcement")
        assert [(c.worker, c.device, c.models) for c in announced] == [(worker.id, "cpu", frozenset({MODEL}))]
        prefix = site.config.executor.queue_prefix
        job_id = site.queue_job()
        assert receiver.publish(Task("job", job_id)) == f"{prefix}.cpu.{MODEL}"  # the fixture model's queue
        job = _wait(lambda: site.written(job_id), "the job written")
        assert job.attempts == 1
        assert site.journal.claim("job", job_id, "x", 1) is None  # not queued any more
        outbox = site.journal.outbox(job_id)
        # the same message twice more (a redelivery, a duplicate publish): claimed already, nothing runs
        app = make_app(site.config.executor)
        for _ in range(2):
            app.send_task(TASK_NAME, args=["job", job_id], queue=f"{prefix}.cpu.{MODEL}")
        _wait(lambda: _metric(worker, "dicom_node_worker_tasks_total", kind="job", outcome="skipped") == 2,
              "the duplicates taken")
        assert _metric(worker, "dicom_node_worker_tasks_total", kind="job", outcome="done") == 1
        assert site.journal.job(job_id).attempts == 1 and site.journal.outbox(job_id) == outbox
        assert _metric(worker, "dicom_node_job_step_duration_seconds_count", step="total") == 1
    finally:
        receiver.shutdown()
        assert worker.stop()


def test_two_messages_for_one_queued_job_at_once_run_it_once(site: Site) -> None:
    config = site.config.model_copy(update={"inference": site.config.inference.model_copy(update={"workers": 2})})
    worker = _worker(config)
    try:
        job_id = site.queue_job()
        app = make_app(config.executor)
        for _ in range(2):  # both threads of the pool take one
            app.send_task(TASK_NAME, args=["job", job_id], queue=f"{config.executor.queue_prefix}.any")
        _wait(lambda: site.written(job_id), "the job written")
        _wait(lambda: _metric(worker, "dicom_node_worker_tasks_total", kind="job", outcome="skipped") == 1,
              "the second message taken")
        assert _metric(worker, "dicom_node_worker_tasks_total", kind="job", outcome="done") == 1
        assert site.journal.job(job_id).attempts == 1
    finally:
        assert worker.stop()


def test_broker_down_at_submit_is_one_log_line_and_the_job_still_runs_by_the_poll(
        site: Site, caplog: pytest.LogCaptureFixture) -> None:
    worker = _worker(site.config)
    down = site.config.model_copy(update={"executor": site.config.executor.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})})
    receiver = CeleryExecutor(down, site.journal)
    try:
        first, second = site.queue_job("a"), site.queue_job("b")
        with caplog.at_level(logging.INFO, logger="dicom_node.celery_app"):
            receiver.submit(Task("job", first))
            receiver.submit(Task("job", second))
            receiver.shutdown(timeout_s=60)  # publishes what was submitted (or gives up on it) first
        unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(unreachable) == 1 and "stay queued in the journal" in unreachable[0].getMessage(), caplog.text
        assert receiver.published == []
        for job_id in (first, second):  # the worker's journal poll (every second here) takes them
            job = _wait(lambda j=job_id: site.written(j), f"job {job_id} written by the poll", timeout=60)
            assert job.attempts == 1
        assert _metric(worker, "dicom_node_worker_tasks_total", kind="job", outcome="done") == 2
    finally:
        receiver.shutdown()
        assert worker.stop()


def test_a_worker_exports_its_metrics_on_its_own_port(site: Site) -> None:
    port = free_port()
    worker = _worker(site.config, metrics_port=port)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert f'dicom_node_process_info{{device="cpu",executor="celery",role="worker",worker="{worker.id}"}} 1.0' \
            in body
        assert f'dicom_node_worker_models{{model="{MODEL}"}} 1.0' in body
        assert 'dicom_node_health_check{check="celery_worker_alive"} 1.0' in body
        assert 'dicom_node_worker_tasks_total{kind="job",outcome="done"} 0.0' in body
    finally:
        assert worker.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_a_job_needs_its_rules_models_and_runs_a_network(site: Site) -> None:
    job_id = site.queue_job()
    assert task_needs(site.config, site.journal, Task("job", job_id)) == Needs(frozenset({MODEL}), inference=True)
    gone = site.config.model_copy(update={"rules": []})  # its rule removed since: the model it recorded
    assert task_needs(gone, site.journal, Task("job", job_id)) == Needs(frozenset({MODEL}), inference=True)


def test_a_celery_worker_stopped_during_a_run_abandons_it_to_its_lease(site: Site, held_synthesis: Any) -> None:
    started, release = held_synthesis
    worker = _worker(site.config)
    try:
        job_id = site.queue_job()
        CeleryExecutor(site.config, site.journal).publish(Task("job", job_id))
        assert started.wait(30)
        t0 = time.monotonic()
        assert worker.stop(timeout_s=1.0) is False  # not cut off, not waited for: abandoned
        assert time.monotonic() - t0 < 5
        assert not Announcements(site.config.executor).live()  # withdrawn: nothing more is routed to it
    finally:
        release.set()
    # the journal stayed open under the run, which still records (its lease has not expired yet)
    assert _wait(lambda: site.written(job_id), "the abandoned run recorded").attempts == 1
    worker.journal.close()


def test_the_receiver_routes_by_the_live_announcements(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    settings = site.config.executor
    prefix = settings.queue_prefix
    announcements = Announcements(settings)
    wanted = model_sets(site.config)
    announcements.announce(caps("cpu-1", "cpu", {MODEL}, wanted, prefix))
    announcements.client().set(f"{prefix}.worker.garbage", b"not json", ex=10)
    job_id = site.queue_job()
    receiver = CeleryExecutor(site.config, site.journal)
    try:
        assert receiver.publish(Task("job", job_id)) == f"{prefix}.cpu.{MODEL}"
        assert "ignoring a malformed worker announcement" in caplog.text
        announcements.announce(caps("gpu-1", "cuda", {MODEL}, wanted, prefix))  # a GPU worker comes up
        receiver._workers_read = float("-inf")  # read the announcements again now, not in 5 s
        assert receiver.publish(Task("job", job_id)) == f"{prefix}.cuda.{MODEL}"
        announcements.withdraw("gpu-1")
        announcements.withdraw("cpu-1")
        receiver._workers_read = float("-inf")
        assert receiver.publish(Task("job", job_id)) == f"{prefix}.any"  # nobody up: whoever comes first
    finally:
        receiver.shutdown()
        announcements.close()
