"""The node's HTTP server (``[http]``): ``/health``, ``/metrics`` and the dashboard with its two actions.

Standard library only (``http.server.ThreadingHTTPServer`` on a thread of its own). Routes:

* ``GET /health``: the health checks as JSON; 200 when every check passes, 503 otherwise.
* ``GET /metrics``: Prometheus text format (:mod:`dicom_node.exporter`).
* ``GET /`` (``?q=`` searches patient ID and accession number): the dashboard (:mod:`dicom_node.dashboard`).
* ``POST /actions/retry`` (``job_id``) and ``POST /actions/reprocess`` (``series_uid``): only with
  ``admin_password_file`` set, with HTTP Basic credentials and the page's CSRF token (form field ``csrf`` or header
  ``X-CSRF-Token``); a request whose ``Origin`` is another site is refused as well.

With a password set the dashboard itself asks for it too (it shows patient data); ``/health`` and ``/metrics``
never do (they hold none). Responses carry a Content-Security-Policy without scripts, no caching and no framing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from .config import HTTPSettings, NodeConfig, is_loopback_address
from .dashboard import PageContext, render, render_message
from .exporter import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .health import Health
from .journal import Journal

log = logging.getLogger(__name__)

#: Largest request body read (the action forms are a few hundred bytes).
MAX_BODY = 8192

_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


#: Connections served at once; one more is closed at once (a thread each: clients that send a byte now and then
#: could hold any number of threads)
MAX_CONNECTIONS = 64


class _BoundedServer(ThreadingHTTPServer):
    """http.server's threading server, serving at most :data:`MAX_CONNECTIONS` connections at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._refused_logged = 0.0

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            if time.monotonic() - self._refused_logged > 60:
                self._refused_logged = time.monotonic()
                log.warning("HTTP: %d connections open: a connection from %s (and others for a minute) closed at "
                            "once", MAX_CONNECTIONS, client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread for it
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _IPv6Server(_BoundedServer):
    """[http] host an IPv6 address ("::1", "::"): http.server listens on IPv4 only."""

    address_family = socket.AF_INET6


class HTTPListenError(OSError):
    """The HTTP server cannot start (port taken, address not local, password file unreadable); one clear line."""


class ActionError(ValueError):
    """An action that cannot be done (unknown series or job); the message says why."""


class Operations(Protocol):
    """What the HTTP server asks of the node (:class:`dicom_node.service.Node`)."""

    journal: Journal

    def health(self) -> Health: ...

    def metrics_exposition(self) -> bytes: ...

    def job_stages(self) -> Mapping[int, tuple[str, float]]: ...

    def processes(self) -> list[dict[str, object]]: ...

    def reprocess_series(self, series_uid: str, by: str = "") -> str: ...

    def retry_deliveries(self, job_id: int, by: str = "") -> str: ...


def load_password(path: Path) -> str:
    """The dashboard password from its file (first line, stripped); :class:`HTTPListenError` if unusable."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise HTTPListenError(f"[http] admin_password_file {path} cannot be read: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
    password = lines[0].strip() if lines else ""
    if len(password) < 8:
        raise HTTPListenError(f"[http] admin_password_file {path}: the password must have at least 8 characters")
    return password


class NodeHTTPServer:
    """The HTTP server of one node; ``start`` binds (raising :class:`HTTPListenError`), ``stop`` closes."""

    def __init__(self, settings: HTTPSettings, ops: Operations) -> None:
        self.settings = settings
        self.ops = ops
        self.password = load_password(settings.admin_password_file) if settings.admin_password_file else None
        # per process: a page's forms carry it; it changes when the node restarts (reload the page)
        self._secret = os.urandom(32)
        self.csrf_token = hmac.new(self._secret, b"dicom-node dashboard actions", hashlib.sha256).hexdigest()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._failed: dict[str, tuple[int, float]] = {}  # address -> (wrong credentials not yet logged, since)
        self._failed_lock = threading.Lock()

    @property
    def actions_enabled(self) -> bool:
        return self.password is not None

    def start(self) -> None:
        handler = type("Handler", (_Handler,), {"node_server": self})
        try:
            server_class = _IPv6Server if ":" in self.settings.host else _BoundedServer
            server = server_class((self.settings.host, self.settings.port), handler)
        except OSError as exc:
            raise HTTPListenError(f"cannot listen for HTTP on {self.settings.host}:{self.settings.port} ([http] "
                                  f"host and port): {exc.strerror or exc}") from None
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="dicom-node-http", daemon=True)
        self._thread.start()
        log.info("HTTP on %s:%d: /health, /metrics%s", self.settings.host, self.port,
                 ("" if not self.settings.dashboard else ", dashboard at /" +
                  (" (password required; retry and reprocess actions on)" if self.password else
                   " (read-only: no [http] admin_password_file)")))

    @property
    def port(self) -> int:
        return self.settings.port if self._server is None else int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def failed_login(self, address: str) -> None:
        """Log wrong dashboard credentials: one line per address and minute, with how many more came meanwhile (a
        guessing run shows without flooding the log)."""
        now = time.monotonic()
        with self._failed_lock:
            unlogged, since = self._failed.get(address, (0, float("-inf")))
            if now - since < 60:
                self._failed[address] = (unlogged + 1, since)
                return
            if len(self._failed) > 1024:  # (many addresses: forget the old counts)
                self._failed.clear()
            self._failed[address] = (0, now)
        log.warning("dashboard: wrong user or password from %s%s", address,
                    f" ({unlogged} more since the last such line)" if unlogged else "")

    def authorized(self, header: str | None) -> bool:
        """HTTP Basic credentials match ``admin_user`` and the password (compared in constant time)."""
        if self.password is None or not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user_ok = hmac.compare_digest(user.encode(), self.settings.admin_user.encode())
        return hmac.compare_digest(password.encode(), self.password.encode()) and user_ok


class _Handler(BaseHTTPRequestHandler):
    node_server: NodeHTTPServer
    server_version = "dicom-node"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a connection may stay silent (an idle keep-alive, a client that sends half a request)

    # -- plumbing ----------------------------------------------------------------------

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class' name
        # the query string may hold a patient ID (a search): requests are logged without it, at DEBUG
        log.debug("HTTP %s %s from %s", self.command, urlsplit(self.path).path, self.client_address[0])

    def _send(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**_SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _html(self, status: int, page: str, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, page.encode("utf-8"), "text/html; charset=utf-8", headers)

    def _message(self, status: int, title: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        self._html(status, render_message(title, message, ok=status < 400), headers)

    def _unauthorized(self) -> None:
        self._message(HTTPStatus.UNAUTHORIZED, "Password required", "This page needs the dashboard's user and "
                      "password ([http] admin_password_file).",
                      {"WWW-Authenticate": 'Basic realm="dicom-node", charset="UTF-8"'})

    # -- routes ------------------------------------------------------------------------

    def _host_allowed(self) -> bool:
        """The request's ``Host`` names this server (DNS rebinding: a page from elsewhere whose name now points
        at 127.0.0.1 sends its own name). A request without Host (HTTP/1.0 probes) is let through."""
        host = (self.headers.get("Host") or "").strip().lower()
        if not host:
            return True
        name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        settings = self.node_server.settings
        allowed = {"localhost", "::1", settings.host.lower(), *(h.lower() for h in settings.allowed_hosts)}
        return name in allowed or is_loopback_address(name)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urlsplit(self.path)
        if "Content-Length" in self.headers or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # a body is not read here: nothing of it is taken for a next request
        # /health and /metrics hold no patient data: a monitor or load balancer reaches them by any name
        if url.path not in ("/health", "/metrics") and not self._host_allowed():
            self._message(HTTPStatus.MISDIRECTED_REQUEST, "Refused", "Unknown Host ([http] allowed_hosts).")
            return
        try:
            if url.path == "/health":
                health = self.node_server.ops.health()
                body = json.dumps(health.to_json(), indent=1).encode()
                self._send(HTTPStatus.OK if health.ok else HTTPStatus.SERVICE_UNAVAILABLE, body, "application/json")
            elif url.path == "/metrics":
                self._send(HTTPStatus.OK, self.node_server.ops.metrics_exposition(), METRICS_CONTENT_TYPE)
            elif url.path == "/" and self.node_server.settings.dashboard:
                self._dashboard(url.query)
            else:
                self._message(HTTPStatus.NOT_FOUND, "Not found", "No such page.")
        except Exception:  # noqa: BLE001 - one failing page must not take the server down
            log.exception("HTTP GET %s failed", url.path)
            self._message(HTTPStatus.INTERNAL_SERVER_ERROR, "Error", "The page failed; the node's log says why.")

    do_HEAD = do_GET

    def _dashboard(self, query: str) -> None:
        server = self.node_server
        authenticated = server.authorized(self.headers.get("Authorization"))
        if server.password is not None and not authenticated:
            if self.headers.get("Authorization"):  # (a browser's first request has none: not a failed login)
                server.failed_login(self.client_address[0])
            self._unauthorized()
            return
        search = (parse_qs(query).get("q") or [""])[0][:64]
        notice = "" if server.actions_enabled else ("Read-only: the retry and reprocess actions are off "
                                                    "(set [http] admin_password_file to turn them on).")
        page = PageContext(search=search, limit=server.settings.dashboard_studies, actions=authenticated,
                           csrf=server.csrf_token, health=server.ops.health(), stages=server.ops.job_stages(),
                           notice=notice, processes=server.ops.processes())
        self._html(HTTPStatus.OK, render(server.ops.journal, page))

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        url = urlsplit(self.path)
        server = self.node_server
        action = {"/actions/retry": "retry", "/actions/reprocess": "reprocess"}.get(url.path)
        if not self._host_allowed():
            self.close_connection = True  # its body is not read: nothing of it is taken for a next request
            self._message(HTTPStatus.MISDIRECTED_REQUEST, "Refused", "Unknown Host ([http] allowed_hosts).")
            return
        declared = (self.headers.get("Content-Length") or "0").strip()
        if "Transfer-Encoding" in self.headers or not (declared.isascii() and declared.isdigit()):
            self.close_connection = True  # (a chunked or negative body would be read as the next request)
            self._message(HTTPStatus.BAD_REQUEST, "Refused", "A body needs a Content-Length of digits, not chunks.")
            return
        length = int(declared)
        if length > MAX_BODY:
            self.close_connection = True
            self._message(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "Refused", "The request is too large.")
            return
        body = self.rfile.read(length) if length > 0 else b""
        if action is None or not server.settings.dashboard:
            self._message(HTTPStatus.NOT_FOUND, "Not found", "No such action.")
            return
        who = self.client_address[0]
        if not server.actions_enabled:
            log.warning("dashboard: %s from %s refused: actions are off (no [http] admin_password_file)", action, who)
            self._message(HTTPStatus.FORBIDDEN, "Actions are off",
                          "Set [http] admin_password_file to turn the retry and reprocess actions on.")
            return
        if not server.authorized(self.headers.get("Authorization")):
            if self.headers.get("Authorization"):
                server.failed_login(who)  # (one line per address and minute, as for the page)
            else:
                log.warning("dashboard: %s from %s refused: no credentials", action, who)
            self._unauthorized()
            return
        origin = self.headers.get("Origin")
        if origin and origin != "null" and urlsplit(origin).netloc != self.headers.get("Host", ""):
            log.warning("dashboard: %s from %s refused: request from another site (Origin %s)", action, who, origin)
            self._message(HTTPStatus.FORBIDDEN, "Refused", "The request came from another site.")
            return
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        token = self.headers.get("X-CSRF-Token") or form.get("csrf", "")
        if not hmac.compare_digest(token.encode(), server.csrf_token.encode()):
            log.warning("dashboard: %s from %s refused: missing or stale CSRF token", action, who)
            self._message(HTTPStatus.FORBIDDEN, "Refused", "The form is stale or was not sent from the dashboard: "
                          "reload the dashboard and try again.")
            return
        try:
            if action == "retry":
                try:
                    job_id = int(form.get("job_id", ""))
                except ValueError:
                    raise ActionError("job_id must be a job number") from None
                message = server.ops.retry_deliveries(job_id, by=f"{server.settings.admin_user}@{who} (dashboard)")
            else:
                series_uid = form.get("series_uid", "").strip()
                if not series_uid:
                    raise ActionError("series_uid is missing")
                message = server.ops.reprocess_series(series_uid, by=f"{server.settings.admin_user}@{who} (dashboard)")
        except ActionError as exc:
            log.warning("dashboard: %s by %s from %s not done: %s", action, server.settings.admin_user, who, exc)
            self._message(HTTPStatus.CONFLICT, f"{action.capitalize()} not done", str(exc))
            return
        except Exception:  # noqa: BLE001 - the action failed: say so, keep serving
            log.exception("dashboard: %s by %s from %s failed", action, server.settings.admin_user, who)
            self._message(HTTPStatus.INTERNAL_SERVER_ERROR, "Error", "The action failed; the node's log says why.")
            return
        log.info("dashboard: %s by %s from %s: %s", action, server.settings.admin_user, who, message)
        self._message(HTTPStatus.OK, f"{action.capitalize()} done", message)


def probe_url(config: NodeConfig, path: str = "/health") -> str | None:
    """The URL of the configured node's HTTP server (None without one); a wildcard address is probed on loopback."""
    http = config.http
    if not http.port:
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(http.host, http.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{http.port}{path}"


def probe_health(config: NodeConfig, timeout: float = 1.0) -> dict[str, Any] | None:
    """The ``/health`` answer of the node configured by ``config`` (healthy or not), None when nothing that answers
    like a node listens there (or the configuration has no HTTP server). Proxies are never used."""
    url = probe_url(config)
    if url is None:
        return None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            body = response.read(65536)
    except urllib.error.HTTPError as exc:  # 503: running, a check fails
        body = exc.read(65536) if exc.code == HTTPStatus.SERVICE_UNAVAILABLE else b""
    except (OSError, ValueError):
        return None
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) and isinstance(answer.get("checks"), dict) else None


def probe_running(config: NodeConfig, timeout: float = 1.0) -> bool | None:
    """Whether the node configured by ``config`` runs: its HTTP server answers ``/health`` (timeout 1 s); None
    when the configuration has no HTTP server (``[http] port = 0``), so this cannot be told."""
    if probe_url(config) is None:
        return None
    return probe_health(config, timeout) is not None
