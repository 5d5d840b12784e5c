"""Jobs: what runs for a routed series, and the executor that runs it.

:class:`JobRunner` turns one journal job into files and outbox rows by running the steps of
:mod:`dicom_node.steps` in order (load → synthesize → segment and measure → write each object →
record and queue). Recording the core outputs also queues the job's follow-ups (optional steps such as the
agreement check, :data:`dicom_node.steps.FOLLOW_UPS`), in the same transaction; each is then its own
:class:`Task` for the executor, takes its inputs from the journal, and a follow-up that fails costs only its
own output (its failure is recorded on its own and noted beside the job's state). A job that fails is recorded
with its reason, reported (``notify``: ``job_failed``) and, unless ``[jobs] notify_failures_in_study`` is off,
leaves a "not processed" page in the study for the reader.
:class:`ThreadExecutor` runs tasks on in-process worker threads; a distributed engine replaces it behind the same
two methods (``submit``, ``shutdown``): :class:`JournalQueue` (worker processes poll the journal) or
:class:`dicom_node.celery_app.CeleryExecutor` (Celery with Redis).
"""

from __future__ import annotations

import errno
import logging
import queue
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Literal, TypeVar

from inference.models import ModelRegistry
from inference.norms import load_norms
from inference.volume import GeometryError

from .config import NodeConfig, Rule
from .health import WAITING
from .journal import (
    NODE_WORKER,
    Claim,
    ClaimLost,
    FollowUpRecord,
    FollowUpState,
    JobRecord,
    JobState,
    Journal,
    OutputFile,
    SeriesRecord,
)
from .journal_sql import unavailable_errors
from .leases import LeaseKeeper
from .notify import notify
from .spool import sync_tree
from .steps import (
    FOLLOW_UPS,
    FollowUp,
    FollowUpContext,
    JobContext,
    JobFailed,
    Output,
    SeriesNaming,
    keep_volumes_step,
    load_step,
    measure_step,
    measured_t1,
    not_processed_step,
    outbox_items,
    record_and_queue,
    synthesize_step,
    write_seg_step,
    write_sr_step,
    write_summary_step,
    write_t1_step,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """One piece of work for the executor: a job (``kind`` "job"), or a follow-up of a job ("follow_up")."""

    kind: Literal["job", "follow_up"]
    id: int

    def __str__(self) -> str:
        return f"{'job' if self.kind == 'job' else 'follow-up'} {self.id}"


#: How one run of a task ended, for the worker's metrics: ``done`` (its outputs recorded, or a follow-up's note),
#: ``failed`` (its failure recorded), ``lost`` (its claim was taken over: nothing recorded by this run),
#: ``skipped`` (not queued, or claimed by another worker: not run here).
Outcome = Literal["done", "failed", "lost", "skipped", "requeued"]
#: Seconds a run that failed for a reason outside its job waits, times its attempt, before it is queued again.
TRANSIENT_RETRY_S = 10.0


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t0


@dataclass
class _Run:
    """One run of a job: its context, timings and outputs so far."""

    ctx: JobContext
    timings: dict[str, float]
    started: float
    claim: Claim | None = None
    outputs: list[Output] = field(default_factory=list)
    kept: list[OutputFile] = field(default_factory=list)


class JobRunner:
    """Runs journal jobs (the core steps) and their follow-ups (the optional steps), one :class:`Task` at a time."""

    def __init__(self, config: NodeConfig, journal: Journal, registry: ModelRegistry,
                 on_written: Callable[[], object],
                 on_timings: Callable[[Mapping[str, float]], object] | None = None, *,
                 worker: str = NODE_WORKER) -> None:
        self.config = config
        #: the id this process claims runs under (``Journal.claim``); the node's own, or a worker process's
        self.worker = worker
        self.leases = LeaseKeeper(journal, config.jobs.lease_s)
        self.journal = journal
        self.registry = registry
        self.on_written = on_written
        #: told the step timings of each job that wrote its outputs, and of each follow-up that wrote (metrics)
        self.on_timings = on_timings
        #: the jobs running now: job id → (the step it runs, since when); for the dashboard
        self.stages: dict[int, tuple[str, float]] = {}
        #: the follow-ups running now: follow-up id → (its step, since when); watched like the jobs' stages
        self.follow_up_stages: dict[int, tuple[str, float]] = {}
        self.outputs_dir = config.node.data_dir / "outputs"
        #: runs a job that was interrupted before alone (:class:`RunIsolation`)
        self.isolation = RunIsolation()
        #: set when the process stops: a run waiting to be queued again (:meth:`_requeue`) waits no longer
        self.retry_wait = threading.Event()
        table = config.volumetry.normative_table
        self.norms = load_norms(table) if table is not None else ()
        self.follow_ups: dict[str, FollowUp] = {f.name: f for f in FOLLOW_UPS}
        #: hands a follow-up queued by a job to the executor (the node sets its executor's ``submit``); by
        #: default it runs at once, in the caller's thread, after its job
        self.submit: Callable[[Task], object] = self.perform

    def perform(self, task: Task) -> Outcome:
        """Run one task of the executor: a job, or a follow-up; returns how it ended."""
        if task.kind == "job":
            return self.run(task.id)
        return self.run_follow_up(task.id)

    def recover(self, own: str | None) -> list[Task]:
        """Queue again the runs that were interrupted (``own``'s claims, and those whose lease expired: their
        worker died), report those quarantined for it (``[jobs] max_attempts``); returns every queued task, to
        hand to the executor."""
        max_attempts = self.config.jobs.max_attempts
        resumed, quarantined = self.journal.recover_jobs(max_attempts, own=own)
        for job in quarantined:
            log.error("job %d (%s, series %s) quarantined: %s", job.id, job.rule, job.series_uid, job.reason)
            series = self.journal.series(job.series_uid)
            if series is not None:
                self.report_failure(job, series, job.reason)
        for job in resumed:
            log.info("resuming job %d (%s)%s", job.id, job.rule, f": {job.reason}" if job.reason else "")
        follow_ups, stuck = self.journal.recover_follow_ups(max_attempts, own=own)
        for follow_up in stuck:
            log.error("follow-up %s of job %d quarantined: %s", follow_up.step, follow_up.job_id, follow_up.reason)
        for follow_up in follow_ups:
            log.info("resuming follow-up %s of job %d", follow_up.step, follow_up.job_id)
        return [Task("job", j.id) for j in resumed] + [Task("follow_up", f.id) for f in follow_ups]

    def _rule(self, name: str) -> Rule:
        for rule in self.config.rules:
            if rule.name == name:
                return rule
        raise JobFailed(f"rule {name!r} is no longer configured")

    def _claim(self, task: Task) -> Claim | None:
        """Claim a queued task for this worker and keep its lease (None: another worker has it, or it is not
        queued)."""
        claim = self.journal.claim(task.kind, task.id, self.worker, self.leases.lease_s)
        if claim is None:
            log.debug("%s: not queued (done, or claimed by another worker)", task)
        else:
            self.leases.hold(task.kind, task.id, claim)
        return claim

    def run(self, job_id: int) -> Outcome:
        """Run a queued job, once it is claimed for this worker; every way it can end is recorded in the
        journal (by this run only while it holds the claim)."""
        job = self.journal.job(job_id)
        if job.state != JobState.QUEUED:
            return "skipped"
        series = self.journal.series(job.series_uid)
        if series is None:
            self.journal.set_job_state(job_id, JobState.FAILED, "series no longer in the journal")
            return "failed"
        claim = self._claim(Task("job", job_id))
        if claim is None:
            return "skipped"
        self.stages[job_id] = (WAITING, time.time())  # for the run isolation of a later attempt, maybe long
        failed: Outcome | None = None
        try:
            run = _Run(self._context(job, series, claim.attempt), {}, time.perf_counter(), claim)
            with self.isolation.of(claim.attempt):
                self._core(run)
            follow_ups = self._record(run)
        except KeyboardInterrupt:
            # only the main thread gets these (a debugging session): the job stays 'running', so
            # the next start counts it as interrupted
            log.warning("job %d (%s) interrupted during run %d", job_id, job.rule, claim.attempt)
            raise
        except BaseException as exc:  # noqa: BLE001 - a job failure must never stop the worker
            failed = self._fail(job, series, exc, claim)
        finally:  # (a stage left behind would read as a hung run: runs_progressing)
            self.stages.pop(job_id, None)
            self.leases.release("job", job_id, claim)
        if failed is not None:
            if failed == "requeued":
                self.submit(Task("job", job_id))
            return failed
        try:
            self._finish(run)
        except Exception:  # noqa: BLE001 - the timings are for the dashboard; the job is recorded
            log.exception("job %d: its timings could not be recorded", job_id)
        self.on_written()
        for follow_up_id in follow_ups:
            self.submit(Task("follow_up", follow_up_id))
        return "done"

    def _stage(self, ctx: JobContext, step: str) -> None:
        self.stages[ctx.job_id] = (step, time.time())

    def _fail(self, job: JobRecord, series: SeriesRecord, exc: BaseException, claim: Claim) -> Outcome:
        """Record why a job failed. Not only Exceptions: a Rust decoder's panic (pyo3_runtime.PanicException)
        and a library's sys.exit() are BaseExceptions; uncaught they end the worker with the job 'running'.
        A run whose claim was taken over records nothing: the run that took it over decides."""
        if isinstance(exc, ClaimLost):
            log.warning("job %d (%s): %s", job.id, job.rule, exc)
            return "lost"
        if transient(exc) and claim.attempt < self.config.jobs.max_attempts:
            return self._requeue(job, exc, claim)
        if isinstance(exc, JobFailed | GeometryError):
            reason = str(exc) if isinstance(exc, JobFailed) else f"inconsistent geometry: {exc}"
            log.error("job %d (%s, series %r) failed: %s", job.id, job.rule, series.description, reason)
        else:
            crashed = "" if isinstance(exc, Exception) else " (crashed: not an Exception)"
            log.error("job %d (%s, series %r) failed unexpectedly%s", job.id, job.rule, series.description,
                      crashed, exc_info=exc)
            reason = f"{type(exc).__name__}: {exc}{crashed}"
        try:
            self.journal.fail_job(job.id, reason, claim)
        except ClaimLost as lost:
            log.warning("job %d (%s): its failure is not recorded: %s", job.id, job.rule, lost)
            return "lost"
        self.report_failure(job, series, reason)
        return "failed"

    def _requeue(self, job: JobRecord, exc: BaseException, claim: Claim) -> Outcome:
        """A run failed for a reason outside the job (:func:`transient`): queued again, its run counted, rather
        than failed for good with a "not processed" page for a result it would have given."""
        reason = (f"run {claim.attempt} of at most {self.config.jobs.max_attempts} failed for a reason outside the "
                  f"job ({type(exc).__name__}: {exc}): queued again")
        # not at once: the condition (a locked journal, a full disk, memory) is given time to pass, in this thread
        # (it would fail the next run too); a stop ends the wait
        self.retry_wait.wait(min(TRANSIENT_RETRY_S * claim.attempt, 60.0))
        try:
            self.journal.requeue_job(job.id, reason, claim)
        except ClaimLost as lost:
            log.warning("job %d (%s): %s", job.id, job.rule, lost)
            return "lost"
        except Exception as again:  # noqa: BLE001 - its lease expires and the sweep queues it again, counted
            log.error("job %d (%s): run %d failed (%s: %s) and it cannot be queued again now (%s: %s): it is when "
                      "its lease expires", job.id, job.rule, claim.attempt, type(exc).__name__, exc,
                      type(again).__name__, again)
            return "lost"
        log.warning("job %d (%s): %s", job.id, job.rule, reason)
        return "requeued"

    def report_failure(self, job: JobRecord, series: SeriesRecord, reason: str) -> None:
        """Tell the webhooks and the reader (a "not processed" page in the study) that a job failed; also for a
        job quarantined at start-up. Never raises: the failure itself is recorded already."""
        notify("job_failed", {"job": job.id, "rule": job.rule, "version": job.version, "reason": reason,
                              "series_uid": series.series_uid, "study_uid": series.study_uid,
                              "series_description": series.description})
        if not self.config.jobs.notify_failures_in_study:
            return
        try:
            self._queue_notice(job, series, reason)
        except Exception as exc:  # noqa: BLE001 - the notice is a courtesy; the job's failure stands as recorded
            log.error("job %d: the 'not processed' notice could not be written or queued: %s: %s", job.id,
                      type(exc).__name__, exc)

    def _queue_notice(self, job: JobRecord, series: SeriesRecord, reason: str) -> None:
        rule = next((r for r in self.config.rules if r.name == job.rule), None)
        if rule is None:
            log.info("job %d: no 'not processed' notice: rule %r is no longer configured", job.id, job.rule)
            return
        destinations = self._destinations(rule)
        if not destinations:
            return
        out_dir = self.outputs_dir / f"job-{job.id:06d}"
        out_dir.mkdir(parents=True, exist_ok=True)
        output = not_processed_step(self.journal, job, series, rule, reason, out_dir, self.config.node.uid_root)
        if output is None:
            return
        self._make_durable(out_dir)
        self.journal.record_notice(job.id, [(output.written.series_instance_uid, output.kind)],
                                   outbox_items([output], destinations), files=output.files())
        log.info("job %d: a %r page with the reason is queued for %s", job.id,
                 output.written.dataset.SeriesDescription, ", ".join(destinations))
        self.on_written()

    def _make_durable(self, out_dir: Path) -> None:
        """The files written under ``out_dir`` and their folders on disk (with ``[node] fsync``) before the journal
        records them: its outbox rows must never name files a power loss emptied."""
        if self.config.node.fsync:
            sync_tree(out_dir, up_to=self.outputs_dir.parent)

    def _record(self, run: _Run) -> list[int]:
        """Record and queue the core outputs and the follow-ups they want; returns the follow-ups' ids."""
        self._stage(run.ctx, "record")
        self._make_durable(run.ctx.out_dir)
        return record_and_queue(self.journal, run.ctx, run.outputs, run.kept, self._destinations(run.ctx.rule),
                                list(self.follow_ups.values()), claim=run.claim)

    def _finish(self, run: _Run) -> None:
        run.timings["total"] = time.perf_counter() - run.started
        self.journal.set_job_timings(run.ctx.job_id, run.timings)
        if self.on_timings is not None:
            self.on_timings(dict(run.timings))
        log.info("job %d (%s) written in %.1f s: %s", run.ctx.job_id, run.ctx.rule.name, run.timings["total"],
                 ", ".join(f"{k} {v:.2f}s" for k, v in run.timings.items() if k != "total"))

    def _context(self, job: JobRecord, series: SeriesRecord, attempt: int) -> JobContext:
        rule = self._rule(job.rule)
        out_dir = self.outputs_dir / f"job-{job.id:06d}"
        if out_dir.exists() and attempt > 1:  # a run interrupted by a crash: start it over with new UIDs
            shutil.rmtree(out_dir)
        elif out_dir.exists():  # a job of an earlier journal (rebuilt, or a new one): its outputs are kept aside
            aside = out_dir.with_name(f"{out_dir.name}.earlier-{time.strftime('%Y%m%dT%H%M%S')}")
            log.warning("job %d: %s holds the outputs of an earlier journal's job %d; moved to %s (not deleted: "
                        "they may not have been delivered)", job.id, out_dir, job.id, aside.name)
            out_dir.rename(aside)
        out_dir.mkdir(parents=True)
        naming = SeriesNaming(rule.output_name, job.version, series.attributes.series_number)
        return JobContext(job.id, rule, series, naming, out_dir, self.config.node.uid_root)

    def _destinations(self, rule: Rule) -> list[str]:
        return [d.name for d in self.config.destinations_for(rule)]

    def _core(self, run: _Run) -> None:
        """load → synthesize → segment and measure → write each object (into ``run.outputs``, ``run.kept``)."""
        ctx, timings = run.ctx, run.timings
        self._stage(ctx, "load")
        with _timed(timings, "load"):
            loaded = load_step(self.journal, ctx.series)
        self._stage(ctx, "synthesize")
        images = synthesize_step(self.config, self.registry, ctx.rule, loaded, timings)
        self._stage(ctx, "measure")
        measured = measure_step(ctx, self.config, self.registry, loaded, images, timings, self.norms)
        self._stage(ctx, "write")
        # the kept volumes (NIfTI, compressed by SimpleITK without holding the GIL) are written beside the DICOM
        # objects (pydicom and highdicom, in Python), not after them
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"job-{ctx.job_id}-keep") as keeping:
            kept = keeping.submit(keep_volumes_step, ctx, images, measured)
            with _timed(timings, "write"):
                synthetic = write_t1_step(ctx, images, loaded)
            run.outputs += [] if synthetic is None else [synthetic]
            if measured.volumetry is not None:
                t1 = measured_t1(synthetic, images, loaded)  # what the SEG, SR and summary reference
                with _timed(timings, "write.volumetry"):
                    seg = write_seg_step(ctx, measured, t1)
                    run.outputs += [] if seg is None else [seg]
                    run.outputs.append(write_sr_step(ctx, measured, t1, seg, loaded))
                    run.outputs.append(write_summary_step(ctx, measured, images, t1))
            run.kept = kept.result()

    # -- follow-ups ------------------------------------------------------------------------

    def run_follow_up(self, follow_up_id: int) -> Outcome:
        """Run a queued (or interrupted) follow-up; every way it can end is recorded in the journal, and none
        changes its job's state (its outputs are the job's: the job is ``written`` again until they are sent)."""
        record = self.journal.follow_up(follow_up_id)
        if record.state != FollowUpState.QUEUED:
            return "skipped"
        claim = self._claim(Task("follow_up", follow_up_id))
        if claim is None:
            return "skipped"
        t0 = time.perf_counter()
        self.follow_up_stages[follow_up_id] = (record.step, time.time())
        try:
            follow_up, ctx = self._follow_up_context(record)
            output = follow_up.step(ctx, self.journal, self.config, self.registry)
            self._finish_follow_up(record, ctx, output, time.perf_counter() - t0, claim)
        except KeyboardInterrupt:
            raise  # the follow-up stays 'running': the next start runs it again
        except ClaimLost as lost:
            log.warning("job %d: follow-up %s: %s", record.job_id, record.step, lost)
            return "lost"
        except BaseException as exc:  # noqa: BLE001 - the job's core outputs are recorded and queued already
            log.error("job %d: follow-up %s failed, the core outputs are delivered all the same: %s: %s",
                      record.job_id, record.step, type(exc).__name__, exc, exc_info=exc)
            try:
                self.journal.fail_follow_up(follow_up_id, f"{type(exc).__name__}: {exc}", claim)
            except Exception:  # noqa: BLE001 - logged above already
                log.exception("follow-up %d: its failure could not be recorded", follow_up_id)
            return "failed"
        finally:
            self.follow_up_stages.pop(follow_up_id, None)
            self.leases.release("follow_up", follow_up_id, claim)
        return "done"

    def _follow_up_context(self, record: FollowUpRecord) -> tuple[FollowUp, FollowUpContext]:
        follow_up = self.follow_ups.get(record.step)
        if follow_up is None:
            raise JobFailed(f"no follow-up {record.step!r} in this version")
        job = self.journal.job(record.job_id)
        series = self.journal.series(job.series_uid)
        if series is None:
            raise JobFailed("series no longer in the journal")
        if job.purged_at:
            raise JobFailed("the job's outputs were deleted by retention")
        out_dir = self.outputs_dir / f"job-{job.id:06d}" / record.step
        if out_dir.exists():  # a run interrupted by a crash: start it over
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        naming = SeriesNaming(job.output_name, job.version, series.attributes.series_number)
        return follow_up, FollowUpContext(record.id, record.step, job, series, naming, out_dir,
                                          self.config.node.uid_root)

    def _finish_follow_up(self, record: FollowUpRecord, ctx: FollowUpContext, output: Output | str,
                          seconds: float, claim: Claim) -> None:
        """Record and queue a follow-up's output, to the destinations its job's outputs went to (or the note of
        why it wrote nothing)."""
        if isinstance(output, str):
            self.journal.finish_follow_up(record.id, [], [], seconds=seconds, note=output, claim=claim)
            log.info("job %d: follow-up %s: %s", record.job_id, record.step, output)
            return
        destinations = self.journal.destinations_of(record.job_id)
        self._make_durable(ctx.out_dir)
        self.journal.finish_follow_up(record.id, [(output.written.series_instance_uid, output.kind)],
                                      outbox_items([output], destinations), files=output.files(), seconds=seconds,
                                      claim=claim)
        if self.on_timings is not None:
            self.on_timings({record.step: seconds})
        log.info("job %d: follow-up %s wrote %r in %.1f s", ctx.job.id, record.step,
                 output.written.dataset.SeriesDescription, seconds)
        self.on_written()


T = TypeVar("T")


class RunIsolation:
    """Jobs run side by side (``[inference] workers``), but one that was interrupted before (its claim's attempt
    above 1) runs alone: the crash of the whole process that interrupted it may have been its own doing (a poison
    job), and each crash costs an attempt to every job running at the time. Alone, a poison job that crashes the
    process again costs no innocent job beside it an attempt, so none is quarantined with it. A job waiting to
    run alone goes before those that would start after it (it is not starved)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._side_by_side = 0  # jobs running with others
        self._alone = False  # a job runs alone
        self._waiting_alone = 0

    @contextmanager
    def of(self, attempt: int) -> Iterator[None]:
        """Inside: the run of a job at its ``attempt``-th claim."""
        with self._changed:
            if attempt > 1:
                self._waiting_alone += 1
                self._changed.wait_for(lambda: not self._alone and not self._side_by_side)
                self._waiting_alone -= 1
                self._alone = True
            else:
                self._changed.wait_for(lambda: not self._alone and not self._waiting_alone)
                self._side_by_side += 1
        try:
            yield
        finally:
            with self._changed:
                if attempt > 1:
                    self._alone = False
                else:
                    self._side_by_side -= 1
                self._changed.notify_all()


class ThreadExecutor(Generic[T]):
    """In-process workers pulling tasks (a :class:`Task`, or a job id) from a queue."""

    def __init__(self, run: Callable[[T], object], workers: int = 1) -> None:
        self._run = run
        self._queue: queue.Queue[T | None] = queue.Queue()
        #: the tasks submitted and not yet ended (waiting or running), with how many times each
        self._held: Counter[T] = Counter()
        self._held_lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, name=f"job-worker-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, task: T) -> None:
        with self._held_lock:
            self._held[task] += 1
        self._queue.put(task)

    def holds(self, task: T) -> bool:
        """Whether ``task`` waits in the queue or runs now."""
        with self._held_lock:
            return self._held[task] > 0

    def _loop(self) -> None:
        while True:
            task = self._queue.get()
            if task is None or self._stopping.is_set():
                return  # a task not started stays queued in the journal: the next start runs it
            try:
                self._run(task)
            except BaseException:  # noqa: BLE001 - keep the worker alive, whatever the job raised
                # (JobRunner.run records the failure; this is the last line of defence, and the
                # only way out of this loop is shutdown's None; a task still queued in the journal is
                # handed again by the node's sweep: resubmit_dropped)
                log.exception("%s crashed its worker", task if isinstance(task, Task) else f"job {task}")
            finally:
                with self._held_lock:
                    self._held[task] -= 1
                    if self._held[task] <= 0:
                        del self._held[task]

    def shutdown(self, timeout_s: float = 30.0) -> bool:
        """Start nothing more; wait up to ``timeout_s`` in all for the tasks running now. True when every thread
        ended; False when a task still runs (the caller must not close what it uses)."""
        self._stopping.set()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)


def transient(exc: BaseException) -> bool:
    """Whether a run failed for a reason outside its job, that may be gone at its next run: the journal could not
    be used (locked past its busy timeout, its server gone), memory or disk space ran out. Such a run is queued
    again (``[jobs] max_attempts``) rather than failed for good. (Not a ProgrammingError: a fault of the code.)"""
    unavailable = tuple(e for e in unavailable_errors() if not issubclass(e, sqlite3.ProgrammingError))
    if isinstance(exc, (MemoryError, *unavailable)):
        return True
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    # SimpleITK's writers raise RuntimeError with the system's message
    return isinstance(exc, RuntimeError) and "No space left on device" in str(exc)


def resubmit_dropped(journal: Journal, executor: ThreadExecutor[Task], queued_before: float) -> list[Task]:
    """Hand ``executor`` again the journal's queued jobs and follow-ups, queued since before ``queued_before``, that
    none of its threads holds: a thread took the task off the queue and lost it to an error outside the run's
    recorded failures (a transient journal error reading or claiming it, or after its job's outputs were recorded,
    before the follow-ups were submitted). Only the start-up recovery and an expired claim would queue it again,
    and ``request_reprocess`` skips a series with a queued job: without this it stays queued for good. The journal
    is the queue, as for worker processes (``Journal.next_queued``); a task handed twice runs once (its claim).
    Returns the tasks handed again."""
    dropped = [task for kind, task_id in journal.queued_before(queued_before)
               if not executor.holds(task := Task("job" if kind == "job" else "follow_up", task_id))]
    for task in dropped:
        log.warning("%s is queued in the journal but no worker thread holds it (lost to an error): submitted again",
                    task)
        executor.submit(task)
    return dropped


class JournalQueue:
    """The executor of a receiver (``serve --role receiver``) with ``[executor] kind = "thread"``: the journal is
    the queue. A job or follow-up is queued there when it is recorded; worker processes claim it
    (``Journal.claim``), so ``submit`` has nothing to do. (With ``kind = "celery"`` the receiver's executor is
    :class:`dicom_node.celery_app.CeleryExecutor`, which publishes the task: the claim keeps it once.)"""

    def submit(self, task: Task) -> None:
        log.debug("%s queued in the journal for a worker process", task)

    def shutdown(self) -> bool:
        return True
