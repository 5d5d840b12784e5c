"""Notifications: webhooks told about what a person should look at, as a JSON body POSTed over HTTP(S).

Events (``config.NOTIFICATION_EVENTS``): ``job_failed`` (a routed series could not be processed),
``delivery_failed`` (an output failed for good after its last try), ``disk_low`` (free space below the
watermark). Each ``[[notifications]]`` entry names its URL and the events it wants.

:func:`notify` only queues: one background thread POSTs, with a short timeout and a few tries, so a slow or
unreachable webhook never holds the SCP, a job or the dispatcher. A webhook that still fails is logged in one
line (its host only: webhook URLs often carry a secret) and the event is dropped; nothing here raises into the
caller. The body is ``{"event": ..., "node": <AE title>, "time": <UTC ISO 8601>, ...payload}``; payloads carry
UIDs, job ids, rule names and reasons, never patient names or IDs.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from http.client import HTTPException
from typing import Any
from urllib.parse import urlsplit

from .config import NOTIFICATION_EVENTS, Notification

log = logging.getLogger(__name__)

#: Events waiting to be posted; past this, new ones are dropped (with one log line) until the queue drains.
MAX_QUEUED = 1000


def _where(url: str) -> str:
    """The host of a webhook URL, for the log (the path and query may hold a token)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # out of range: said as it is written, for the log line of the failure it causes
        port = parts.netloc.rsplit(":", 1)[-1]
    return f"{parts.scheme}://{parts.hostname or '?'}{f':{port}' if port else ''}"


class Notifier:
    """Posts events to the configured webhooks from one background thread."""

    def __init__(self, hooks: Sequence[Notification], *, node: str = "") -> None:
        self.hooks = list(hooks)
        self.node = node
        self._queue: queue.Queue[tuple[Notification, bytes] | None] = queue.Queue(maxsize=MAX_QUEUED)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._dropping = False
        #: events posted (2xx) and given up, for tests and status
        self.posted = 0
        self.failed = 0

    def start(self) -> Notifier:
        if self.hooks and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="notifications", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Post what is queued (one try each, within ``timeout``), then end the thread; later events are dropped."""
        if self._thread is None:
            return
        self._stopping.set()  # no more waits between tries
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout=timeout)
        self._thread = None

    def notify(self, event: str, payload: Mapping[str, Any]) -> None:
        """Queue ``event`` for every webhook that wants it; returns at once and never raises."""
        try:
            if event not in NOTIFICATION_EVENTS:
                raise ValueError(f"unknown event {event!r}")
            body: bytes | None = None
            for hook in self.hooks:
                if event not in hook.events:
                    continue
                if body is None:
                    message = {"event": event, "node": self.node,
                               "time": datetime.now(UTC).isoformat(timespec="seconds"), **payload}
                    body = json.dumps(message, default=str).encode("utf-8")
                self._queue.put_nowait((hook, body))
                self._dropping = False
        except queue.Full:
            if not self._dropping:
                log.warning("notifications: %d event(s) waiting to be posted; %s and later events dropped",
                            MAX_QUEUED, event)
                self._dropping = True
        except Exception as exc:  # noqa: BLE001 - a notification must never cost what it reports on
            log.error("notifications: %s not queued: %s", event, exc)

    def _loop(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is None:
                return
            hook, body = entry
            try:
                self._post(hook, body)
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any webhook
                self.failed += 1
                log.error("notifications: posting to %s failed: %s", _where(hook.url), exc)

    def _post(self, hook: Notification, body: bytes) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": "dicom-node", **hook.headers}
        error = ""
        for attempt in range(1, hook.tries + 1):
            request = urllib.request.Request(hook.url, data=body, headers=headers, method="POST")
            try:
                with _OPENER.open(request, timeout=hook.timeout_s) as response:
                    response.read(65536)
                self.posted += 1
                return
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code} {exc.reason}"
            except (urllib.error.URLError, OSError, HTTPException) as exc:
                error = str(getattr(exc, "reason", None) or exc)
            except ValueError as exc:  # its message may quote the URL, and with it a token
                error = type(exc).__name__
            if attempt < hook.tries and self._stopping.wait(min(2.0 ** (attempt - 1), 30.0)):
                break
        self.failed += 1
        event = json.loads(body).get("event", "?")
        log.warning("notifications: %s to %s not posted after %d tr%s: %s", event, _where(hook.url), hook.tries,
                    "y" if hook.tries == 1 else "ies", error)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A webhook's redirect is not followed (urllib would send its Authorization header, and the event, wherever
    the answer points): it fails the try as its 3xx."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


_current: Notifier | None = None


def install(notifier: Notifier | None) -> None:
    """Make ``notifier`` the one :func:`notify` posts to (None: notifications off)."""
    global _current
    _current = notifier


def notify(event: str, payload: Mapping[str, Any]) -> None:
    """Tell the webhooks that want ``event`` (``job_failed``, ``delivery_failed``, ``disk_low``) about it, with
    ``payload`` (JSON-serialisable values); does nothing when no notifier is installed. Never blocks, never
    raises: callable from the SCP, a job, the dispatcher or the disk guard."""
    notifier = _current
    if notifier is not None:
        notifier.notify(event, payload)
