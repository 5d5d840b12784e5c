"""The worker role in this process (``dicom_node.worker.Worker``, ``[executor] kind = "thread"``): it runs what is
queued in the journal, exports its metrics, feeds the systemd watchdog while healthy, and a stop never closes the
journal under a run still going after its wait (the run is abandoned to its lease instead)."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node.celery_app import Needs, task_needs
from dicom_node.config import JobSettings, NodeConfig
from dicom_node.jobs import Task
from dicom_node.journal import Journal, OutputFile
from dicom_node.steps import LABEL_VOLUME, T1_VOLUME, follow_up_models
from dicom_node.worker import Worker
from tests.dicom_factory import make_mr_series, make_study
from tests.redis_server import free_port
from tests.test_jobs import MODEL, SHAPE, SPACING, make_config, record_series, rule


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.onnx_fixtures import make_synthesis_model

    folder = tmp_path_factory.mktemp("models")
    make_synthesis_model(folder, model_id=MODEL, tile=(16, 16, 16), overlap=4, divisible_by=8)
    return folder


@pytest.fixture
def config(tmp_path: Path, models_dir: Path) -> NodeConfig:
    base = make_config(tmp_path / "data", models_dir, [rule()])
    return base.model_copy(update={"jobs": JobSettings(poll_interval_s=0.1, lease_s=30.0)})


@pytest.fixture
def journal(config: NodeConfig) -> Iterator[Journal]:
    journal = Journal(config.node.data_dir / "journal.sqlite3", fsync=False)
    yield journal
    journal.close()


def queue_job(journal: Journal, tmp_path: Path) -> int:
    uid = record_series(journal, make_mr_series(tmp_path / "series", shape=SHAPE, spacing=SPACING))
    version = journal.close_series(uid)
    assert version is not None
    return journal.add_job(series_uid=uid, version=version, rule="t1-2d", action="synthesize", model=MODEL)


def _wait(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)
    return result


def test_a_worker_runs_a_queued_job_and_counts_it_in_its_metrics(config: NodeConfig, journal: Journal,
                                                                 tmp_path: Path) -> None:
    port = free_port()
    worker = Worker(config, metrics_port=port)
    worker.start()
    try:
        job_id = queue_job(journal, tmp_path)
        _wait(lambda: journal.job(job_id).state == "written", "the job written")
        def scrape() -> str | None:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            return body if 'dicom_node_worker_tasks_total{kind="job",outcome="done"} 1.0' in body else None

        body = _wait(scrape, "the job counted")
        assert f'dicom_node_process_info{{device="cpu",executor="thread",role="worker",worker="{worker.id}"}} 1.0' \
            in body
        assert 'dicom_node_job_step_duration_seconds_count{step="total"} 1.0' in body
        assert 'dicom_node_health_check{check="journal_writable"} 1.0' in body
    finally:
        assert worker.stop()


def test_a_stop_abandons_a_run_past_its_wait_and_leaves_the_journal_open_under_it(
        config: NodeConfig, journal: Journal, tmp_path: Path, held_synthesis: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    started, release = held_synthesis
    worker = Worker(config)
    worker.start()
    job_id = queue_job(journal, tmp_path)
    assert started.wait(30)
    t0 = time.monotonic()
    assert worker.stop(timeout_s=0.5) is False  # the run goes on: abandoned, not cut off
    assert time.monotonic() - t0 < 5
    assert "1 run(s) still going after 0.5 s are abandoned" in caplog.text
    release.set()
    # the journal was left open under it: the run still records (its claim has not expired yet)
    _wait(lambda: journal.job(job_id).state == "written", "the abandoned run recorded")
    assert journal.job(job_id).attempts == 1
    worker.journal.close()


def test_a_worker_says_ready_feeds_the_watchdog_while_healthy_and_says_stopping(
        config: NodeConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s
        worker = Worker(config)
        worker.start()
        try:
            assert sock.recv(4096).decode() == f"READY=1\nSTATUS=worker {worker.id} on cpu"
            assert [sock.recv(4096) for _ in range(3)] == [b"WATCHDOG=1"] * 3
            worker.journal.close()  # the journal takes no writes any more: no ping (systemd restarts it)
            assert not worker.health().ok
        finally:
            worker.stop()
        messages = []
        while (message := sock.recv(4096)) != b"STOPPING=1":
            messages.append(message)
        assert messages.count(b"WATCHDOG=1") <= 1  # one in flight as the journal closed, then none


def _written_job(journal: Journal, tmp_path: Path, name: str, study: Any, action: str, model: str,
                 follow_ups: tuple[str, ...] = ()) -> int:
    """A job of a new series of ``study`` that recorded what an agreement check needs (volumes kept, a SEG)."""
    uid = record_series(journal, make_mr_series(tmp_path / name, shape=SHAPE, spacing=SPACING, study=study))
    version = journal.close_series(uid)
    assert version is not None
    job = journal.add_job(series_uid=uid, version=version, rule=name, action=action, model=model)
    files = [OutputFile(kind, str(tmp_path / f"{name}-{kind}")) for kind in (T1_VOLUME, LABEL_VOLUME, "SEG")]
    journal.record_outputs(job, [], [], files=files, follow_ups=follow_ups)
    return job


def test_a_worker_leaves_an_agreement_check_whose_model_it_lacks_to_one_that_has_it(
        config: NodeConfig, journal: Journal, tmp_path: Path) -> None:
    """Found in review: a worker's poll took any queued follow-up. The agreement check of a real T1 reads the
    manifest of the model that made the study's sT1: a worker without that model (a Celery deployment's segmenter
    worker) failed it ("model not installed"). It leaves it to a worker that has the model, and Celery routes it
    there (the follow-up's needs were its own job's model: the segmenter)."""
    gpu_rule = rule(name="gpu-only", series_description="flair", model="held-by-the-gpu-worker", output_name="x")
    config = config.model_copy(update={"rules": [*config.rules, gpu_rule]})
    study = make_study()
    _written_job(journal, tmp_path, "synthetic", study, "synthesize", "held-by-the-gpu-worker")
    real = _written_job(journal, tmp_path, "real", study, "volumetry", MODEL, follow_ups=("agreement",))
    (check,) = journal.follow_ups(real)
    assert follow_up_models(journal, check) == {"held-by-the-gpu-worker"}
    assert task_needs(config, journal, Task("follow_up", check.id)) == Needs(frozenset({"held-by-the-gpu-worker"}),
                                                                             inference=False)
    worker = Worker(config)
    try:
        worker.models = {MODEL}
        assert not worker._can_run("follow_up", check.id)
        assert journal.next_queued(worker._can_run) is None
        worker.models = {MODEL, "held-by-the-gpu-worker"}
        assert worker._can_run("follow_up", check.id)
    finally:
        worker.journal.close()
    alone = _written_job(journal, tmp_path, "alone", make_study(), "volumetry", MODEL, follow_ups=("agreement",))
    (nothing_to_compare,) = journal.follow_ups(alone)
    assert follow_up_models(journal, nothing_to_compare) == frozenset()
    lone_synthetic = _written_job(journal, tmp_path, "lone-sT1", make_study(), "synthesize", "held-by-the-gpu-worker",
                                  follow_ups=("agreement",))
    (no_real_t1_yet,) = journal.follow_ups(lone_synthetic)
    assert follow_up_models(journal, no_real_t1_yet) == frozenset()  # it only notes that there is nothing to compare


def test_an_agreement_check_whose_model_no_rule_names_is_taken_not_left_queued(
        config: NodeConfig, journal: Journal, tmp_path: Path) -> None:
    """Found in review: the sT1 of an old study was made by a model replaced since (removed from the rules and the
    models folder); a real T1 of that study arriving now queued a check that needs the old model. No worker has it,
    so none took it: it stayed queued for ever, unexplained. Taken, it fails with "model not installed"."""
    study = make_study()
    _written_job(journal, tmp_path, "synthetic", study, "synthesize", "synth-t1-replaced-since")
    real = _written_job(journal, tmp_path, "real", study, "volumetry", MODEL, follow_ups=("agreement",))
    (check,) = journal.follow_ups(real)
    worker = Worker(config)
    try:
        worker.models = {MODEL}
        assert worker._can_run("follow_up", check.id)
    finally:
        worker.journal.close()


def test_a_worker_advertises_the_device_its_models_run_on(config: NodeConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu offers CUDA on a host without a usable GPU, and its sessions run on the CPU: the worker must
    not take jobs from the GPU queue (it would run them on the CPU)."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    worker = Worker(config)
    worker.start()
    try:
        assert worker.registry.providers_in_use() == {"CPUExecutionProvider"}
        assert worker.device == "cpu"
    finally:
        assert worker.stop()


def test_a_worker_leaves_a_job_whose_models_it_lacks_to_one_that_has_them(config: NodeConfig, journal: Journal,
                                                                          tmp_path: Path) -> None:
    """The journal poll claimed the oldest queued job whatever its models: a worker without them (a Celery
    deployment's CPU worker, the job waiting for the GPU one) failed it for good as "model not installed" and sent
    a "not processed" page. It takes the next job it can run instead."""
    gpu_rule = rule(name="gpu-only", series_description="flair", model="held-by-the-gpu-worker", output_name="x")
    config = config.model_copy(update={"rules": [*config.rules, gpu_rule]})
    uid = record_series(journal, make_mr_series(tmp_path / "flair", shape=SHAPE, spacing=SPACING))
    version = journal.close_series(uid)
    assert version is not None
    elsewhere = journal.add_job(series_uid=uid, version=version, rule="gpu-only", action="synthesize",
                                model="held-by-the-gpu-worker")
    mine = queue_job(journal, tmp_path)
    worker = Worker(config)
    worker.start()
    try:
        _wait(lambda: journal.job(mine).state == "written", "its own job written")
        time.sleep(0.5)  # polls meanwhile
        assert journal.job(elsewhere).state == "queued" and journal.job(elsewhere).attempts == 0
    finally:
        assert worker.stop()
