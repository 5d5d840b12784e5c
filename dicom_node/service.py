"""The node as a service: wires SCP, journal, assembly, routing, jobs and dispatch; owns start/stop.

Start-up also recovers from a crash: jobs (and follow-ups, a job's optional steps) that were queued are run
again, those that were running are run again while under ``jobs.max_attempts`` (else quarantined as failed;
a follow-up's failure is noted beside its job's state and costs nothing else), series that
were closed but not yet routed are routed, the outbox is resumed, and series still receiving close
on their idle timeout as usual. The periodic sweep also routes ``complete`` series, which is how a
``reprocess`` request (``Journal.request_reprocess``, from the CLI with the node running or not, or
:meth:`Node.reprocess`) is picked up. A retention sweep that a crash interrupted is finished
(``dicom_node.retention``), then the sweep runs every ``[retention] sweep_interval_s``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler

from inference.models import ModelRegistry

from . import systemd, writers
from .assembly import completeness
from .audit import AuditTrail
from .config import NodeConfig
from .disk import DiskState
from .dispatch import Dispatcher
from .exporter import NodeMetrics
from .health import Check, Health, check_disk, check_dispatcher, check_journal, check_receipts, check_runs
from .httpd import ActionError, NodeHTTPServer
from .jobs import JobRunner, JournalQueue, Task, ThreadExecutor, resubmit_dropped
from .journal import NODE_WORKER, OutboxState, SeriesState, open_journal
from .lock import processes
from .notify import Notifier, install, notify
from .rebuild import unknown_files
from .receipts import LogStatus, ReceiptLog
from .retention import Retention
from .routing import route
from .scp import StorageSCP
from .spool import Spool, private_dir

if TYPE_CHECKING:
    from .celery_app import CeleryExecutor

log = logging.getLogger(__name__)

#: What one ``dicom-node serve`` process does (``--role``): ``all`` (the default: everything, one process),
#: ``receiver`` (SCP, assembly, routing into the journal's queue, delivery, retention; jobs are left to worker
#: processes; several may share a data directory or journal), ``worker`` (claims and runs queued jobs and
#: follow-ups: :mod:`dicom_node.worker`) or ``dispatcher`` (delivers the outbox: :mod:`dicom_node.delivery`).
ROLES = ("all", "receiver", "worker", "dispatcher")


def prepare_models(config: NodeConfig, registry: ModelRegistry, *, warm: bool) -> set[str]:
    """The models installed and usable (a segmenter that is not a segmentation model is not); with ``warm``, the
    sessions of those the rules need are loaded now, so that the first series does not pay for them."""
    available = registry.available()
    installed = set(available)
    segmenter = config.inference.segmenter
    if segmenter in available and available[segmenter].task != "segmentation":
        log.error("[inference] segmenter %r is a %s model, not a segmentation model: volumetry disabled",
                  segmenter, available[segmenter].task)
        installed.discard(segmenter)
    log.info("models installed in %s: %s", config.inference.models_dir, ", ".join(sorted(installed)) or "none")
    needed: set[str] = set()
    for rule in config.rules:
        models = config.models_for(rule)
        missing = [m for m in models if m not in installed]
        if missing:
            log.warning("rule %r disabled: model %r is not installed in %s; its series are stored, "
                        "not processed", rule.name, missing[0], config.inference.models_dir)
        else:
            needed.update(models)
    for model_id in sorted(needed) if warm else ():
        loaded = registry.session(model_id)
        log.info("model %s %s ready on %s", model_id, loaded.manifest.version, loaded.provider)
    if warm and needed:
        writers.warm_up()  # the DICOM writers' tables too, so that the first job does not load them
    return installed


class Node:
    def __init__(self, config: NodeConfig, role: str = "all") -> None:
        self.config = config
        #: "all" runs the jobs in process; "receiver" leaves them queued in the journal for worker processes
        self.role = role
        data_dir = config.node.data_dir
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if private_dir(data_dir):
            log.warning("data directory %s was readable by other users: now 0700 (it holds patient data)", data_dir)
        (data_dir / "outputs").mkdir(mode=0o700, exist_ok=True)
        private_dir(data_dir / "outputs")
        self.journal = open_journal(config)
        #: The id this process's runs and deliveries are claimed under. The ``all`` node of a SQLite journal is the
        #: only one of its data directory (node.lock, exclusive): ``NODE_WORKER``, and at start-up it takes its
        #: interrupted runs and outbox claims back at once. Any other (a receiver, which may share the directory,
        #: or a node on a shared PostgreSQL journal): ``<role>@<host>:<pid>``, its claims taken over by the others
        #: when their lease expires.
        self.shared_journal = config.journal.backend != "sqlite"
        own = role == "all" and not self.shared_journal
        self.claim_id = NODE_WORKER if own else f"{role}@{socket.gethostname()}:{os.getpid()}"
        self.spool = Spool(data_dir / "spool", fsync=config.node.fsync)
        self.registry = ModelRegistry(
            config.inference.models_dir, providers=config.inference.providers, threads=config.inference.threads
        )
        self.installed_models: set[str] = set()
        self.audit = AuditTrail(config.audit_path(), config.node.ae_title)
        #: received objects are durable here before Success, each with one sync (``[node] fsync``, ``receipt_log``)
        logged = config.node.fsync and config.node.receipt_log
        self.metrics = NodeMetrics(self.journal, data_dir, lambda: [d.name for d in config.destinations],
                                   health=self.health, receipts=self._receipt_report if logged else None)
        self.dispatcher = Dispatcher(config, self.journal, self.audit, worker=self.claim_id)
        self.runner = JobRunner(config, self.journal, self.registry, on_written=self.kick_dispatch,
                                on_timings=self.metrics.observe_job, worker=self.claim_id)
        self.executor: ThreadExecutor[Task] | JournalQueue | CeleryExecutor | None = None
        self.scheduler = BackgroundScheduler(daemon=True)
        self.receipts = (ReceiptLog(data_dir / "receipts", self.journal.sync, epoch=self.journal.connection_epoch)
                         if logged else None)
        self.scp = StorageSCP(config, self.spool, self.journal, on_released=self.on_released, audit=self.audit,
                              on_store_status=self.metrics.store_status, receipts=self.receipts)
        self.http = NodeHTTPServer(config.http, self) if config.http.port else None
        self.notifier = Notifier(config.notifications, node=config.node.ae_title)
        #: the disk watermark of the SCP: ``disk.state()`` (free bytes, refusing or not) for /health and metrics
        self.disk = self.scp.disk
        self.disk.listeners.append(self._disk_changed)
        self.retention = Retention(config, self.journal)
        # held while a series is closed and routed, so that the sweep never routes one twice
        self._close_lock = threading.Lock()
        self._scan_lock = threading.Lock()
        self._outbox_scans = 0  # outbox scans running now
        self._outbox_scan_started: float | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self.http is not None:
            self.http.start()  # first: a taken port stops the start before the models load
        try:
            self._start()
        except BaseException:
            if self.http is not None:
                self.http.stop()
            raise

    def _start(self) -> None:
        install(self.notifier.start())
        # a receiver routes by the models installed (the workers, on this machine, read the same folder)
        self.installed_models = prepare_models(self.config, self.registry, warm=self.role == "all")
        if self.role == "all":
            self.executor = ThreadExecutor(self.runner.perform, workers=self.config.inference.workers)
        elif self.config.executor.kind == "celery":
            from .celery_app import CeleryExecutor  # the scale extra: imported only when configured

            self.executor = CeleryExecutor(self.config, self.journal)
        else:
            self.executor = JournalQueue()
            log.info("role receiver: jobs are queued in the journal for worker processes "
                     "(`dicom-node serve --role worker`)")
        self.runner.submit = self.executor.submit  # a job's follow-ups are tasks of their own
        self._finish_purge()
        self.scp.replay_receipts()  # before the spool check: what it files again is then known
        self._check_spool()
        self._recover(own=NODE_WORKER if self.claim_id == NODE_WORKER else None)
        self.scheduler.add_job(self.sweep, "interval", seconds=self.config.node.sweep_interval_s,
                               id="idle-sweep", max_instances=1, coalesce=True)
        self.scheduler.add_job(self._scan_outbox, "interval", seconds=self.config.dispatch.scan_interval_s,
                               id="outbox", max_instances=1, coalesce=True)
        retention = self.config.retention
        if retention.enabled:
            first = datetime.now() + timedelta(seconds=min(60.0, retention.sweep_interval_s))
            self.scheduler.add_job(self.retention_sweep, "interval", seconds=retention.sweep_interval_s,
                                   id="retention", max_instances=1, coalesce=True, next_run_time=first)
            log.info("retention: series deleted %g day(s) after delivery, %g day(s) after their last instance when "
                     "not processed", retention.delivered_days, retention.not_processed_days)
        else:
            log.info("retention disabled ([retention] enabled = false): received instances and outputs are kept")
        watchdog = systemd.watchdog_interval_s()
        if watchdog is not None:
            self.scheduler.add_job(self.feed_watchdog, "interval", seconds=watchdog, id="watchdog",
                                   max_instances=1, coalesce=True)
        self.scheduler.start()
        self.scp.start()
        self.kick_dispatch()  # the first scan now, not an interval later
        if systemd.notify(f"READY=1\nSTATUS=listening as {self.config.node.ae_title} on port {self.scp.port}"):
            log.info("systemd notified: ready%s", f", watchdog every {watchdog:g} s" if watchdog else "")

    def stop(self) -> None:
        systemd.notify("STOPPING=1")
        self.scp.stop()
        self.dispatcher.stop()  # the objects under way are finished; the rest waits for the next start
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        if self.receipts is not None:  # after the sweeps, which settle and replay too
            self.receipts.shutdown()
        self.runner.retry_wait.set()  # a run waiting to be queued again stops waiting
        clean = self.executor.shutdown() if self.executor is not None else True
        self.runner.leases.stop()
        if self.http is not None:
            self.http.stop()
        install(None)
        self.notifier.stop()
        if not clean:  # a run goes on past the wait: its journal and audit trail stay open for the process's exit
            log.warning("a job still runs after the 30 s wait: it is run again as an interrupted run ([jobs] "
                        "max_attempts), at the next start or, on a shared journal, when its lease expires")
            return
        self.journal.close()
        self.audit.close()

    def _finish_purge(self) -> None:
        """Delete what a retention sweep interrupted by a stop or crash had decided to delete."""
        try:
            done = self.retention.finish_pending()
        except Exception:  # noqa: BLE001 - the files stay recorded; the next sweep deletes them
            log.exception("retention: finishing an interrupted sweep failed; the next sweep tries again")
            return
        if done.files:
            log.info("retention: finished an interrupted sweep: %d file(s) deleted", done.files)

    def retention_sweep(self) -> None:
        """The periodic retention sweep (``[retention]``); a failure is logged and the next sweep tries again."""
        try:
            self.retention.sweep()
        except Exception:  # noqa: BLE001 - what was decided stays recorded (purge_files) for the next sweep
            log.exception("retention sweep failed; the next sweep (in %.0f s) finishes it",
                          self.config.retention.sweep_interval_s)

    # -- health, metrics, watchdog -----------------------------------------------------------

    def _scan_outbox(self) -> None:
        """The dispatcher's scan of the outbox, timed for the health check."""
        with self._scan_lock:
            self._outbox_scans += 1
            self._outbox_scan_started = time.time()
        try:
            self.dispatcher.send_due()
        finally:
            with self._scan_lock:
                self._outbox_scans -= 1

    def disk_watermark_bytes(self) -> int:
        """Free space below which the data directory's disk counts as low (health check): the SCP's refusal
        watermark (``[limits] min_free_mb``), and at least one object of the largest size the SCP accepts
        (``[limits] max_object_mb``), which may not fit any more."""
        return max(self.disk.min_free, int(self.config.limits.max_object_mb * 2**20))

    def _disk_changed(self, state: DiskState) -> None:
        """The disk guard started or stopped refusing: tell the webhooks that want ``disk_low``."""
        if state.refusing:
            notify("disk_low", {"path": state.path, "free_mb": max(state.free_bytes, 0) // 2**20,
                                "min_free_mb": state.min_free_bytes // 2**20,
                                "resume_free_mb": state.resume_free_bytes // 2**20})

    def health(self) -> Health:
        """The health checks (``/health``, the watchdog, ``dicom_node_health_check``)."""
        node = self.config.node
        port = f"{node.host}:{self.scp.port}" + (f" and TLS port {self.scp.tls_port}" if self.config.tls.port else "")
        checks = {
            "scp_listening": Check(True, f"listening on {port}") if self.scp.listening
            else Check(False, f"not listening on {port}"),
            "journal_writable": check_journal(self.journal.probe_write),
            "disk_space": check_disk(node.data_dir, self.disk_watermark_bytes()) if not self.disk.state().refusing
            else Check(False, f"refusing C-STOREs until {self.disk.resume_free // 2**20} MB are free in "
                              f"{node.data_dir}"),
            "dispatcher_alive": check_dispatcher(
                scheduler_running=self.scheduler.running, last_scan_started=self._outbox_scan_started,
                scanning=self._outbox_scans > 0, interval_s=self.config.dispatch.scan_interval_s),
        }
        if self.receipts is not None:
            checks["receipt_log"] = self._receipt_check()
        checks["runs_progressing"] = check_runs(self.runner.stages, self.config.jobs.max_stage_s,
                                                follow_ups=self.runner.follow_up_stages)
        return Health(checks, time.time())

    def _receipt_check(self) -> Check:
        assert self.receipts is not None
        try:
            status = self.receipts.status()
        except OSError as exc:  # its directory cannot be read: a failed check, not a failed /health
            return Check(False, f"cannot read the receipt log's directory: {exc.strerror or exc}")
        return check_receipts(status, self.scp.replay_error)

    def _receipt_report(self) -> tuple[LogStatus, int]:
        """The receipt log's status and the objects replays filed again (``/metrics``)."""
        assert self.receipts is not None
        return self.receipts.status(), self.scp.replayed_objects

    def feed_watchdog(self) -> None:
        """``WATCHDOG=1`` to systemd while the checks a restart could cure pass; otherwise nothing (systemd
        restarts the node after ``WatchdogSec``) and a warning that says which check fails."""
        health = self.health()
        if health.live:
            systemd.notify("WATCHDOG=1")
        else:
            log.warning("not feeding the systemd watchdog: %s", "; ".join(health.failed()))

    def metrics_exposition(self) -> bytes:
        return self.metrics.exposition()

    def job_stages(self) -> Mapping[int, tuple[str, float]]:
        return dict(self.runner.stages)

    def processes(self) -> list[dict[str, object]]:
        """Every serving process of this data directory (this one, other receivers, workers), for the dashboard."""
        return processes(self.config.node.data_dir)

    # -- operator actions (dashboard) ---------------------------------------------------------

    def retry_deliveries(self, job_id: int, by: str = "") -> str:
        """Queue a job's deliveries that failed for good again, and send them now (``by``: who asked, for the
        audit trail)."""
        try:
            job = self.journal.job(job_id)
        except KeyError:
            raise ActionError(f"there is no job {job_id}") from None
        n = self.journal.retry_failed(job_id=job.id)
        if not n:
            raise ActionError(f"job {job_id} has no delivery that failed for good")
        self.audit.record("operator", action="retry", by=by, job=job_id, items=n)
        self.kick_dispatch()
        return f"job {job_id}: {n} delivery item(s) queued again"

    def reprocess_series(self, series_uid: str, by: str = "") -> str:
        """Route a stored series again with the current rules, as a new version (new outputs, new UIDs), now;
        ``by``: who asked, for the audit trail."""
        series = self.journal.series(series_uid)
        if series is None:
            raise ActionError(f"series {series_uid} is not in the journal")
        if not self.reprocess(series_uid=series_uid, by=by):
            raise ActionError(f"series {series_uid} ({series.state}) cannot be reprocessed now: still receiving, "
                              "being routed, a job queued or running, its instances deleted by retention, or an "
                              "output of this node")
        series = self.journal.series(series_uid)
        assert series is not None
        if series.state == SeriesState.IGNORED:
            return f"series {series_uid} version {series.version}: not processed: {series.note}"
        if series.state == SeriesState.COMPLETE:
            return f"series {series_uid} version {series.version}: marked, routed at the next sweep"
        job = [j for j in self.journal.jobs_in_study(series.study_uid) if j.series_uid == series_uid][-1]
        return f"series {series_uid} version {series.version}: job {job.id} ({job.rule}) queued"

    def _check_spool(self) -> None:
        """Warn when the spool holds objects the journal does not know (a lost or replaced journal)."""
        unknown = unknown_files(self.journal, self.spool.root)
        others = [p for p in processes(self.config.node.data_dir) if p.get("role") == "receiver"
                  and (p.get("pid"), p.get("host")) != (os.getpid(), socket.gethostname())]
        if unknown and others:  # another receiver's instances being filed now look unknown for an instant
            log.info("the spool holds %d file(s) the journal does not know yet (other receivers are running: "
                     "instances they are filing, or files a lost journal forgot; `dicom-node journal rebuild` with "
                     "every process stopped adds the latter)", len(unknown))
        elif unknown:
            log.warning("the spool holds %d file(s) the journal %s does not know (e.g. %s): they are not processed; "
                        "stop the node and run `dicom-node journal rebuild` to add them", len(unknown),
                        self.journal.path, unknown[0])

    def _recover(self, own: str | None, *, starting: bool = True) -> None:
        """Queue again what was interrupted: at start-up (``own``: the node's own claims, taken back at once, and
        expired ones), and on each sweep that finds an expired claim (``starting=False``: a worker process died)."""
        assert self.executor is not None
        for task in self.runner.recover(own):
            self.executor.submit(task)
        if not starting:
            return
        if own == NODE_WORKER:
            self.dispatcher.take_back()  # its deliveries interrupted by the stop or crash: due now, not after a lease
        self.route_complete()  # closed before a stop but not routed, or marked for reprocessing
        pending = self.journal.counts()["outbox"].get(OutboxState.PENDING, 0)
        if pending:
            log.info("outbox: %d object(s) still to deliver", pending)
            self.kick_dispatch()

    def kick_dispatch(self) -> None:
        """Send what is due now rather than at the next scan."""
        if self.scheduler.running:
            self.scheduler.add_job(self._scan_outbox, id="outbox-now", replace_existing=True)

    # -- series completion -----------------------------------------------------------------

    def on_released(self, series_uids: Iterable[str]) -> None:
        """An association was released: each of its series still receiving is looked at ``[node]
        release_grace_s`` later (:meth:`_close_if_whole`), and closed then if it is whole and received nothing
        meanwhile. One look per series however many associations end within the grace: a sender that opens an
        association per image would otherwise have its whole series checked again at every release (the n-th
        release reading n headers)."""
        for uid in series_uids:
            try:
                series = self.journal.series(uid)
                if series is None or series.state != SeriesState.RECEIVING:
                    continue
                self._after_grace(uid, series.last_received)
            except Exception:  # noqa: BLE001 - one series must not keep the others open; it closes when idle
                log.exception("series %s: cannot schedule the look at it after its release; it closes on its idle "
                              "timeout", uid)

    def _after_grace(self, series_uid: str, last_received: float) -> None:
        """:meth:`_close_if_whole` ``[node] release_grace_s`` from now (at once with no grace); a later release of
        the same series puts it off again."""
        grace = self.config.node.release_grace_s
        if grace <= 0 or not self.scheduler.running:
            self._close_if_whole(series_uid, last_received)
            return
        self.scheduler.add_job(self._close_if_whole, "date", run_date=datetime.now() + timedelta(seconds=grace),
                               args=[series_uid, last_received], id=f"close-{series_uid}", replace_existing=True,
                               misfire_grace_time=None,  # however late the scheduler gets to it
                               # a look still running when the next is due must not make the scheduler skip that
                               # one (harmless: each is a no-op once anything came after its release)
                               max_instances=4)

    def _close_if_whole(self, series_uid: str, last_received: float) -> None:
        """Close a series released with its last instance received at ``last_received`` if nothing came since
        (the next part of a series split over associations) and it is whole; otherwise it waits for its next
        release or its idle timeout."""
        try:
            series = self.journal.series(series_uid)
            if series is None or series.state != SeriesState.RECEIVING or series.last_received != last_received:
                return  # closed meanwhile, or more came (its association's release looks again)
            verdict = completeness(self.journal.instances(series_uid))
            if not verdict.whole:
                log.info("series %r (%s) not whole yet (%s): waiting up to %.0f s", series.description,
                         series_uid, verdict.reason, self.config.node.idle_timeout_s)
                return
            log.info("series %r (%s) is whole: %s", series.description, series_uid, verdict.reason)
            self._close(series_uid, last_received)
        except Exception:  # noqa: BLE001 - it closes on its idle timeout instead
            log.exception("series %s: cannot tell whether it is whole, or closing it failed; it closes on its idle "
                          "timeout", series_uid)

    def sweep(self) -> None:
        """Close series that received nothing for ``idle_timeout_s``, whole or not; route ``complete`` ones (a
        reprocess request); queue again the runs whose claim expired (a worker process died), and hand the in-process
        executor again the queued tasks it lost (``jobs.resubmit_dropped``)."""
        if self.receipts is not None:
            self.receipts.settle_idle()  # an association kept open: what it sent is settled all the same
            self.scp.replay_receipts()  # segments of a receiver that died beside this one (shared data_dir)
        if self.journal.expired_claims():
            self._recover(own=None, starting=False)
        if isinstance(self.executor, ThreadExecutor):  # (worker processes poll the journal themselves)
            resubmit_dropped(self.journal, self.executor, time.time() - self.config.node.sweep_interval_s)
        self.route_complete()
        cutoff = time.time() - self.config.node.idle_timeout_s
        for series in self.journal.series_in_state(SeriesState.RECEIVING, idle_before=cutoff):
            try:
                verdict = completeness(self.journal.instances(series.series_uid))
                whole, reason = verdict.whole, verdict.reason
            except Exception as exc:  # noqa: BLE001 - closed all the same: its job fails with the reason
                log.exception("series %s: cannot tell whether it is whole", series.series_uid)
                whole, reason = False, f"cannot tell whether it is whole: {exc}"
            log.log(logging.INFO if whole else logging.WARNING, "series %r (%s) closed on idle timeout: %s",
                    series.description, series.series_uid, reason)
            try:
                self._close(series.series_uid, series.last_received)
            except Exception:  # noqa: BLE001 - one series must not stop the sweep of the others
                log.exception("series %s: closing it failed; the next sweep tries again", series.series_uid)

    def _close(self, series_uid: str, last_received: float) -> None:
        with self._close_lock:
            version = self.journal.close_series(series_uid, expected_last_received=last_received)
            if version is not None:
                self._route(series_uid, version)

    def route_complete(self) -> list[str]:
        """Route every ``complete`` series (closed, or marked for reprocessing) with the current rules; returns
        their UIDs. One that fails to route stays ``complete`` and is tried again on the next sweep."""
        routed = []
        for series in self.journal.series_in_state(SeriesState.COMPLETE):
            try:
                with self._close_lock:
                    current = self.journal.series(series.series_uid)
                    if current is None or current.state != SeriesState.COMPLETE:
                        continue  # routed meanwhile (closed by an association's release)
                    self._route(current.series_uid, current.version)
                routed.append(series.series_uid)
            except Exception:  # noqa: BLE001 - one series must not keep the others from being routed
                log.exception("series %s: routing failed; the next sweep tries again", series.series_uid)
        return routed

    def reprocess(self, *, series_uid: str | None = None, study_uid: str | None = None,
                  patient_id: str | None = None, by: str = "") -> list[str]:
        """Route stored series again with the current rules, as a new version (one selector: a series, a study,
        or a PatientID); returns the UIDs of the series marked. The node's own outputs, series still receiving
        and series with a job queued or running are left alone (``Journal.request_reprocess``)."""
        marked = self.journal.request_reprocess(series_uid=series_uid, study_uid=study_uid, patient_id=patient_id)
        self.audit.record("operator", action="reprocess", by=by, series_uid=series_uid, study_uid=study_uid,
                          patient_id=patient_id, series=marked)
        log.info("reprocess requested for %d series%s", len(marked), f": {', '.join(marked)}" if marked else "")
        if marked and self.executor is not None:
            self.route_complete()
        return marked

    def _route(self, series_uid: str, version: int) -> None:
        series = self.journal.series(series_uid)
        assert series is not None
        decision = route(
            self.config, series.attributes, series_uid, calling_ae=series.calling_ae,
            installed_models=self.installed_models, is_produced=self.journal.is_produced,
        )
        if decision.rule is None:
            if self.journal.ignore_series(series_uid, version, decision.reason):
                log.info("series %r (%s): %s", series.description, series_uid, decision.reason)
            return
        rule = decision.rule
        job_id = self.journal.route_series(series_uid, version, rule=rule.name, action=rule.action, model=rule.model)
        if job_id is None:  # routed meanwhile (by another receiver of this journal), or reopened by a late instance
            log.debug("series %s version %d: no longer complete at this version; not routed here", series_uid,
                      version)
            return
        log.info("series %r (%s) version %d: %s → job %d", series.description, series_uid, version,
                 decision.reason, job_id)
        assert self.executor is not None
        self.executor.submit(Task("job", job_id))
