"""A dispatcher process (``dicom-node serve --role dispatcher``): delivers the journal's outbox, nothing else (no
listener, no jobs, no retention).

Receivers (and an ``all`` node) deliver too; a dispatcher adds delivery capacity, or delivers from another
machine that reaches the PACS. Any number of them share the outbox: each scan claims the due items of one
destination at a time (:meth:`dicom_node.journal.Journal.claim_outbox`) under this process's own id, sends them
(:class:`dicom_node.dispatch.Dispatcher`) while a timer renews the claim, and records each outcome fenced by
the claim; the items of a dispatcher that died are taken over once its lease (``[dispatch] lease_s``) expires.
"""

from __future__ import annotations

import logging

from apscheduler.schedulers.background import BackgroundScheduler

from . import systemd
from .audit import AuditTrail
from .config import NodeConfig
from .dispatch import Dispatcher, dispatcher_id
from .journal import open_journal

log = logging.getLogger(__name__)


class DeliveryProcess:
    """The dispatcher role: the outbox scanned every ``[dispatch] scan_interval_s`` and what is due delivered."""

    def __init__(self, config: NodeConfig, worker: str | None = None) -> None:
        self.config = config
        self.id = worker or dispatcher_id()
        self.journal = open_journal(config)
        self.audit = AuditTrail(config.audit_path(), config.node.ae_title)
        self.dispatcher = Dispatcher(config, self.journal, self.audit, worker=self.id)
        self.scheduler = BackgroundScheduler(daemon=True)

    def start(self) -> None:
        self.scheduler.add_job(self.scan, "interval", seconds=self.config.dispatch.scan_interval_s, id="outbox",
                               max_instances=1, coalesce=True)
        watchdog = systemd.watchdog_interval_s()
        if watchdog is not None:
            self.scheduler.add_job(self.feed_watchdog, "interval", seconds=watchdog, id="watchdog",
                                   max_instances=1, coalesce=True)
        self.scheduler.start()
        self.scheduler.add_job(self.scan, id="outbox-now")  # the first scan now, not an interval later
        systemd.notify(f"READY=1\nSTATUS=delivering as {self.id}")

    def scan(self) -> None:
        """One scan of the outbox; a failure is logged and the next scan tries again."""
        try:
            self.dispatcher.send_due()
        except Exception:  # noqa: BLE001 - the items stay pending (their claims expire); the next scan retries
            log.exception("outbox scan failed; the next one (in %.0f s) tries again",
                          self.config.dispatch.scan_interval_s)

    def feed_watchdog(self) -> None:
        """``WATCHDOG=1`` while the journal takes writes; otherwise systemd restarts the process."""
        try:
            self.journal.probe_write()
        except Exception as exc:  # noqa: BLE001 - told to systemd by not feeding it
            log.warning("not feeding the systemd watchdog: the journal cannot be written: %s", exc)
            return
        systemd.notify("WATCHDOG=1")

    def stop(self) -> None:
        systemd.notify("STOPPING=1")
        self.dispatcher.stop()  # the objects under way are finished; the rest waits for the next start
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)  # a scan under way finishes (its claim is released at its end)
        self.journal.close()
        self.audit.close()
