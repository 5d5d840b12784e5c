"""A worker process (``dicom-node serve --role worker``): claims queued jobs and follow-ups from the shared journal
and runs them; nothing else (no listener, no delivery, no retention, no dashboard).

Any number of workers run beside one receiver (``--role receiver``, or ``all``) on the same data directory: the
journal (SQLite in WAL mode, a busy timeout for the writers) is their queue, and ``Journal.claim`` gives each run
to exactly one worker; the claim's lease is renewed while it runs (:mod:`dicom_node.leases`). How a worker learns
of work depends on ``[executor] kind``:

* ``thread``: each of ``[inference] workers`` threads takes the oldest queued follow-up, else the oldest queued
  job; idle, it looks again every ``[jobs] poll_interval_s``.
* ``celery``: a Celery worker in the process (:mod:`dicom_node.celery_worker`) consumes the queues derived from
  the worker's device and models (:mod:`dicom_node.celery_routing`), announced in Redis for the receiver's
  routing; one thread still polls the journal every ``[executor] poll_interval_s`` and takes a task that has
  waited that long (the safety net for a message lost, or not published while the broker was down). Both share
  ``[inference] workers`` slots; the follow-ups a job queues, and the runs taken over, are published like the
  receiver's.

Either way the poll first queues again, at most once a poll interval, the runs whose lease expired (their worker
died: ``JobRunner.recover``). A job's outputs are delivered by the receiver's dispatcher, which scans the outbox
every ``[dispatch] scan_interval_s``. ``[executor] worker_metrics_port`` serves the worker's ``/metrics``; under
systemd with ``WatchdogSec=`` the worker sends ``WATCHDOG=1`` while its journal takes writes and its threads run.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from inference.models import ModelRegistry

from . import systemd
from .celery_routing import Capabilities, Device, detect_device, model_sets, worker_queues
from .config import NodeConfig
from .exporter import WorkerMetrics
from .health import Check, Health, check_journal, check_runs
from .jobs import JobRunner, Task
from .journal import open_journal
from .notify import Notifier, install
from .service import prepare_models
from .steps import follow_up_models

log = logging.getLogger(__name__)


def worker_id() -> str:
    """This process's id in the journal's claims: host and process id (unique among the live processes)."""
    return f"worker@{socket.gethostname()}:{os.getpid()}"


def onnx_providers() -> list[str]:
    """The execution providers this process's onnxruntime offers."""
    import onnxruntime

    return list(onnxruntime.get_available_providers())


class Worker:
    """The worker role: claims and runs the journal's queued work, woken by its poll or by Celery messages."""

    def __init__(self, config: NodeConfig, worker: str | None = None, metrics_port: int | None = None) -> None:
        self.config = config
        self.id = worker or worker_id()
        self.celery = config.executor.kind == "celery"
        self.journal = open_journal(config)
        self.registry = ModelRegistry(config.inference.models_dir, providers=config.inference.providers,
                                      threads=config.inference.threads)
        self.metrics = WorkerMetrics(self.id, config.executor.kind, health=self.health)
        self.runner = JobRunner(config, self.journal, self.registry, on_written=lambda: None,
                                on_timings=self.metrics.observe_job, worker=self.id)
        self.runner.submit = self.submit  # a job's follow-ups: queued in the journal, any worker may take them
        self.notifier = Notifier(config.notifications, node=config.node.ae_title)
        self.poll_interval_s = config.executor.poll_interval_s if self.celery else config.jobs.poll_interval_s
        self.metrics_port = config.executor.worker_metrics_port if metrics_port is None else metrics_port
        self.device: Device = "cpu"
        self.models: set[str] = set()
        self.capabilities: Capabilities | None = None
        self.publisher: Any = None  # celery: the CeleryExecutor that publishes follow-ups and runs taken over
        self.consumer: Any = None  # celery: the CeleryConsumer
        self.announcements: Any = None
        self.scheduler = BackgroundScheduler(daemon=True)
        self._http: Any = None
        self._slots = threading.BoundedSemaphore(config.inference.workers)
        self._running = 0
        self._running_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._expiry_lock = threading.Lock()
        self._next_expiry = 0.0
        self._threads = [threading.Thread(target=self._loop, name=f"job-worker-{i}", daemon=True)
                         for i in range(1 if self.celery else config.inference.workers)]

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        install(self.notifier.start())
        self.models = prepare_models(self.config, self.registry, warm=True)
        # what the warm sessions run on (onnxruntime-gpu offers CUDA on a host without a usable GPU, and its
        # sessions then run on the CPU); what onnxruntime offers when no model is loaded
        self.device = detect_device(self.config.inference.providers,
                                    self.registry.providers_in_use() or onnx_providers())
        self.metrics.describe(self.device, sorted(self.models))
        if self.metrics_port:
            self._start_metrics()
        if self.celery:
            self._start_celery()
        for thread in self._threads:
            thread.start()
        self._start_timers()
        log.info("worker %s ready on %s: %s", self.id, self.device,
                 f"Celery ({self.config.executor.poll_interval_s:g} s journal poll as the safety net)"
                 if self.celery else f"{len(self._threads)} thread(s) claiming jobs from {self.journal.path}")
        watchdog = systemd.watchdog_interval_s()
        systemd.notify(f"READY=1\nSTATUS=worker {self.id} on {self.device}")
        if watchdog is not None:
            log.info("systemd notified: ready, watchdog every %g s", watchdog)

    def _start_metrics(self) -> None:
        from prometheus_client import start_http_server

        host = self.config.executor.worker_metrics_host
        self._http, _ = start_http_server(self.metrics_port, addr=host, registry=self.metrics.registry)
        log.info("worker metrics on http://%s:%d/metrics", host, self.metrics_port)

    def _start_celery(self) -> None:
        from .celery_app import Announcements, CeleryExecutor
        from .celery_worker import CeleryConsumer

        settings = self.config.executor
        queues = worker_queues(settings.queue_prefix, self.device, self.models, model_sets(self.config))
        self.capabilities = Capabilities(self.id, self.device, frozenset(self.models), frozenset(queues))
        self.publisher = CeleryExecutor(self.config, self.journal)
        self.announcements = Announcements(settings)
        self.consumer = CeleryConsumer(settings, self.id, queues, self.config.inference.workers, self.on_message)
        self.consumer.start()

    def _start_timers(self) -> None:
        if self.celery:
            self.announce()  # before the worker says it is ready: the receiver routes to it from now on
            every = self.config.executor.announce_ttl_s / 3
            self.scheduler.add_job(self.announce, "interval", seconds=every, id="announce", max_instances=1,
                                   coalesce=True)
        watchdog = systemd.watchdog_interval_s()
        if watchdog is not None:
            self.scheduler.add_job(self.feed_watchdog, "interval", seconds=watchdog, id="watchdog",
                                   max_instances=1, coalesce=True)
        if self.scheduler.get_jobs():
            self.scheduler.start()

    # -- what it runs --------------------------------------------------------------------------

    def submit(self, task: Task) -> None:
        """The executor seam: the task is queued in the journal already; publish it (Celery) or wake an idle
        thread to claim it."""
        if self.publisher is not None:
            self.publisher.submit(task)
        self._wake.set()

    def on_message(self, task: Task) -> None:
        """A Celery message: run the task in one of the worker's slots (``Stopping``: not started, requeued)."""
        from .celery_worker import Stopping

        while not self._slots.acquire(timeout=1.0):
            if self._stop.is_set():
                raise Stopping
        try:
            if self._stop.is_set():
                raise Stopping
            self.perform(task)
        finally:
            self._slots.release()

    def perform(self, task: Task) -> None:
        """Run one task, counted in the metrics."""
        with self._running_lock:
            self._running += 1
        self.metrics.running.inc()
        try:
            outcome = self.runner.perform(task)
        finally:
            self.metrics.running.dec()
            with self._running_lock:
                self._running -= 1
        self.metrics.task_ended(task.kind, outcome)

    def _expire(self) -> None:
        """Queue again the runs whose claim expired, at most once a poll interval for all threads."""
        with self._expiry_lock:
            if time.monotonic() < self._next_expiry:
                return
            self._next_expiry = time.monotonic() + self.poll_interval_s
        if self.journal.expired_claims():
            for task in self.runner.recover(own=None):
                if self.publisher is not None:
                    self.publisher.submit(task)

    def _take_one(self) -> bool:
        """Claim and run the oldest queued task in a free slot; False when nothing is queued."""
        if not self._slots.acquire(timeout=self.poll_interval_s):
            return True  # every slot busy for a whole interval: look again
        try:
            if self._stop.is_set():
                return True
            queued = self.journal.next_queued(self._can_run)
            if queued is None:
                return False
            task = Task("job" if queued[0] == "job" else "follow_up", queued[1])
            if self.celery and not self._overdue(task):
                return False  # its message is on its way: leave it to the worker the receiver routed it to
            self.perform(task)
            return True
        finally:
            self._slots.release()

    def _can_run(self, kind: str, task_id: int) -> bool:
        """Whether this worker has the models a queued job or follow-up needs (a worker of a Celery deployment may
        hold only some of them: claimed here, the job failed for good as "model not installed", a "not processed"
        page sent, while a worker with the model was busy); a job whose rule is gone, or a follow-up whose model no
        rule names, is taken (it fails with that)."""
        if kind != "job":  # a follow-up: the manifest of the model whose sT1 it compares
            needed = follow_up_models(self.journal, self.journal.follow_up(task_id))
            # taken also when no rule names the model any more (replaced since): it fails with that reason, not
            # queued for ever
            return needed <= self.models or not needed <= self._configured_models()
        rule = next((r for r in self.config.rules if r.name == self.journal.job(task_id).rule), None)
        return rule is None or set(self.config.models_for(rule)) <= self.models

    def _configured_models(self) -> set[str]:
        return {model for rule in self.config.rules for model in self.config.models_for(rule)}

    def _overdue(self, task: Task) -> bool:
        """Whether a task has waited in the queue a whole poll interval (its message lost, or never sent)."""
        record = self.journal.job(task.id) if task.kind == "job" else self.journal.follow_up(task.id)
        return time.time() - record.updated_at >= self.poll_interval_s

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._expire()
                if not self._take_one():
                    self._wake.wait(self.poll_interval_s)
                    self._wake.clear()
            except Exception:  # noqa: BLE001 - keep the worker alive: the journal may be busy for a moment
                log.exception("worker %s: claiming or running work failed; trying again", self.id)
                self._stop.wait(self.poll_interval_s)

    # -- operations ------------------------------------------------------------------------------

    def announce(self) -> None:
        """Tell the receivers (in Redis) what this worker runs; logged, never raised, when Redis is away."""
        assert self.capabilities is not None and self.announcements is not None
        try:
            self.announcements.announce(self.capabilities)
        except Exception as exc:  # noqa: BLE001 - the next round tries again; the journal poll runs meanwhile
            log.warning("worker %s: cannot announce itself to the broker (%s: %s); trying again in %g s", self.id,
                        type(exc).__name__, exc, self.config.executor.announce_ttl_s / 3)

    def health(self) -> Health:
        """The worker's checks: its journal takes writes, its poll threads (and Celery worker) run."""
        threads = sum(t.is_alive() for t in self._threads)
        checks = {"journal_writable": check_journal(self.journal.probe_write),
                  "workers_alive": Check(threads == len(self._threads),
                                         f"{threads} of {len(self._threads)} poll thread(s) running")}
        checks["runs_progressing"] = check_runs(self.runner.stages, self.config.jobs.max_stage_s,
                                                follow_ups=self.runner.follow_up_stages)
        if self.consumer is not None:
            checks["celery_worker_alive"] = Check(self.consumer.alive(), "consuming" if self.consumer.alive()
                                                  else "stopped: queued work runs by the journal poll only")
        return Health(checks, time.time())

    def feed_watchdog(self) -> None:
        """``WATCHDOG=1`` to systemd while every check passes; otherwise a warning (systemd restarts the worker
        after ``WatchdogSec``)."""
        health = self.health()
        if health.ok:
            systemd.notify("WATCHDOG=1")
        else:
            log.warning("not feeding the systemd watchdog: %s", "; ".join(health.failed()))

    # -- stop ---------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        self.stop()

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop taking work; the runs in progress may end within ``timeout_s`` in all. True when they did; False
        when one goes on: it is abandoned (its lease is no longer renewed, so another worker takes it over once
        it expires) and the journal is left open under it, for the process's exit to end."""
        systemd.notify("STOPPING=1")
        self._stop.set()
        self._wake.set()
        self.runner.retry_wait.set()  # a run waiting to be queued again stops waiting
        deadline = time.monotonic() + timeout_s
        self._withdraw()
        stopped = self.consumer.stop(timeout_s) if self.consumer is not None else True
        for thread in self._threads:
            if thread.ident is not None:  # started
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self.runner.leases.stop()
        busy = self._running or not stopped or any(t.is_alive() for t in self._threads)
        _quietly(self._close_services)
        if busy:
            log.warning("worker %s: %d run(s) still going after %g s are abandoned: their claims expire in %g s "
                        "and another worker takes them over", self.id, self._running, timeout_s,
                        self.config.jobs.lease_s)
            return False
        self.journal.close()
        return True

    def _withdraw(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        if self.announcements is not None and self.capabilities is not None:
            _quietly(lambda: self.announcements.withdraw(self.id))

    def _close_services(self) -> None:
        if self.publisher is not None:
            self.publisher.shutdown(timeout_s=5.0)
        if self.announcements is not None:
            self.announcements.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        install(None)
        self.notifier.stop()


def _quietly(action: Callable[[], object]) -> None:
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - stopping goes on
        log.warning("while stopping: %s: %s", type(exc).__name__, exc)
