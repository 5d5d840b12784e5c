"""The node's Prometheus metrics (``/metrics``), on a registry of its own (never the process-global one, so that
several nodes in one process do not clash).

Counted as they happen: C-STORE outcomes (:meth:`NodeMetrics.store_status`, called by the SCP with the status it
answered) and the duration of each step of a job that wrote its outputs (:meth:`NodeMetrics.observe_job`).
Read from the journal at scrape time (:class:`JournalCollector`): series and jobs by state, the outbox by
destination and state, the age of each destination's oldest pending item, free disk space and the health checks;
from the receipt log (:class:`ReceiptCollector`): its segments by state, the segment files waiting in its directory,
settles that failed and objects that replays filed again.
Labels carry no patient data: states, step names, destination names, DICOM status meanings.

A worker process (``serve --role worker``) exports :class:`WorkerMetrics` on a port of its own (``[executor]
worker_metrics_port``, ``serve --metrics-port``): its step timings, the tasks it took by how they ended, the runs
in progress, the models it holds, its health checks, and ``dicom_node_process_info`` with its role and worker id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .health import Health, disk_free_bytes
from .journal import FollowUpState, JobState, Journal, OutboxState, SeriesState
from .lock import processes
from .receipts import LogStatus

#: Content-Type of the exposition format written by :func:`prometheus_client.generate_latest`.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Buckets of the step durations, seconds: from a header-only step to a slow CPU synthesis.
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def refusal_reason(status: int) -> str | None:
    """The ``reason`` label of a C-STORE response status (PS3.4 Annex B, PS3.7 Annex C); None for Success and
    the Warning statuses (the object was stored)."""
    if status == 0x0000 or 0xB000 <= status <= 0xBFFF:
        return None
    if 0xA700 <= status <= 0xA7FF:
        return "out_of_resources"
    if 0xA900 <= status <= 0xA9FF:
        return "dataset_mismatch"
    if 0xC000 <= status <= 0xCFFF:
        return "cannot_understand"
    return f"status_0x{status:04X}"


def _process_labels(record: Mapping[str, object]) -> list[str]:
    return [str(record.get("role", "")), str(record.get("host", "")), str(record.get("pid", "")),
            str(record.get("worker", "")), str(record.get("metrics_port", "") or "")]


class JournalCollector(Collector):
    """Gauges computed from the journal (and the disk, and the health checks) each time ``/metrics`` is read."""

    def __init__(self, journal: Journal, data_dir: Path, destinations: Callable[[], Sequence[str]],
                 health: Callable[[], Health] | None = None) -> None:
        self.journal = journal
        self.data_dir = data_dir
        self.destinations = destinations
        self.health = health

    def collect(self) -> Iterator[Metric]:
        counts = self.journal.counts()
        yield _by_state("dicom_node_series", "Series in the journal by state.", SeriesState, counts["series"])
        yield _by_state("dicom_node_jobs", "Jobs in the journal by state.", JobState, counts["jobs"])
        yield _by_state("dicom_node_follow_ups", "Follow-ups (optional steps of written jobs) by state.",
                        FollowUpState, counts["follow_ups"])
        instances = GaugeMetricFamily("dicom_node_instances_stored", "Received instances the journal holds.")
        instances.add_metric([], counts["instances"]["total"])
        yield instances

        items = GaugeMetricFamily("dicom_node_outbox_items", "Outbox items by destination and state.",
                                  labels=["destination", "state"])
        oldest = GaugeMetricFamily(
            "dicom_node_outbox_oldest_pending_age_seconds",
            "Age of the oldest item still to deliver, per destination (0: nothing pending).", labels=["destination"])
        now = time.time()
        summary = self.journal.outbox_summary()
        destinations = list(dict.fromkeys([*self.destinations(), *(r["destination"] for r in summary)]))
        for dest in destinations:
            rows = {r["state"]: r for r in summary if r["destination"] == dest}
            for state in OutboxState:
                items.add_metric([dest, state.value], rows[state]["n"] if state in rows else 0)
            pending = rows.get(OutboxState.PENDING)
            age = now - pending["oldest_queued_at"] if pending and pending["oldest_queued_at"] else 0.0
            oldest.add_metric([dest], max(age, 0.0))
        yield items
        yield oldest

        yield self._processes()

        free = GaugeMetricFamily("dicom_node_disk_free_bytes", "Free bytes on the file system of the data directory.")
        try:
            free.add_metric([], disk_free_bytes(self.data_dir))
        except OSError:
            pass  # the health check says why
        yield free

        if self.health is not None:
            health = self.health()
            checks = GaugeMetricFamily("dicom_node_health_check", "1 when the health check passes, 0 when not.",
                                       labels=["check"])
            for name, check in health.checks.items():
                checks.add_metric([name], 1.0 if check.ok else 0.0)
            yield checks



    def _processes(self) -> GaugeMetricFamily:
        """Every serving process of the data directory (receivers, workers, dispatchers), from their process locks:
        a worker's own metrics are on its ``metrics_port``."""
        family = GaugeMetricFamily("dicom_node_process_up", "1 for each serving process of the data directory.",
                                   labels=["role", "host", "pid", "worker", "metrics_port"])
        for record in processes(self.data_dir):
            family.add_metric(_process_labels(record), 1.0)
        return family

def _by_state(name: str, documentation: str, states: type[SeriesState] | type[JobState],
              counts: Mapping[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["state"])
    for state in states:
        family.add_metric([state.value], counts.get(state.value, 0))
    return family


class ReceiptCollector(Collector):
    """The receipt log's state each time ``/metrics`` is read: ``receipts()`` gives its status and how many objects
    replays filed again."""

    def __init__(self, receipts: Callable[[], tuple[LogStatus, int]]) -> None:
        self.receipts = receipts

    def collect(self) -> Iterator[Metric]:
        try:
            status, replayed = self.receipts()
        except OSError:  # its directory cannot be read: the receipt_log health check says why
            return
        segments = GaugeMetricFamily("dicom_node_receipt_segments", "This process's receipt log segments by state "
                                     "(failing: its last settle failed; the sweep tries again).", labels=["state"])
        for state, n in (("open", status.open), ("settling", status.settling), ("failing", len(status.failing))):
            segments.add_metric([state], n)
        yield segments
        for family, name, documentation, value in (
                (GaugeMetricFamily, "dicom_node_receipt_segment_files", "Segment files in the receipt log's "
                 "directory (every process's, and those a stopped process left).", status.files),
                (GaugeMetricFamily, "dicom_node_receipt_oldest_segment_age_seconds", "Time since the oldest "
                 "segment file was last written (0: none).", status.oldest_file_age_s),
                (CounterMetricFamily, "dicom_node_receipt_settle_failures", "Settles of a segment that failed "
                 "(retried by the sweep).", status.settle_failures),
                (CounterMetricFamily, "dicom_node_receipt_objects_replayed", "Acknowledged objects filed again "
                 "from the receipt log (their journal row or spool file was lost).", replayed)):
            metric = family(name, documentation)
            metric.add_metric([], value)
            yield metric


class NodeMetrics:
    """One node's metrics and the registry ``/metrics`` exports."""

    def __init__(self, journal: Journal, data_dir: Path, destinations: Callable[[], Sequence[str]],
                 health: Callable[[], Health] | None = None,
                 receipts: Callable[[], tuple[LogStatus, int]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.received = Counter("dicom_node_instances_received", "C-STOREs answered with Success or a Warning "
                                "(re-sends of a stored object included).", registry=self.registry)
        self.refused = Counter("dicom_node_instances_refused", "C-STOREs answered with a failure status, by the "
                               "status' meaning.", labelnames=["reason"], registry=self.registry)
        for reason in ("out_of_resources", "dataset_mismatch", "cannot_understand"):
            self.refused.labels(reason=reason)  # exported as 0 before the first refusal
        self.step_seconds = Histogram("dicom_node_job_step_duration_seconds", "Duration of each step of the jobs "
                                      "that wrote their outputs (total: the whole core of the job).",
                                      labelnames=["step"], buckets=STEP_BUCKETS, registry=self.registry)
        self.registry.register(JournalCollector(journal, data_dir, destinations, health))
        if receipts is not None:
            self.registry.register(ReceiptCollector(receipts))

    def store_status(self, status: int) -> None:
        """Count one C-STORE by the status it was answered with."""
        reason = refusal_reason(status)
        if reason is None:
            self.received.inc()
        else:
            self.refused.labels(reason=reason).inc()

    def observe_job(self, timings: Mapping[str, float]) -> None:
        """The timings of one job (``JobRunner``: step name → seconds)."""
        for step, seconds in timings.items():
            self.step_seconds.labels(step=step).observe(seconds)

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)


class HealthCollector(Collector):
    """``dicom_node_health_check{check}``, from the health checks each time ``/metrics`` is read."""

    def __init__(self, health: Callable[[], Health]) -> None:
        self.health = health

    def collect(self) -> Iterator[Metric]:
        checks = GaugeMetricFamily("dicom_node_health_check", "1 when the health check passes, 0 when not.",
                                   labels=["check"])
        for name, check in self.health().checks.items():
            checks.add_metric([name], 1.0 if check.ok else 0.0)
        yield checks


class WorkerMetrics:
    """A worker process's metrics (``serve --role worker``): what it ran and how long each step took."""

    def __init__(self, worker: str, executor: str, health: Callable[[], Health] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.worker = worker
        self.executor = executor
        self.step_seconds = Histogram("dicom_node_job_step_duration_seconds", "Duration of each step of the jobs "
                                      "this worker wrote (total: the whole core of the job).",
                                      labelnames=["step"], buckets=STEP_BUCKETS, registry=self.registry)
        self.tasks = Counter("dicom_node_worker_tasks", "Tasks this worker took, by kind (job, follow_up) and how "
                             "they ended: done, failed, lost (its claim taken over), skipped (claimed elsewhere or "
                             "no longer queued), requeued (failed for a reason outside the job: run again).",
                             labelnames=["kind", "outcome"], registry=self.registry)
        for kind in ("job", "follow_up"):
            for outcome in ("done", "failed"):
                self.tasks.labels(kind=kind, outcome=outcome)  # exported as 0 before the first
        self.running = Gauge("dicom_node_worker_tasks_running", "Tasks this worker runs now.",
                             registry=self.registry)
        self.info = Gauge("dicom_node_process_info", "This process (always 1): its role, worker id, executor "
                          "(thread, celery) and device (cpu, cuda).", labelnames=["role", "worker", "executor",
                                                                                  "device"], registry=self.registry)
        self.models = Gauge("dicom_node_worker_models", "The models this worker holds (1 each).",
                            labelnames=["model"], registry=self.registry)
        if health is not None:
            self.registry.register(HealthCollector(health))

    def describe(self, device: str, models: Sequence[str]) -> None:
        """What the worker runs on and holds (known once its models are loaded)."""
        self.info.labels(role="worker", worker=self.worker, executor=self.executor, device=device).set(1)
        for model in models:
            self.models.labels(model=model).set(1)

    def observe_job(self, timings: Mapping[str, float]) -> None:
        for step, seconds in timings.items():
            self.step_seconds.labels(step=step).observe(seconds)

    def task_ended(self, kind: str, outcome: str) -> None:
        self.tasks.labels(kind=kind, outcome=outcome).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
