"""The Celery side of a worker process (``serve --role worker`` with ``[executor] kind = "celery"``): a Celery
worker in the process, on a thread of its own, consuming the queues the worker derived from what it runs
(:func:`dicom_node.celery_routing.worker_queues`).

The ``threads`` pool with ``[inference] workers`` threads (not prefork: the models stay warm in this one process),
late acknowledgement and a prefetch of one task a thread. Its task ``dicom_node.run(kind, id)`` calls the worker's
handler, which runs ``JobRunner.perform`` (the claim makes a duplicate or redelivered message harmless). A
message that arrives while the worker stops goes back to its queue (``Reject(requeue=True)``).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .celery_app import TASK_NAME, make_app
from .config import ExecutorSettings
from .jobs import Task

log = logging.getLogger(__name__)


class Stopping(Exception):  # noqa: N818 - a signal, not an error
    """The worker stops: a message not started goes back to its queue."""


class CeleryConsumer:
    """A Celery worker (``WorkController``) on a thread of this process, handing each message to ``handle``."""

    def __init__(self, settings: ExecutorSettings, worker: str, queues: Sequence[str], concurrency: int,
                 handle: Callable[[Task], object]) -> None:
        self.app = make_app(settings)
        self.queues = list(queues)
        self.concurrency = concurrency
        self.worker = worker
        self._handle = handle
        self.ready = threading.Event()
        self._register()
        self.controller: Any = None
        self._thread: threading.Thread | None = None

    def _register(self) -> None:
        from celery.exceptions import Reject

        handle = self._handle

        @self.app.task(name=TASK_NAME, acks_late=True, ignore_result=True, shared=False)
        def run(kind: str, task_id: int) -> None:
            if kind not in ("job", "follow_up") or not isinstance(task_id, int):
                log.error("ignoring a malformed %s message: kind %r, id %r", TASK_NAME, kind, task_id)
                return
            try:
                handle(Task("job" if kind == "job" else "follow_up", task_id))
            except Stopping:
                raise Reject("the worker stops", requeue=True) from None

        self.app.finalize()

    def start(self) -> None:
        for chatty in ("celery.app.trace", "celery.worker.strategy"):  # a line per message: the node logs its own
            logging.getLogger(chatty).setLevel(logging.WARNING)
        # the pool's threads look the task up in the default app: this process's one consumer is it
        self.app.set_current()
        self.app.set_default()
        self.controller = self.app.WorkController(
            hostname=f"dicom-node-{self.worker.rpartition(':')[2]}@{socket.gethostname()}",
            pool_cls="threads", concurrency=self.concurrency, queues=self.queues,
            prefetch_multiplier=1, ready_callback=self._ready, without_heartbeat=True, without_mingle=True,
            without_gossip=True, loglevel="WARNING")
        self._thread = threading.Thread(target=self._run, name="celery-worker", daemon=True)
        self._thread.start()

    def _ready(self, _consumer: object) -> None:
        self.ready.set()
        log.info("celery worker consuming %s", ", ".join(self.queues))

    def _run(self) -> None:
        try:
            self.controller.start()
        except BaseException:  # noqa: BLE001 - the journal poll keeps running the queued work
            log.exception("the celery worker stopped; queued work is run by the journal poll only")

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float) -> bool:
        """Stop consuming and wait up to ``timeout_s`` for the runs in progress; True when it stopped in time
        (False: a run goes on, abandoned to its claim's expiry)."""
        if self.controller is None or self._thread is None:
            return True
        deadline = time.monotonic() + timeout_s
        stopper = threading.Thread(target=self.controller.stop, kwargs={"in_sighandler": False},
                                   name="celery-stop", daemon=True)
        stopper.start()
        stopper.join(timeout=max(0.0, deadline - time.monotonic()))
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        return not self._thread.is_alive() and not stopper.is_alive()
