"""Dispatch: C-STORE SCU from the journal's outbox to the destinations, with retries and backoff.

Items are sent per destination over one association; each item's outcome is written to the
journal right after its response (one small transaction each), so a restart, even after SIGKILL in
the middle of an association, resumes exactly what was not yet acknowledged: delivery is
at-least-once, and duplicate-free except for the one object whose response was in flight.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from .config import Destination, DispatchSettings, NodeConfig
from .journal import Journal, OutboxItem
from .scp import set_nodelay

log = logging.getLogger(__name__)

_SUCCESS_OR_WARNING = {0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007}


@dataclass(frozen=True)
class RetryPolicy:
    """When to try an undelivered item again: capped exponential backoff, for ``retry_for_s`` after the
    first failed try (and at most ``max_tries`` tries when set); then the item fails for good."""

    backoff_initial_s: float
    backoff_max_s: float
    retry_for_s: float | None = None
    max_tries: int | None = None

    @classmethod
    def from_settings(cls, settings: DispatchSettings) -> RetryPolicy:
        return cls(backoff_initial_s=settings.backoff_initial_s, backoff_max_s=settings.backoff_max_s,
                   retry_for_s=settings.retry_for_s, max_tries=settings.max_tries)

    def next_attempt(self, tries: int, first_failed_at: float, now: float) -> float | None:
        """The time of the next try after ``tries`` failed ones, or None: give up."""
        if self.max_tries is not None and tries >= self.max_tries:
            return None
        if self.retry_for_s is not None and now - first_failed_at >= self.retry_for_s:
            return None
        return now + min(self.backoff_max_s, self.backoff_initial_s * 2 ** min(tries - 1, 64))


def _nodelay_handler(event: evt.Event) -> None:
    set_nodelay(event.assoc.dul.socket.socket if event.assoc.dul.socket else None)


def _make_ae(config: NodeConfig, dest: Destination) -> AE:
    ae = AE(ae_title=dest.calling_ae_title or config.node.ae_title)
    ae.maximum_pdu_size = config.dispatch.max_pdu_size
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = config.dispatch.timeout_s
    ae.connection_timeout = config.dispatch.timeout_s
    return ae


def _associate(ae: AE, dest: Destination) -> tuple[Association, bool]:
    """Request an association; (association, whether the TCP connection was made)."""
    connected = threading.Event()

    def on_open(event: evt.Event) -> None:
        connected.set()
        _nodelay_handler(event)

    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
    return assoc, connected.is_set()


def echo(config: NodeConfig, dest: Destination) -> tuple[bool, str]:
    """C-ECHO a destination; (ok, message)."""
    ae = _make_ae(config, dest)
    ae.add_requested_context(Verification)
    assoc, connected = _associate(ae, dest)
    if not assoc.is_established:
        return False, f"no association with {dest.ae_title}@{dest.host}:{dest.port} ({_why_not(assoc, connected)})"
    status = assoc.send_c_echo()
    assoc.release()
    if status and status.Status == 0x0000:
        return True, f"C-ECHO {dest.ae_title}@{dest.host}:{dest.port}: success"
    return False, f"C-ECHO {dest.ae_title}@{dest.host}:{dest.port}: status {getattr(status, 'Status', 'none')}"


def _why_not(assoc: object, connected: bool) -> str:
    if not connected:
        return "connection failed"  # pynetdicom reports a refused connection as an abort
    if getattr(assoc, "is_rejected", False):
        return "association rejected"
    if getattr(assoc, "is_aborted", False):
        return "association aborted"
    return "connection failed"


class Dispatcher:
    """Sends due outbox items; safe to call from the scheduler and from job completion."""

    def __init__(self, config: NodeConfig, journal: Journal) -> None:
        self.config = config
        self.journal = journal
        self.policy = RetryPolicy.from_settings(config.dispatch)
        self._lock = threading.Lock()

    def send_due(self) -> int:
        """Try every item that is due; returns how many were acknowledged."""
        if not self._lock.acquire(blocking=False):
            return 0  # another thread is sending; it will pick these up
        try:
            by_dest: dict[str, list[OutboxItem]] = defaultdict(list)
            for item in self.journal.due_items():
                by_dest[item.destination].append(item)
            sent = 0
            for name, items in by_dest.items():
                sent += self._send(name, items)
            return sent
        finally:
            self._lock.release()

    def _fail(self, items: list[OutboxItem], error: str) -> None:
        self.journal.mark_failed_try([i.id for i in items], error, next_attempt=self.policy.next_attempt)

    def _send(self, name: str, items: list[OutboxItem]) -> int:
        try:
            dest = self.config.destination(name)
        except KeyError:
            log.error("outbox: destination %r is no longer configured; %d item(s) kept", name, len(items))
            self._fail(items, f"destination {name!r} is not configured")
            return 0
        ae = _make_ae(self.config, dest)
        contexts: set[tuple[str, str]] = set()
        metas: dict[int, Dataset] = {}
        for item in items:
            try:
                meta = read_file_meta_info(item.path)  # group 0002 only: the header is not parsed twice
            except (OSError, ValueError, InvalidDicomError) as exc:
                log.error("outbox: cannot read %s: %s", item.path, exc)
                self._fail([item], f"cannot read file: {exc}")
                continue
            metas[item.id] = meta
            contexts.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        for sop_class, ts in sorted(contexts):
            ae.add_requested_context(sop_class, ts)
        readable = [i for i in items if i.id in metas]
        if not readable:
            return 0
        assoc, connected = _associate(ae, dest)
        if not assoc.is_established:
            why = _why_not(assoc, connected)
            log.warning("outbox: %s (%s@%s:%d): %s; %d item(s) will be retried",
                        name, dest.ae_title, dest.host, dest.port, why, len(readable))
            self._fail(readable, why)
            return 0
        sent: list[int] = []
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        try:
            for item in readable:
                meta = metas[item.id]
                if (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)) not in accepted:
                    error = (f"{meta.MediaStorageSOPClassUID.name} in {meta.TransferSyntaxUID.name} "
                             f"not accepted by the destination")
                    log.warning("outbox: %s: %s (%s)", name, error, item.sop_instance_uid)
                    self._fail([item], error)
                    continue
                try:
                    status = assoc.send_c_store(Path(item.path))
                except (OSError, ValueError) as exc:  # the file changed or cannot be encoded any more
                    log.error("outbox: cannot send %s to %s: %s", item.path, name, exc)
                    self._fail([item], f"cannot send: {exc}")
                    continue
                code = getattr(status, "Status", None)
                if code in _SUCCESS_OR_WARNING:
                    # recorded now, in its own small transaction: a crash later in this association
                    # (even SIGKILL) must not make the node send this object again
                    self.journal.mark_sent([item.id])
                    sent.append(item.id)
                    continue
                error = "no response" if code is None else f"status 0x{code:04X}"
                comment = getattr(status, "ErrorComment", "") if status else ""
                log.warning("outbox: %s refused %s: %s %s", name, item.sop_instance_uid, error, comment)
                self._fail([item], f"{error} {comment}".strip())
                if not assoc.is_established:
                    rest = readable[readable.index(item) + 1:]
                    if rest:
                        self._fail(rest, "association lost")
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        if sent:
            log.info("outbox: %d object(s) delivered to %s", len(sent), name)
        return len(sent)
