"""Dispatch: C-STORE SCU from the journal's outbox to the destinations, with retries and backoff.

Items are sent per destination over one association; each item's outcome is written to the
journal right after its response (one small transaction each), so a restart, even after SIGKILL in
the middle of an association, resumes exactly what was not yet acknowledged: delivery is
at-least-once, and duplicate-free except for the one object whose response was in flight.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from . import stow
from .audit import AuditTrail
from .config import Destination, DispatchSettings, NodeConfig, TLSSettings
from .journal import ClaimLost, Journal, OutboxClaim, OutboxItem
from .notify import notify
from .reactor import one_reader, waking_dul
from .scp import nodelay_on_open, set_implementation
from .tls import connect_failure, tls_args

log = logging.getLogger(__name__)

_SUCCESS_OR_WARNING = {0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007}

#: What every storage SCP accepts (Implicit VR Little Endian is the DICOM default transfer syntax,
#: PS3.5 10.1): proposed besides each object's stored transfer syntax, and converted to when the
#: destination accepted nothing else.
FALLBACK_SYNTAXES: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: A-ASSOCIATE-RQ presentation context IDs are odd numbers 1..255 (PS3.8 9.3.2.2).
MAX_PRESENTATION_CONTEXTS = 128
#: After a destination refused a further association, seconds it is sent to over one.
SPARE_RETRY_S = 600.0
#: Seconds a further association may take to connect and associate (the first waits, associated, meanwhile).
SPARE_TIMEOUT_S = 5.0


class _Work:
    """One destination's batch, taken item by item by the associations sending it."""

    def __init__(self, items: Iterable[OutboxItem], stopping: threading.Event | None = None) -> None:
        self._items = deque(items)
        self._lock = threading.Lock()
        self._stopping = stopping

    def take(self) -> OutboxItem | None:
        """The next item; None when none is left, or the dispatcher is stopping (the rest is released)."""
        if self._stopping is not None and self._stopping.is_set():
            return None
        with self._lock:
            return self._items.popleft() if self._items else None

    def rest(self) -> list[OutboxItem]:
        """What no association took; the batch is empty afterwards."""
        with self._lock:
            rest, self._items = list(self._items), deque()
        return rest


def proposed_contexts(stored: Iterable[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """The presentation contexts the SCU proposes for objects stored as (SOP Class UID, Transfer Syntax UID).

    An object stored in Explicit or Implicit VR Little Endian gets one context offering both; any other
    stored syntax (compressed, Deflate, Big Endian) gets a context of its own, so a destination that
    accepts it receives the object as stored, and the SOP class gets a second context offering Explicit
    and Implicit VR Little Endian, into which the object is converted when only that one is accepted.
    """
    contexts: list[tuple[str, list[str]]] = []
    for sop_class, ts in sorted(set(stored)):
        if ts in FALLBACK_SYNTAXES:
            syntaxes = [ts, *(f for f in FALLBACK_SYNTAXES if f != ts)]
        else:
            syntaxes = [ts]
        if (sop_class, syntaxes) not in contexts:
            contexts.append((sop_class, syntaxes))
    for sop_class in sorted({sop for sop, ts in stored if ts not in FALLBACK_SYNTAXES}):
        fallback = (sop_class, list(FALLBACK_SYNTAXES))
        if not any(sop == sop_class and ts[0] in FALLBACK_SYNTAXES for sop, ts in contexts):
            contexts.append(fallback)
    return contexts[:MAX_PRESENTATION_CONTEXTS]


def sendable_syntax(accepted: Iterable[str], stored: str) -> UID | None:
    """The transfer syntax to send an object stored in ``stored`` in, given the syntaxes the destination
    accepted for its SOP class: the stored one, else Explicit then Implicit VR Little Endian; None if none."""
    accepted = {str(ts) for ts in accepted}
    if stored in accepted:
        return UID(stored)
    for fallback in FALLBACK_SYNTAXES:
        if fallback in accepted:
            return fallback
    return None


def converted(path: Path, stored: UID) -> Dataset:
    """What to hand pynetdicom to send a file stored in ``stored`` in Explicit or Implicit VR Little Endian.

    The data set read into memory as it is when it is already in one of them (pynetdicom re-encodes between
    the two); otherwise the data set read into memory, its pixel data decompressed (pydicom's decoders: JPEG, JPEG-LS,
    JPEG 2000, RLE) or, for Deflate, inflated on reading, and marked Explicit VR Little Endian, which
    pynetdicom encodes in the accepted syntax. Raises ValueError (or NotImplementedError) when pydicom
    cannot convert it (Explicit VR Big Endian is not converted)."""
    ds = dcmread(path)
    if stored in FALLBACK_SYNTAXES:
        return ds
    if stored.is_compressed:
        # lossless: the same object, so the same SOP Instance UID (pydicom would make a new one)
        ds.decompress(generate_instance_uid=False)  # TransferSyntaxUID becomes Explicit VR Little Endian
    elif stored == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.set_original_encoding(False, True)
    else:
        raise ValueError(f"cannot convert {stored.name} to a little endian transfer syntax")
    return ds


_chunked_lock = threading.Lock()
_chunked_users = 0
_chunked_before = False


@contextmanager
def files_sent_as_stored() -> Iterator[None]:
    """While inside, pynetdicom sends a file given as a path as it is stored, read in fragments as it goes out
    (``_config.STORE_SEND_CHUNKED_DATASET``), instead of decoding it into a Dataset and encoding that again
    (about 1 ms per 130 kB image). The file's transfer syntax must then be the context's: the dispatcher hands
    pynetdicom a Dataset (:func:`converted`) whenever it is not. The setting is pynetdicom's, for the whole
    process: on while any association of the dispatcher sends, back to what it was when none does."""
    global _chunked_users, _chunked_before
    with _chunked_lock:
        if _chunked_users == 0:
            _chunked_before = _config.STORE_SEND_CHUNKED_DATASET
            _config.STORE_SEND_CHUNKED_DATASET = True
        _chunked_users += 1
    try:
        yield
    finally:
        with _chunked_lock:
            _chunked_users -= 1
            if _chunked_users == 0:
                _config.STORE_SEND_CHUNKED_DATASET = _chunked_before


def rejection(assoc: Association) -> str | None:
    """The A-ASSOCIATE-RJ's result, source and reason (PS3.8 9.3.4) in words, if the peer rejected."""
    rsp = getattr(assoc.acceptor, "primitive", None)
    if not getattr(assoc, "is_rejected", False) or rsp is None or getattr(rsp, "result", None) not in (1, 2):
        return None
    try:
        return (f"{rsp.result_str.lower()}, source: {rsp.source_str.lower()}, reason: {rsp.reason_str.lower()} "
                f"(result {rsp.result}, source {rsp.result_source}, reason {rsp.diagnostic})")
    except (KeyError, ValueError, AttributeError):
        return f"result {rsp.result}, source {rsp.result_source}, reason {rsp.diagnostic}"


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


def _make_ae(config: NodeConfig, dest: Destination) -> AE:
    ae = AE(ae_title=dest.calling_ae_title or config.node.ae_title)
    set_implementation(ae)
    ae.maximum_pdu_size = config.dispatch.max_pdu_size
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = config.dispatch.timeout_s
    ae.connection_timeout = config.dispatch.timeout_s
    return ae


class AssociationSetupError(RuntimeError):
    """An association cannot even be requested: the destination's host name does not resolve, or the SSL context
    towards it cannot be made (its CA file, the node's certificate)."""


def _associate(ae: AE, dest: Destination, tls: TLSSettings) -> tuple[Association, bool | str]:
    """Request an association (over DICOM TLS when ``dest.tls``); (association, True if the connection was
    made, else False or, for TLS, why it failed)."""
    connected = threading.Event()

    def on_open(event: evt.Event) -> None:
        connected.set()
        nodelay_on_open(event)

    try:
        args = tls_args(dest, tls)
    except (OSError, ValueError) as exc:  # a CA file or the node's certificate cannot be loaded
        raise AssociationSetupError(f"TLS set-up failed: {exc}") from None
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                             evt_handlers=[(evt.EVT_CONN_OPEN, on_open)], tls_args=args)
    except socket.gaierror as exc:  # the name does not resolve: not an unexpected error (with its traceback)
        raise AssociationSetupError(f"host {dest.host!r} cannot be resolved: {exc.strerror or exc}") from None
    if assoc.is_established:
        one_reader(assoc)  # (pynetdicom#875: its reactor could take a response its sender waits for)
    if connected.is_set():
        return assoc, True
    return assoc, connect_failure(args[0]) if args else False


def echo(config: NodeConfig, dest: Destination) -> tuple[bool, str]:
    """C-ECHO a destination (a QIDO-RS search of a STOW-RS one); (ok, message)."""
    if dest.protocol == "stow-rs":
        return stow.echo(dest, config.tls, config.dispatch.timeout_s)
    ae = _make_ae(config, dest)
    ae.add_requested_context(Verification)
    try:
        assoc, connected = _associate(ae, dest, config.tls)
    except AssociationSetupError as exc:
        return False, f"no association with {dest.address} ({exc})"
    if not assoc.is_established:
        return False, f"no association with {dest.address} ({_why_not(assoc, connected)})"
    status = assoc.send_c_echo()
    assoc.release()
    if status and status.Status == 0x0000:
        return True, f"C-ECHO {dest.address}: success"
    return False, f"C-ECHO {dest.address}: status {getattr(status, 'Status', 'none')}"


def _why_not(assoc: Association, connected: bool | str) -> str:
    if isinstance(connected, str):
        return f"connection failed (TLS: {connected})"
    if not connected:
        return "connection failed"  # pynetdicom reports a refused connection as an abort
    if getattr(assoc, "is_rejected", False):
        why = rejection(assoc)
        return f"association rejected ({why})" if why else "association rejected"
    if getattr(assoc, "is_aborted", False):
        rsp = getattr(assoc.acceptor, "primitive", None)
        if getattr(rsp, "result", None) == 0:  # accepted, but none of the contexts: pynetdicom aborts
            return "association aborted: the destination accepted none of the proposed presentation contexts"
        return "association aborted"
    return "connection failed"


def dispatcher_id() -> str:
    """A dispatcher's id in the outbox claims: host and process id (unique among the live processes)."""
    return f"dispatcher@{socket.gethostname()}:{os.getpid()}"


class Dispatcher:
    """Sends due outbox items; safe to call from the scheduler and from job completion."""

    def __init__(self, config: NodeConfig, journal: Journal, audit: AuditTrail | None = None,
                 worker: str | None = None) -> None:
        self.config = config
        self.journal = journal
        self.audit = audit or AuditTrail(None, config.node.ae_title)
        self.policy = RetryPolicy.from_settings(config.dispatch)
        #: the id this dispatcher's outbox claims are made under (unique among live processes)
        self.worker = worker or dispatcher_id()
        self._lock = threading.Lock()
        #: set by :meth:`stop`: no further claim, and no further item of a claim being sent (they are released)
        self.stopping = threading.Event()
        self._gone: list[OutboxItem] = []  # failed for good in this round, reported at its end
        self._gone_lock = threading.Lock()
        self._claim: OutboxClaim | None = None  # the claim being sent (one at a time: ``_lock``)
        #: the claim's items given an outcome so far: id → sent (True) or failed a try (False)
        self._settled: dict[int, bool] = {}
        self._settled_lock = threading.Lock()  # (a destination's associations settle items in threads of their own)
        self._spare_refused: dict[str, float] = {}  # destination -> when it last refused a further association
        #: destinations that could not be associated with in this round (send_due) -> why
        self._unreached: dict[str, str] = {}

    def send_due(self) -> int:
        """Claim the due items, one destination's batch at a time, and send them; returns how many were
        acknowledged. Other dispatchers of the journal (receivers, ``--role dispatcher``) claim other items."""
        if not self._lock.acquire(blocking=False):
            return 0  # another thread is sending; it will pick these up
        try:
            sent, seen = 0, set()
            settings = self.config.dispatch
            self._unreached = {}
            while not self.stopping.is_set() and (claim := self.journal.claim_outbox(
                    self.worker, settings.lease_s, limit=settings.claim_batch)) is not None:
                ids = {i.id for i in claim.items}
                if ids <= seen:  # tried in this round already (e.g. due again at once): the next scan
                    self.journal.release_outbox(claim)
                    break
                seen |= ids
                if claim.destination in self._unreached:
                    self._fail_unreached(claim, self._unreached[claim.destination])
                    continue
                sent += self._send_claimed(claim)
            return sent
        finally:
            try:
                self._report_given_up()
            finally:
                self._lock.release()

    def stop(self) -> None:
        """Finish the objects being sent and send no more: a stop must not wait for a whole backlog (a slow PACS
        with hundreds queued kept the node from stopping for minutes, past systemd's TimeoutStopSec)."""
        self.stopping.set()

    def take_back(self) -> int:
        """Release the claims an earlier life of this dispatcher held (its id is the SQLite node's ``NODE_WORKER``,
        which no other process uses): sent at once instead of after their lease. Returns how many items."""
        n = self.journal.release_outbox_of(self.worker)
        if n:
            log.info("outbox: %d item(s) claimed before a stop or crash are due again", n)
        return n

    def _send_claimed(self, claim: OutboxClaim) -> int:
        """Send one claim's items while a timer renews its lease; what it still holds at the end is released."""
        self._claim, self._settled = claim, {}
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(claim, stop), name="outbox-lease", daemon=True)
        renewer.start()
        try:
            return self._send(claim.destination, claim.items)
        except ClaimLost:
            log.warning("outbox: the claim on %d item(s) for %s was taken over by another dispatcher (lease "
                        "expired); they are left to it", len(claim.items), claim.destination)
            return 0
        except Exception as exc:  # noqa: BLE001 - one destination's fault must not stop the others' delivery
            self._fail_unexpected(claim, exc)
            return sum(self._settled.values())
        finally:
            stop.set()
            renewer.join()
            self._claim = None
            try:
                self.journal.release_outbox(claim)
            except Exception:  # noqa: BLE001 - the lease expires by itself
                log.exception("outbox: releasing a claim failed; its items wait for the lease to expire")

    def _fail_unreached(self, claim: OutboxClaim, why: str) -> None:
        """The items of a destination that could not be associated with earlier in this round fail a try with that
        reason, without another attempt now: with a backlog of many claims, each would wait its own connection
        timeout, and every other destination behind them (the oldest due items are claimed first)."""
        self._claim, self._settled = claim, {}
        try:
            self._fail(claim.items, why)
        except ClaimLost:
            pass  # taken over meanwhile: the other dispatcher tries them
        finally:
            self._claim = None
            self.journal.release_outbox(claim)

    def _fail_unexpected(self, claim: OutboxClaim, exc: Exception) -> None:
        """An exception nobody expected while sending ``claim`` (a library raising on a destination's odd answer):
        its items without an outcome yet fail a try with it as the reason. Released unsettled they would be due at
        once, and, the oldest due, claimed again at every scan: retried without end and no other destination
        served; failed, they wait their backoff like any failed try and the next claim serves another destination."""
        left = [i for i in claim.items if i.id not in self._settled]
        log.error("outbox: sending to %s failed unexpectedly; %d item(s) will be retried", claim.destination,
                  len(left), exc_info=exc)
        try:
            self._fail(left, f"unexpected error: {type(exc).__name__}: {exc}")
        except ClaimLost as lost:
            log.warning("outbox: the failed try of %d item(s) for %s is not recorded: %s", len(left),
                        claim.destination, lost)

    def _settle(self, ids: Iterable[int], sent: bool) -> None:
        with self._settled_lock:
            self._settled.update(dict.fromkeys(ids, sent))

    def _mark_sent(self, ids: list[int], *, durable: bool = True) -> None:
        self.journal.mark_sent(ids, durable=durable, claim=self._claim)
        self._settle(ids, True)

    def _renew(self, claim: OutboxClaim, stop: threading.Event) -> None:
        interval = self.config.dispatch.lease_s / 3
        while not stop.wait(interval):
            try:
                if not self.journal.renew_outbox(claim, self.config.dispatch.lease_s):
                    return  # done, or taken over: its outcomes are refused (ClaimLost)
            except Exception:  # noqa: BLE001 - tried again at the next interval
                log.exception("outbox: renewing a claim's lease failed")

    def _fail(self, items: list[OutboxItem], error: str) -> None:
        gone = self.journal.mark_failed_try([i.id for i in items], error, next_attempt=self.policy.next_attempt,
                                            claim=self._claim)
        self._settle((i.id for i in items), False)
        if gone:
            with self._gone_lock:
                self._gone.extend(gone)

    def _report_given_up(self) -> None:
        """One ERROR line and one ``delivery_failed`` notification per destination for the items that failed
        for good in this round (not one per object: an sT1 has hundreds)."""
        with self._gone_lock:
            gone, self._gone = self._gone, []
        by_dest: dict[str, list[OutboxItem]] = defaultdict(list)
        for item in gone:
            by_dest[item.destination].append(item)
        for name, failed in by_dest.items():
            jobs = sorted({i.job_id for i in failed})
            errors = sorted({i.last_error for i in failed})
            tries = max(i.tries for i in failed)
            log.error("outbox: %d object(s) of job(s) %s failed for good to %s after %d tr%s (%s); "
                      "`dicom-node retry %s` queues them again", len(failed), ", ".join(map(str, jobs)), name,
                      tries, "y" if tries == 1 else "ies", "; ".join(errors), name)
            notify("delivery_failed", {"destination": name, "jobs": jobs, "objects": len(failed), "tries": tries,
                                       "error": "; ".join(errors),
                                       "sop_instance_uids": [i.sop_instance_uid for i in failed][:100]})

    def _audit(self, dest: Destination, items: list[OutboxItem], sent: int, error: str | None) -> None:
        """The ``delivery`` audit event of one association (or attempt) to ``dest``."""
        studies: list[dict[str, object]] = []
        try:
            for job_id in sorted({i.job_id for i in items}):
                series = self.journal.series(self.journal.job(job_id).series_uid)
                studies.append({"job": job_id, "patient_id": series.patient_id if series else "",
                                "study_uid": series.study_uid if series else "",
                                "series_uid": series.series_uid if series else ""})
        except Exception as exc:  # noqa: BLE001 - the event is recorded with what is known
            log.error("outbox: cannot look up the studies of a delivery to %s: %s", dest.name, exc)
        self.audit.record("delivery", destination=dest.name, protocol=dest.protocol, address=dest.address,
                          tls=dest.tls or (dest.url or "").startswith("https://"), sent=sent,
                          failed=len(items) - sent, studies=studies, error=error)

    def _send(self, name: str, items: list[OutboxItem]) -> int:
        try:
            dest = self.config.destination(name)
        except KeyError:
            log.error("outbox: destination %r is no longer configured; %d item(s) kept", name, len(items))
            self._fail(items, f"destination {name!r} is not configured")
            return 0
        if dest.protocol == "stow-rs":
            return self._send_stow(dest, items)
        metas: dict[int, Dataset] = {}
        for item in items:
            try:
                meta = read_file_meta_info(item.path)  # group 0002 only: the header is not parsed twice
            except (OSError, ValueError, InvalidDicomError) as exc:
                log.error("outbox: cannot read %s: %s", item.path, exc)
                self._fail([item], f"cannot read file: {exc}")
                continue
            metas[item.id] = meta
        readable = [i for i in items if i.id in metas]
        if not readable:
            return 0
        first = self._open(name, dest, readable, metas)
        if first is None:
            return 0
        return self._send_over(name, dest, first, readable, metas)

    def _send_over(self, name: str, dest: Destination, first: Association, items: list[OutboxItem],
                   metas: dict[int, Dataset]) -> int:
        """Send ``items`` over ``first`` and up to ``max_associations`` - 1 further associations at once, each
        taking the items one by one from a shared queue: the first sends at once while the others are opened, so
        a further one that is refused, or slow to come (a PACS serving one association at a time), costs nothing
        but itself. The number acknowledged."""
        work = _Work(items, self.stopping)
        wanted = min(self._associations_for(name, dest), len(items))
        if wanted == 1:
            sent_alone = self._send_share(name, dest, first, work, metas)
            self._fail_left(name, work)
            return sent_alone
        futures = []
        with ThreadPoolExecutor(max_workers=wanted, thread_name_prefix=f"outbox-{name}") as pool:
            try:
                futures.append(pool.submit(self._send_share, name, dest, first, work, metas))
            except BaseException:  # no thread for it: released unused
                first.release()
                raise
            for _ in range(wanted - 1):
                futures.append(pool.submit(self._send_spare, name, dest, work, items, metas))
        sent, lost = 0, None
        for future in futures:  # every share's count, whether or not another lost the claim
            try:
                sent += future.result()
            except ClaimLost as exc:
                lost = exc
        if lost is not None:  # what is left is the new claimant's
            log.info("outbox: %d object(s) delivered to %s before the claim was lost", sent, name)
            raise lost
        self._fail_left(name, work)
        return sent

    def _send_stow(self, dest: Destination, items: list[OutboxItem]) -> int:
        """Send ``items`` to a DICOMweb destination, ``stow_batch`` objects per STOW-RS request; the number
        stored."""
        try:
            web = stow.client(dest, self.config.tls, self.config.dispatch.timeout_s)
        except (OSError, UnicodeDecodeError) as exc:  # a password or token file that cannot be read
            error = f"cannot set up STOW-RS: {exc}"  # (an OSError's text names its file)
            log.error("outbox: %s: %s; %d item(s) will be retried", dest.name, error, len(items))
            self._fail(items, error)
            self._audit(dest, items, 0, error)
            return 0
        sent, last_error = 0, None
        tried = items  # (what the audit event counts: not what a stop leaves for the next start)
        for start in range(0, len(items), dest.stow_batch):
            if self.stopping.is_set():  # the rest is released with the claim, for the next start
                tried = items[:start]
                break
            batch, datasets = self._read_all(items[start:start + dest.stow_batch])
            if not batch:
                continue
            result = stow.store(web, datasets)
            if not result.connected:
                self._unreached[dest.name] = result.error or "no connection"
            if result.error is not None:
                last_error = result.error
                remaining = batch + items[start + dest.stow_batch:]
                log.warning("outbox: %s (%s): %s; %d item(s) will be retried", dest.name, dest.url, result.error,
                            len(remaining))
                self._fail(remaining, result.error)
                break
            stored = [i.id for i in batch if i.sop_instance_uid in result.stored]
            self._mark_sent(stored)
            sent += len(stored)
            for item in batch:
                reason = result.failed.get(item.sop_instance_uid)
                if reason is not None and item.id not in stored:
                    last_error = reason
                    log.warning("outbox: %s refused %s: %s", dest.name, item.sop_instance_uid, reason)
                    self._fail([item], reason)
        if sent:
            log.info("outbox: %d object(s) delivered to %s by STOW-RS", sent, dest.name)
        if tried or last_error:
            self._audit(dest, tried, sent, last_error)
        return sent

    def _read_all(self, items: list[OutboxItem]) -> tuple[list[OutboxItem], list[Dataset]]:
        """The items whose files can be read, and their data sets; the others fail a try."""
        batch, datasets = [], []
        for item in items:
            try:
                datasets.append(dcmread(item.path))
                batch.append(item)
            except (OSError, ValueError, InvalidDicomError) as exc:
                log.error("outbox: cannot read %s: %s", item.path, exc)
                self._fail([item], f"cannot read file: {exc}")
        return batch, datasets

    def _send_spare(self, name: str, dest: Destination, work: _Work, items: list[OutboxItem],
                    metas: dict[int, Dataset]) -> int:
        """Open a further association (``_open(spare=True)``) and send what is left of ``work`` over it; 0 when it
        cannot be had for any reason (the first association sends meanwhile, and nothing fails)."""
        try:
            assoc = self._open(name, dest, items, metas, spare=True)
        except Exception as exc:  # noqa: BLE001 - a spare is an optimisation; the first association carries on
            self._spare_refused[name] = time.monotonic()
            log.warning("outbox: %s: a further association failed (%s: %s); sending over fewer, none tried again "
                        "for %.0f s", name, type(exc).__name__, exc, SPARE_RETRY_S)
            return 0
        if assoc is None:
            return 0
        return self._send_share(name, dest, assoc, work, metas)

    def _fail_left(self, name: str, work: _Work) -> None:
        """Items no association took (every one was lost): failed a try; left for the next start when the
        dispatcher is stopping (released with the claim, no try counted)."""
        left = work.rest()
        if left and self.stopping.is_set():
            log.info("outbox: stopping: %d item(s) for %s left for the next start", len(left), name)
        elif left:
            log.warning("outbox: %s: association lost; %d item(s) will be retried", name, len(left))
            self._fail(left, "association lost")

    def _associations_for(self, name: str, dest: Destination) -> int:
        """``max_associations``, or 1 while the destination recently refused a further association."""
        refused = self._spare_refused.get(name)
        if refused is not None and time.monotonic() - refused < SPARE_RETRY_S:
            return 1
        return dest.max_associations

    def _send_share(self, name: str, dest: Destination, assoc: Association, work: _Work,
                    metas: dict[int, Dataset]) -> int:
        """Send items taken from ``work`` to ``dest`` over ``assoc`` (released at the end) until none is left or
        the association is lost; the number acknowledged."""
        items: list[OutboxItem] = []  # those this association took
        sent: list[int] = []
        last_error: str | None = None
        try:
            with files_sent_as_stored():
                sent, last_error = self._store_all(name, assoc, work, items, metas)
        finally:
            if assoc.is_established:
                assoc.release()
            if items or last_error:  # (a further association that came when nothing was left took nothing)
                self._audit(dest, items, len(sent), last_error)
        if sent:
            log.info("outbox: %d object(s) delivered to %s", len(sent), name)
        return len(sent)

    def _open(self, name: str, dest: Destination, items: list[OutboxItem],
              metas: dict[int, Dataset], *, spare: bool = False) -> Association | None:
        """An association to ``dest`` proposing every context ``items`` need; None (items failed a try) if none.

        ``spare``: a further association to a destination already associated: if it is refused, nothing failed
        (the items go over the others) and none is tried for SPARE_RETRY_S. It gets SPARE_TIMEOUT_S to connect
        and associate, so that the first association (associated and waiting) is not left idle for long.
        """
        ae = _make_ae(self.config, dest)
        if spare:
            ae.connection_timeout = ae.acse_timeout = min(self.config.dispatch.timeout_s, SPARE_TIMEOUT_S)
        stored = [(str(metas[i.id].MediaStorageSOPClassUID), str(metas[i.id].TransferSyntaxUID)) for i in items]
        for sop_class, syntaxes in proposed_contexts(stored):
            ae.add_requested_context(sop_class, syntaxes)
        try:
            assoc, connected = _associate(ae, dest, self.config.tls)
        except AssociationSetupError as exc:
            if spare:  # (the first association had the same set-up, and got through): _open_spare reports it
                raise
            log.error("outbox: %s: %s; %d item(s) will be retried", name, exc, len(items))
            self._unreached[name] = str(exc)
            self._fail(items, str(exc))
            self._audit(dest, items, 0, str(exc))
            return None
        if not assoc.is_established and spare:
            self._spare_refused[name] = time.monotonic()
            log.info("outbox: %s (%s) refused a further association (%s): sending over fewer; "
                     "none tried again for %.0f s ([[destinations]] max_associations = 1 stops trying)",
                     name, dest.address, _why_not(assoc, connected), SPARE_RETRY_S)
            return None
        if not assoc.is_established:
            why = _why_not(assoc, connected)
            log.warning("outbox: %s (%s): %s; %d item(s) will be retried", name, dest.address, why, len(items))
            if not connected or assoc.is_rejected:  # the destination, not these items' contexts (an abort)
                self._unreached[name] = why
            self._fail(items, why)
            self._audit(dest, items, 0, why)
            return None
        waking_dul(assoc.dul)
        return assoc

    def _store_all(self, name: str, assoc: Association, work: _Work, taken: list[OutboxItem],
                   metas: dict[int, Dataset]) -> tuple[list[int], str | None]:
        """C-STORE items taken from ``work`` one after the other (each appended to ``taken``) while the association
        holds; (ids acknowledged, the last error). What is left when it is lost stays in ``work`` for the others."""
        sent: list[int] = []
        last_error: str | None = None
        accepted: dict[str, set[str]] = defaultdict(set)
        for cx in assoc.accepted_contexts:
            accepted[str(cx.abstract_syntax)].add(str(cx.transfer_syntax[0]))
        while True:
            if not assoc.is_established:
                last_error = "association lost"
                break
            item = work.take()
            if item is None:
                break
            taken.append(item)
            error = self._store_one(name, assoc, accepted, item, metas[item.id])
            if error is None:
                # recorded now, in its own small transaction: a crash of the node later in this association
                # (even SIGKILL) must not make it send this object again (not fsync'd: see Journal.mark_sent)
                self._mark_sent([item.id], durable=False)
                sent.append(item.id)
            else:
                last_error = error
                self._fail([item], error)
        return sent, last_error

    def _store_one(self, name: str, assoc: Association, accepted: dict[str, set[str]], item: OutboxItem,
                   meta: Dataset) -> str | None:
        """C-STORE one item; None when the destination acknowledged it, else why not."""
        sop_class, stored_ts = str(meta.MediaStorageSOPClassUID), UID(str(meta.TransferSyntaxUID))
        target = sendable_syntax(accepted[sop_class], stored_ts)
        if target is None:
            error = f"{meta.MediaStorageSOPClassUID.name} in {stored_ts.name} not accepted by the destination"
            log.warning("outbox: %s: %s (%s)", name, error, item.sop_instance_uid)
            return error
        try:
            if target == stored_ts:
                payload: Path | Dataset = Path(item.path)  # sent from the file as stored (files_sent_as_stored)
            else:
                payload = converted(Path(item.path), stored_ts)
                log.info("outbox: %s: %s converted from %s to %s", name, item.sop_instance_uid,
                         stored_ts.name, target.name)
            status = assoc.send_c_store(payload)
        except (OSError, ValueError, NotImplementedError, RuntimeError, AttributeError) as exc:
            # the file changed, cannot be converted or encoded any more
            log.error("outbox: cannot send %s to %s: %s", item.path, name, exc)
            return f"cannot send: {exc}"
        code = getattr(status, "Status", None)
        if code in _SUCCESS_OR_WARNING:
            return None
        error = "no response" if code is None else f"status 0x{code:04X}"
        comment = getattr(status, "ErrorComment", "") if status else ""
        log.warning("outbox: %s refused %s: %s %s", name, item.sop_instance_uid, error, comment)
        return f"{error} {comment}".strip()
