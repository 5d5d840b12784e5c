"""Leases: a worker keeps its claims on the runs it holds alive while they run.

A job or follow-up is claimed by one worker (``Journal.claim``) with a lease of ``[jobs] lease_s``. One thread per
process renews every claim it holds every third of that, so a claim outlives its lease only when its process died
or stalled that long; then another worker takes the run over (``Journal.recover_jobs`` with the lease expired),
and the stalled run's end is refused by the journal's fence (``Journal.ClaimLost``), never recorded twice.
"""

from __future__ import annotations

import logging
import threading

from .journal import Claim, Journal

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews the leases of the claims this process holds; ``hold``/``release`` around each run."""

    def __init__(self, journal: Journal, lease_s: float) -> None:
        self.journal = journal
        self.lease_s = lease_s
        self._held: dict[tuple[str, int], Claim] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, kind: str, task_id: int, claim: Claim) -> None:
        with self._lock:
            self._held[(kind, task_id)] = claim
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)
                self._thread.start()

    def release(self, kind: str, task_id: int, claim: Claim | None = None) -> None:
        """Stop renewing the claim on a task; with ``claim``, only that one: a run of this process whose claim was
        taken over by a later run of the same process must not end that run's renewals."""
        with self._lock:
            if claim is None or self._held.get((kind, task_id)) == claim:
                self._held.pop((kind, task_id), None)

    def renew_all(self) -> None:
        """Extend every held claim's lease; a claim no longer held (taken over) is logged and forgotten."""
        with self._lock:
            held = list(self._held.items())
        for (kind, task_id), claim in held:
            try:
                kept = self.journal.renew(kind, task_id, claim, self.lease_s)
            except Exception:  # noqa: BLE001 - the next round tries again, within the lease
                log.exception("%s %d: its lease could not be renewed", kind, task_id)
                continue
            if not kept:
                log.warning("%s %d: run %d's claim was taken over by another worker (its lease expired): this "
                            "run's result will not be recorded", kind.replace("_", "-"), task_id, claim.attempt)
                self.release(kind, task_id, claim)

    def _loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            self.renew_all()

    def stop(self) -> None:
        self._stop.set()
