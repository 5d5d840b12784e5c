"""Celery with Redis as the node's distributed engine (``[executor] kind = "celery"``): the app, the receiver's
executor, and the workers' announcements of what they run.

The journal stays the truth; a message only wakes a worker. The receiver queues a job (or follow-up) in the
journal as always, and after that commit :class:`CeleryExecutor` publishes the task ``dicom_node.run(kind, id)``
to the queue :func:`dicom_node.celery_routing.queue_for` picks from the workers' live announcements
(:class:`Announcements`). A worker process (:mod:`dicom_node.celery_worker`) consumes its queues and runs the
task through ``JobRunner.perform``, which claims the row first: a duplicate or redelivered message finds it
claimed or done and runs nothing. Publishing never blocks the receiver (a thread of its own does it) and never
loses a job: with the broker down the task stays queued in the journal, and the workers' journal poll
(``[executor] poll_interval_s``) runs it.

Celery and redis are the ``scale`` extra: they are imported here, and this module only when ``kind = "celery"``.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit

from .celery_routing import Capabilities, Needs, queue_for
from .config import ExecutorSettings, NodeConfig
from .jobs import Task
from .journal import Journal
from .steps import follow_up_models

if TYPE_CHECKING:
    import redis
    from celery import Celery

log = logging.getLogger(__name__)

#: The one task the node sends: ``dicom_node.run(kind, id)`` (``kind``: "job" or "follow_up").
TASK_NAME = "dicom_node.run"


class BrokerConfigError(ValueError):
    """The broker cannot be configured (its password file unreadable); one clear line."""


def broker_url(settings: ExecutorSettings) -> str:
    """``[executor] broker_url`` with the password of ``broker_password_file`` (if any) put in."""
    if settings.broker_password_file is None:
        return settings.broker_url
    try:
        password = Path(settings.broker_password_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise BrokerConfigError(f"[executor] broker_password_file {settings.broker_password_file}: cannot read "
                                f"it: {getattr(exc, 'strerror', None) or exc}") from None
    if not password:
        raise BrokerConfigError(f"[executor] broker_password_file {settings.broker_password_file} is empty")
    parts = urlsplit(settings.broker_url)
    return urlunsplit(parts._replace(netloc=f":{quote(password, safe='')}@{parts.netloc}"))


def redacted(url: str) -> str:
    """A broker URL fit for the log: no password."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host))


def make_app(settings: ExecutorSettings) -> Celery:
    """A Celery app of its own (never the process-global default) for the broker of ``settings``."""
    from celery import Celery

    app = Celery("dicom_node", broker=broker_url(settings), set_as_current=False)
    app.conf.update(
        task_acks_late=True,  # a message is acknowledged once its run ended: a worker's loss redelivers it
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,  # the journal holds every result
        task_default_queue=f"{settings.queue_prefix}.any",
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits for its broker (its journal poll runs meanwhile)
        broker_connection_timeout=5.0,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5,
                                   "interval_max": 1.0},
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s, "socket_timeout": 10.0,
                                  "socket_connect_timeout": 5.0},
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,  # the claim decides; no need to cancel
    )
    return app


class Announcements:
    """Workers' announcements in Redis: ``<prefix>.worker.<id>`` holds a worker's :class:`Capabilities` as
    JSON for ``[executor] announce_ttl_s`` (it renews it every third of that); the receiver reads them."""

    def __init__(self, settings: ExecutorSettings) -> None:
        self.settings = settings
        self.prefix = settings.queue_prefix
        self._client: redis.Redis | None = None

    def client(self) -> redis.Redis:
        if self._client is None:
            import redis

            self._client = redis.Redis.from_url(broker_url(self.settings), socket_timeout=5.0,
                                                socket_connect_timeout=5.0)
        return self._client

    def announce(self, caps: Capabilities) -> None:
        """Publish (or renew) one worker's announcement; raises when Redis cannot be reached."""
        value = json.dumps({"worker": caps.worker, "device": caps.device, "models": sorted(caps.models),
                            "queues": sorted(caps.queues)})
        self.client().set(f"{self.prefix}.worker.{caps.worker}", value, ex=max(1, round(self.settings.announce_ttl_s)))

    def withdraw(self, worker: str) -> None:
        self.client().delete(f"{self.prefix}.worker.{worker}")

    def live(self) -> list[Capabilities]:
        """The announcements not expired; a malformed one is skipped (logged)."""
        client = self.client()
        keys = sorted(client.scan_iter(match=f"{self.prefix}.worker.*", count=200))
        found = []
        for key, value in zip(keys, client.mget(keys) if keys else [], strict=True):
            if value is None:
                continue  # expired between the scan and the read
            try:
                data = json.loads(value)
                device = data["device"] if data["device"] in ("cpu", "cuda") else "cpu"
                found.append(Capabilities(str(data["worker"]), device, frozenset(map(str, data["models"])),
                                          frozenset(map(str, data["queues"]))))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring a malformed worker announcement %r: %s", key, exc)
        return found

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def task_needs(config: NodeConfig, journal: Journal, task: Task) -> Needs:
    """What ``task`` needs of a worker: a job, its rule's models (a network: inference); a follow-up, the models
    whose manifests it reads (:func:`dicom_node.steps.follow_up_models`) and no network."""
    if task.kind == "job":
        job = journal.job(task.id)
        rule = next((r for r in config.rules if r.name == job.rule), None)
        models = config.models_for(rule) if rule is not None else [m for m in [job.model] if m]
        return Needs(frozenset(models), inference=bool(models))
    return Needs(follow_up_models(journal, journal.follow_up(task.id)), inference=False)


class CeleryExecutor:
    """The executor of a receiver with ``[executor] kind = "celery"``: ``submit`` hands the task (already queued
    in the journal) to a publishing thread, which routes it and sends ``dicom_node.run``; a broker that cannot
    be reached is logged once (and once when it is back): the task waits in the journal for a worker's poll."""

    def __init__(self, config: NodeConfig, journal: Journal, app: Celery | None = None) -> None:
        self.config = config
        self.settings = config.executor
        self.journal = journal
        self.app = app if app is not None else make_app(self.settings)
        self.announcements = Announcements(self.settings)
        self._tasks: queue.Queue[Task | None] = queue.Queue()
        self._broker_down = False
        self._retry_at = 0.0
        self._workers: list[Capabilities] = []
        self._workers_read = float("-inf")
        #: tasks published so far, and sent to which queue (the last ones; for tests and the log)
        self.published: list[tuple[Task, str]] = []
        self._thread = threading.Thread(target=self._loop, name="celery-publisher", daemon=True)
        self._thread.start()
        log.info("executor: Celery on %s (queues %s.*); jobs are queued in the journal and published to the "
                 "workers", redacted(self.app.conf.broker_url), self.settings.queue_prefix)

    def submit(self, task: Task) -> None:
        self._tasks.put(task)

    def shutdown(self, timeout_s: float = 10.0) -> bool:
        """Publish what was submitted (up to ``timeout_s``); what is left stays queued in the journal. False when
        the publishing thread (which reads the journal to route) still runs."""
        self._tasks.put(None)
        self._thread.join(timeout=timeout_s)
        self.announcements.close()
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while (task := self._tasks.get()) is not None:
            self.publish(task)

    def publish(self, task: Task) -> str | None:
        """Route and send one task; returns its queue (None: not sent, it waits in the journal). Never raises."""
        try:
            needs = task_needs(self.config, self.journal, task)
        except Exception as exc:  # noqa: BLE001 - a row gone (purged) or a journal busy: the poll has it
            log.warning("%s: not published (%s: %s); it waits in the journal for a worker's poll", task,
                        type(exc).__name__, exc)
            return None
        if self._broker_down and time.monotonic() < self._retry_at:
            log.debug("%s not published: the broker was unreachable moments ago", task)
            return None
        try:
            name = queue_for(needs, self._live_workers(), self.settings.queue_prefix)
            self.app.send_task(TASK_NAME, args=[task.kind, task.id], queue=name)
        except Exception as exc:  # noqa: BLE001 - kombu's, redis' and socket errors alike: the journal has it
            self._down(task, exc)
            return None
        if self._broker_down:
            self._broker_down = False
            log.info("broker %s reachable again: tasks are published again", redacted(self.app.conf.broker_url))
        log.info("%s published to queue %s", task, name)
        self.published = [*self.published[-99:], (task, name)]
        return name

    def _down(self, task: Task, exc: Exception) -> None:
        """Log an outage once; while it lasts, try again at most every ``announce_ttl_s / 3`` (the tasks in
        between are left to the journal poll at once, not each after a connection's timeout)."""
        self._retry_at = time.monotonic() + self.settings.announce_ttl_s / 3
        if not self._broker_down:
            self._broker_down = True
            log.error("broker %s unreachable (%s: %s): %s and what follows stay queued in the journal, run by the "
                      "workers' journal poll (every %g s) until it is back", redacted(self.app.conf.broker_url),
                      type(exc).__name__, exc, task, self.settings.poll_interval_s)
        else:
            log.debug("%s not published: broker still unreachable", task)

    def _live_workers(self) -> Sequence[Capabilities]:
        """The workers' announcements, read again at most every third of their lifetime."""
        if time.monotonic() - self._workers_read >= self.settings.announce_ttl_s / 3:
            self._workers = self.announcements.live()
            self._workers_read = time.monotonic()
        return self._workers
