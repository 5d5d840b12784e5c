"""The audit trail: who sent the node what, and what the node sent where, as JSON lines.

One JSON object per line, apart from the log, so that a hospital can ship it to its log server (the file is
reopened when logrotate moves it). Each line has ``time`` (ISO 8601, UTC), ``event``, ``node`` (this node's
AE title) and the event's own fields:

- ``association``: an association ended (``outcome`` released or aborted): ``calling_ae``, ``called_ae``,
  ``host``, ``tls`` (the protocol and cipher, or null), ``stored`` (per series: ``patient_id``, ``study_uid``,
  ``series_uid``, ``instances``) and ``refused`` (C-STOREs answered with a failure, per status);
- ``association-rejected``: ``calling_ae``, ``host``, ``reason``;
- ``delivery``: one association (or STOW-RS run) to a destination: ``destination``, ``protocol`` (dimse or
  stow-rs), ``address`` (``AE@host:port`` or the URL), ``tls``, ``sent`` and ``failed`` (object counts),
  ``studies`` (per job: ``job``, ``patient_id``, ``study_uid``, ``series_uid``), ``error`` (the last failure,
  if any);
- ``operator``: a person's action (``action``: retry, reprocess, purge, ...), ``by`` (the OS user, or the
  dashboard's authenticated user) and what it applied to.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from logging.handlers import WatchedFileHandler
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class AuditTrail:
    """Appends audit events to ``path`` (nothing when ``path`` is None). Safe from any thread; an audit
    file that cannot be written is logged once per failure and never stops the node."""

    def __init__(self, path: Path | None, node_ae: str) -> None:
        self.path = path
        self.node_ae = node_ae
        self._handler: WatchedFileHandler | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # created readable by its owner only (it holds patient IDs), whatever the umask of the command
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
            self._handler = WatchedFileHandler(path, encoding="utf-8")  # reopened after logrotate moves it
            self._handler.setFormatter(logging.Formatter("%(message)s"))

    def record(self, event: str, **fields: Any) -> None:
        if self._handler is None:
            return
        line = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event,
                "node": self.node_ae, **fields}
        try:
            text = json.dumps(line, ensure_ascii=False, default=str, separators=(",", ":"))
            record = logging.LogRecord("dicom_node.audit", logging.INFO, __file__, 0, text, None, None)
            self._handler.acquire()
            try:
                self._handler.emit(record)
                self._handler.flush()
            finally:
                self._handler.release()
        except Exception as exc:  # noqa: BLE001 - the audit trail must never fail a C-STORE or a job
            log.error("audit trail %s: cannot record %s: %s", self.path, event, exc)

    def close(self) -> None:
        if self._handler is not None:
            self._handler.close()
            self._handler = None


@dataclass
class _Received:
    """What one association stored and refused so far."""

    stored: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (patient, study, series) -> n
    refused: Counter[str] = field(default_factory=Counter)  # "0xA700" -> n


class AssociationLedger:
    """Counts, per association, what it stored and refused, for its ``association`` audit event."""

    def __init__(self) -> None:
        self._open: dict[int, _Received] = {}
        self._lock = threading.Lock()

    def stored(self, key: int, patient_id: str, study_uid: str, series_uid: str) -> None:
        with self._lock:
            self._open.setdefault(key, _Received()).stored[(patient_id, study_uid, series_uid)] += 1

    def refused(self, key: int, status: int) -> None:
        with self._lock:
            self._open.setdefault(key, _Received()).refused[f"0x{status:04X}"] += 1

    def close(self, key: int) -> dict[str, Any]:
        """The ``stored`` and ``refused`` fields of the association's event; forgets it."""
        with self._lock:
            received = self._open.pop(key, _Received())
        return {
            "stored": [{"patient_id": p, "study_uid": st, "series_uid": se, "instances": n}
                       for (p, st, se), n in sorted(received.stored.items())],
            "refused": dict(sorted(received.refused.items())),
        }
