"""A worker process (``dicom-node serve --role worker``): claims queued jobs and follow-ups from the shared journal
and runs them; nothing else (no listener, no delivery, no retention, no HTTP).

Any number of workers run beside one receiver (``--role receiver``, or ``all``) on the same data directory of
one machine: the journal (SQLite in WAL mode, a busy timeout for the writers) is their queue. Each of
``[inference] workers`` threads takes the oldest queued follow-up, else the oldest queued job, and runs it once
its claim holds (``Journal.claim``: exactly one worker gets a run); the claim's lease is renewed while it runs
(:mod:`dicom_node.leases`). An idle thread looks again every ``[jobs] poll_interval_s``, after queueing again
the runs whose lease expired (their worker died: ``JobRunner.recover``). A job's outputs are delivered by the
receiver's dispatcher, which scans the outbox every ``[dispatch] scan_interval_s``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from inference.models import ModelRegistry

from . import systemd
from .config import NodeConfig
from .jobs import JobRunner, Task
from .journal import open_journal
from .notify import Notifier, install
from .service import prepare_models

log = logging.getLogger(__name__)


def worker_id() -> str:
    """This process's id in the journal's claims: host and process id (unique among the live processes)."""
    return f"worker@{socket.gethostname()}:{os.getpid()}"


class Worker:
    """The worker role: ``[inference] workers`` threads claiming and running the journal's queued work."""

    def __init__(self, config: NodeConfig, worker: str | None = None) -> None:
        self.config = config
        self.id = worker or worker_id()
        self.journal = open_journal(config)
        self.registry = ModelRegistry(config.inference.models_dir, providers=config.inference.providers,
                                      threads=config.inference.threads)
        self.runner = JobRunner(config, self.journal, self.registry, on_written=lambda: None, worker=self.id)
        self.runner.submit = self.submit  # a job's follow-ups: queued in the journal, any worker may take them
        self.notifier = Notifier(config.notifications, node=config.node.ae_title)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._expiry_lock = threading.Lock()
        self._next_expiry = 0.0
        self._threads = [threading.Thread(target=self._loop, name=f"job-worker-{i}", daemon=True)
                         for i in range(config.inference.workers)]

    def start(self) -> None:
        install(self.notifier.start())
        prepare_models(self.config, self.registry, warm=True)
        for thread in self._threads:
            thread.start()
        log.info("worker %s ready: %d thread(s) claiming jobs from %s", self.id, len(self._threads),
                 self.journal.path)
        systemd.notify("READY=1")  # a Type=notify unit (no watchdog for workers yet: leave WatchdogSec out)

    def submit(self, task: Task) -> None:
        """The executor seam: the task is queued in the journal already; wake an idle thread to claim it."""
        self._wake.set()

    def shutdown(self) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop taking work; a run in progress ends first (up to 30 s a thread; past that its claim expires and
        another worker takes it over)."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=30)
        self.runner.leases.stop()
        install(None)
        self.notifier.stop()
        self.journal.close()

    def _expire(self) -> None:
        """Queue again the runs whose claim expired, at most once a poll interval for all threads."""
        with self._expiry_lock:
            if time.monotonic() < self._next_expiry:
                return
            self._next_expiry = time.monotonic() + self.config.jobs.poll_interval_s
        if self.journal.expired_claims():
            self.runner.recover(own=None)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._expire()
                queued = self.journal.next_queued()
                if queued is None:
                    self._wake.wait(self.config.jobs.poll_interval_s)
                    self._wake.clear()
                    continue
                kind, task_id = queued
                self.runner.perform(Task("job" if kind == "job" else "follow_up", task_id))
            except Exception:  # noqa: BLE001 - keep the worker alive: the journal may be busy for a moment
                log.exception("worker %s: claiming or running work failed; trying again", self.id)
                self._stop.wait(self.config.jobs.poll_interval_s)
