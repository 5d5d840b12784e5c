"""``dicom-node``: the command line hospital IT uses.

    dicom-node serve [--config node.toml]
    dicom-node journal rebuild [--config node.toml] [--reprocess]
    dicom-node config check [--config node.toml] [--allow-missing]
    dicom-node route [--config node.toml] --dry-run DICOM_DIR
    dicom-node status [--config node.toml] [--json] [--since HOURS]
    dicom-node echo DEST [--config node.toml]        (DEST: a destination name or AE@host:port)
    dicom-node retry [DEST] [--config node.toml]     (re-queue deliveries that failed for good)
    dicom-node reprocess --series UID | --study UID | --patient ID [--config node.toml]
    dicom-node purge [--dry-run] [--config node.toml] (delete what [retention] says is no longer needed)
    dicom-node report FILE                           (the volumes of a volumetry SR, or an agreement SR)

Without ``--config`` the node reads ``$DICOM_NODE_CONFIG``, else ``/etc/dicom-node/node.toml`` when it exists,
else its embedded defaults. Every error is one line on stderr (exit code 1 or 2), never a traceback;
``DICOM_NODE_DEBUG=1`` shows the traceback of an unexpected one.
"""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import BytesLengthException, InvalidDicomError

from . import __version__
from .audit import AuditTrail
from .config import ConfigError, Destination, NodeConfig, config_path, load_config
from .httpd import HTTPListenError
from .journal import (
    FollowUpRecord,
    JobRecord,
    Journal,
    JournalError,
    OutboxState,
    journal_exists,
    journal_location,
    open_journal,
)
from .lock import NodeLock, NodeRunning, ProcessLock, probe, processes
from .logs import setup_logging

log = logging.getLogger("dicom_node")


class CommandError(RuntimeError):
    """A command cannot do what was asked; the message is the one line the user sees (exit code 1)."""


def _setup_logging(config: NodeConfig) -> None:
    setup_logging(config.node.log_level, config.node.log_format, config.node.library_log_level)


def _config(args: argparse.Namespace) -> NodeConfig:
    return load_config(config_path(args.config))


def _as_data_owner(config: NodeConfig) -> None:
    """A command that writes the data directory, run by root on a directory another user owns (the node's service
    user), is refused: a journal, its WAL or a lock file it created would belong to root, and the node could not
    open them at its next start."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return
    try:
        owner = config.node.data_dir.stat().st_uid
    except OSError:
        return
    if owner != 0:
        try:
            import pwd
            name = pwd.getpwuid(owner).pw_name
        except (ImportError, KeyError):
            name = str(owner)
        raise CommandError(f"{config.node.data_dir} belongs to user {name}: run this command as that user "
                           f"(sudo -u {name} dicom-node ...); files root creates there would keep the node from "
                           "starting")


def _journal(config: NodeConfig) -> Journal:
    """The node's journal, for a command that changes it (:class:`CommandError` when the node never ran here)."""
    _as_data_owner(config)
    if not journal_exists(config):
        raise CommandError(f"no journal at {journal_location(config)}: the node has not run with this data_dir yet")
    return open_journal(config)


def _audit(config: NodeConfig, action: str, **fields: object) -> None:
    """Record an operator's action in the audit trail (as the OS user who ran the command)."""
    path = config.audit_path()
    if path is None or not path.parent.is_dir():
        return
    trail = AuditTrail(path, config.node.ae_title)
    trail.record("operator", action=action, by=getpass.getuser(), **fields)
    trail.close()


# -- serve -----------------------------------------------------------------------------------

def preflight(config: NodeConfig, *, ports: bool = True, metrics_port: int = 0) -> None:
    """What makes ``serve`` fail, checked before the models are loaded (seconds to minutes): a data directory
    the node cannot write, a port another program listens on (``ports``: not for a worker, which listens on
    none but its ``metrics_port``, if any). Raises :class:`CommandError`."""
    data_dir = config.node.data_dir
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise CommandError(f"data_dir {data_dir} cannot be used: {exc.strerror or exc}") from None
    listen = []
    if ports:
        listen.append(("[node] port", config.node.host, config.node.port))
        if config.tls.port is not None:
            listen.append(("[tls] port", config.node.host, config.tls.port))
        if config.http.port:
            listen.append(("[http] port", config.http.host, config.http.port))
    if metrics_port:
        listen.append(("the worker's metrics port", config.executor.worker_metrics_host, metrics_port))
    for what, host, port in listen:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe_socket:
            probe_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listener will
            if config.node.reuse_port and what != "[http] port":  # receivers sharing their DICOM ports
                probe_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                probe_socket.bind((host, port))
            except OSError as exc:
                raise CommandError(f"{what} {port} on {host} cannot be used: "
                                   f"{exc.strerror or exc} (another program listens there?)") from None


def _stop_event() -> threading.Event:
    """Set by SIGTERM or SIGINT."""
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return stop


def cmd_serve(args: argparse.Namespace) -> int:
    os.umask(0o077)  # spool, journal and outputs hold patient data: readable by the node's user only
    config = _config(args)
    _setup_logging(config)
    role = args.role
    metrics_port = getattr(args, "metrics_port", None)
    if metrics_port is None:
        metrics_port = config.executor.worker_metrics_port
    preflight(config, ports=role in ("all", "receiver"), metrics_port=metrics_port if role == "worker" else 0)
    check_executor(config, role)
    if config.node.reuse_port and role != "receiver":  # it turns off the port-taken check: receivers only
        raise CommandError("[node] reuse_port lets receivers of one data directory share their DICOM ports: start "
                           "this node with --role receiver, or set reuse_port = false")
    process_lock = ProcessLock(config.node.data_dir, role)
    if role == "worker":
        process_lock.acquire(role=role, started=time.time())
        try:
            clean = _serve_worker(config, process_lock, metrics_port)
        finally:
            process_lock.release()
        if not clean:  # a run goes on past the wait (the Celery pool's threads would hold the exit): leave now
            logging.shutdown()
            os._exit(0)
        return 0
    if role == "dispatcher":
        process_lock.acquire(role=role, started=time.time())
        try:
            return _serve_dispatcher(config, process_lock)
        finally:
            process_lock.release()
    lock = NodeLock(config.node.data_dir)
    try:  # receivers share the data directory (claims keep their routing and delivery apart); all keeps it
        lock.acquire(started=time.time(), role=role, shared=role == "receiver")
    except NodeRunning as exc:
        raise CommandError(str(exc)) from None
    process_lock.acquire(role=role, started=time.time())
    from .service import Node

    try:
        node = Node(config, role=role)
        stop = _stop_event()
        try:
            node.start()
        except HTTPListenError:  # [http] port taken meanwhile, password file unusable: its own one line
            node.stop()
            raise
        except OSError as exc:  # a port taken between the preflight and the bind, a file the node cannot read
            node.stop()
            raise CommandError(f"cannot start: {exc}") from None
        ports = {"dicom": node.scp.port, "tls": node.scp.tls_port}
        lock.update(started=time.time(), role=role, ports=ports)
        process_lock.update(started=time.time(), role=role, ports=ports)
        log.info("dicom-node %s ready (data in %s%s)", __version__, config.node.data_dir,
                 "" if role == "all" else f", role {role}")
        try:
            while not stop.wait(1.0):
                pass
        finally:
            node.stop()
    finally:
        process_lock.release()
        lock.release()
    return 0


def check_executor(config: NodeConfig, role: str) -> None:
    """``[executor] kind = "celery"``: only with ``--role receiver|worker``, with celery installed (the ``scale``
    extra) and the broker's password file readable; one line otherwise."""
    if config.executor.kind != "celery":
        return
    if role == "all":
        raise CommandError("[executor] kind = \"celery\" runs the jobs on worker processes: start this node with "
                           "--role receiver, and the workers with --role worker (or set kind = \"thread\")")
    try:
        import celery  # noqa: F401
        import redis  # noqa: F401
    except ImportError as exc:
        raise CommandError(f"[executor] kind = \"celery\" needs the scale extra (pip install "
                           f"'dicom-node[scale]'): {exc}") from None
    from .celery_app import BrokerConfigError, broker_url

    try:
        broker_url(config.executor)
    except BrokerConfigError as exc:
        raise CommandError(str(exc)) from None


def _serve_worker(config: NodeConfig, process_lock: ProcessLock, metrics_port: int) -> bool:
    """``serve --role worker``: claim and run queued jobs of the data directory until SIGTERM or SIGINT; False
    when a run was abandoned at the stop (still going after the wait)."""
    from .worker import Worker

    worker = Worker(config, metrics_port=metrics_port)
    stop = _stop_event()
    process_lock.update(role="worker", started=time.time(), worker=worker.id, metrics_port=metrics_port,
                        executor=config.executor.kind)
    try:
        try:
            worker.start()
        except OSError as exc:  # the metrics port taken since the preflight
            raise CommandError(f"cannot start the worker: {exc.strerror or exc}") from None
        log.info("dicom-node %s ready (data in %s, role worker)", __version__, config.node.data_dir)
        while not stop.wait(1.0):
            pass
    finally:
        clean = worker.stop()
    return clean


def _serve_dispatcher(config: NodeConfig, process_lock: ProcessLock) -> int:
    """``serve --role dispatcher``: deliver the journal's outbox until SIGTERM or SIGINT."""
    from .delivery import DeliveryProcess

    process = DeliveryProcess(config)
    stop = _stop_event()
    process_lock.update(role="dispatcher", started=time.time(), worker=process.id)
    try:
        process.start()
        log.info("dicom-node %s ready (data in %s, role dispatcher)", __version__, config.node.data_dir)
        while not stop.wait(1.0):
            pass
    finally:
        process.stop()
    return 0


# -- config check ----------------------------------------------------------------------------

def cmd_config_check(args: argparse.Namespace) -> int:
    config = _config(args)
    from inference.models import ModelRegistry

    installed = ModelRegistry(config.inference.models_dir).available()
    n = config.node
    print(f"node: {n.ae_title} on {n.host}:{n.port}, data in {n.data_dir}")
    tls = config.tls
    if tls.port is not None:
        mutual = "client certificate required" if tls.require_client_cert else (
            "client certificates verified when presented" if tls.ca_file else "no client certificates")
        print(f"TLS: port {tls.port}, TLS {tls.min_version} or newer, {mutual}")
    peers = ", ".join(f"{p.ae_title}@{p.host or 'any host'}{' (TLS)' if p.tls or p.tls_common_name else ''}"
                      for p in config.peers)
    print(f"peers: {peers or 'none (any AE accepted)'}")
    for d in config.destinations:
        over = " over TLS" if d.tls else ""
        if d.protocol == "stow-rs":
            print(f"destination {d.name}: STOW-RS {d.url}, {d.stow_batch} object(s) per request")
        else:
            print(f"destination {d.name}: {d.address}{over}, up to {d.max_associations} association(s)")
    print(f"models in {config.inference.models_dir}: {', '.join(sorted(installed)) or 'none'}")
    segmenter = config.inference.segmenter
    note = ""
    if segmenter and segmenter not in installed:
        note = " [NOT INSTALLED: rules with volumetry disabled]"
    elif segmenter and installed[segmenter].task != "segmentation":
        note = " [NOT A SEGMENTATION MODEL: rules with volumetry disabled]"
        installed = {k: v for k, v in installed.items() if k != segmenter}
    print(f"segmenter: {segmenter or 'none (each rule model segments)'}{note}")
    disabled = 0
    for rule in config.rules:
        dests = ", ".join(d.name for d in config.destinations_for(rule)) or "none (kept on disk)"
        state = "ok"
        missing = [m for m in config.models_for(rule) if m not in installed]
        if missing:
            state = f"DISABLED: model {missing[0]!r} not installed"
            disabled += 1
        print(f"rule {rule.name}: /{rule.series_description}/i → {rule.action} {rule.model or ''}"
              f" as {rule.output_name}, to {dests} [{state}]")
    print("configuration is valid" + (f"; {disabled} rule(s) disabled" if disabled else ""))
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    problems = readiness_problems(config, disabled)
    if problems and not args.allow_missing:
        print("NOT READY: " + "; ".join(problems) + " (--allow-missing accepts this)", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"accepted with --allow-missing: {problem}")
    return 0


def readiness_problems(config: NodeConfig, disabled_rules: int) -> list[str]:
    """What would make a valid configuration useless in service, or keep the node from starting: rules without
    their models, nowhere to send the results, TLS files that cannot be loaded or a certificate past its date,
    secret files that cannot be read, an audit file that cannot be written, CUDA asked for and absent."""
    problems = []
    if disabled_rules:
        problems.append(f"{disabled_rules} rule(s) disabled: model not installed in {config.inference.models_dir}")
    if not config.destinations:
        problems.append("no [[destinations]]: results would only be kept on disk")
    problems += _tls_problems(config)
    for dest in config.destinations:
        if dest.tls and dest.tls_ca_file is not None and not Path(dest.tls_ca_file).is_file():
            problems.append(f"destination {dest.name}: tls_ca_file {dest.tls_ca_file} not found")
        for name in ("password_file", "token_file"):
            secret = getattr(dest, name)
            if secret is not None and not _readable(Path(secret)):
                problems.append(f"destination {dest.name}: {name} {secret} cannot be read: every delivery would fail")
    if config.http.port and config.http.dashboard and config.http.admin_password_file is not None:
        from .httpd import HTTPListenError, load_password

        try:
            load_password(config.http.admin_password_file)
        except HTTPListenError as exc:
            problems.append(f"{exc}: the node would not start")
    audit = config.audit_path()
    if audit is not None and not _writable_file(audit):
        problems.append(f"[audit] path {audit} cannot be written: the node would not start")
    if config.inference.providers == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            # a warning: a receiver or dispatcher of a shared configuration loads no model here
            print("warning: [inference] providers = \"cuda\", but this onnxruntime has no CUDA provider: a node or "
                  "worker here would not start (install onnxruntime-gpu, or use \"auto\")", file=sys.stderr)
    return problems


def config_warnings(config: NodeConfig) -> list[str]:
    """What works but should be looked at: secret files every user of the machine can read (a PACS or journal
    password, a token, the TLS key, the dashboard's password: 0600 for the node's user, or 0640 with its group, is the
    norm; a Kubernetes secret is mounted 644 unless told), and peers whose host does not resolve (nobody is admitted
    under that AE title)."""
    warnings = []
    secrets = [("[tls] key_file", config.tls.key_file), ("[http] admin_password_file", config.http.admin_password_file),
               ("[journal] password_file", config.journal.password_file),
               ("[executor] broker_password_file", config.executor.broker_password_file)]
    for dest in config.destinations:
        secrets += [(f"destination {dest.name}: {name}", getattr(dest, name))
                    for name in ("password_file", "token_file")]
    for what, path in secrets:
        if path is None:
            continue
        try:
            mode = Path(path).stat().st_mode
        except OSError:  # missing or unreadable: readiness_problems says so
            continue
        if mode & 0o004:
            warnings.append(f"{what} {path} is readable by every user (mode {mode & 0o777:03o}): chmod o-r (0600 "
                            "for the node's user, or 0640 with its group)")
    hosts = sorted({peer.host for peer in config.peers if peer.host})
    unresolved, unchecked = _unresolved(hosts)
    for peer in config.peers:
        if peer.host in unresolved:
            warnings.append(f"peer {peer.ae_title}: host {peer.host!r} does not resolve: no association under that "
                            "AE title is admitted")
    if unchecked:
        warnings.append(f"peer host(s) {', '.join(unchecked)} not checked: the name service did not answer within "
                        f"{RESOLVE_WAIT_S:g} s")
    return warnings


#: How long ``config check`` waits for the name service to resolve every peer's host (it runs before each start)
RESOLVE_WAIT_S = 5.0


def _unresolved(hosts: Sequence[str]) -> tuple[set[str], list[str]]:
    """(the hosts that do not resolve, those not answered within RESOLVE_WAIT_S), looked up at once: a slow name
    service costs a start at most RESOLVE_WAIT_S, not a timeout per peer."""
    names = []
    for host in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            names.append(host)
    answers: dict[str, bool] = {}

    def look_up(host: str) -> None:
        answers[host] = _resolves(host)

    # daemon threads: a lookup the name service never answers does not hold the command at its exit
    threads = [threading.Thread(target=look_up, args=(host,), name="resolve", daemon=True) for host in names]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + RESOLVE_WAIT_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    answered = dict(answers)
    return {h for h, ok in answered.items() if not ok}, [h for h in names if h not in answered]


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
        return True
    except (OSError, UnicodeError):  # UnicodeError: a name the IDNA codec refuses ("pacs..lan")
        return False


def _tls_problems(config: NodeConfig) -> list[str]:
    from .tls import certificate_not_after, server_context

    problems = []
    if config.tls.port is not None:
        try:
            server_context(config.tls)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            problems.append(f"[tls] certificate or key cannot be loaded: {exc}")
    if config.tls.cert_file is not None:
        not_after = certificate_not_after(Path(config.tls.cert_file))
        if not_after is not None and not_after <= time.time():
            problems.append(f"[tls] certificate {config.tls.cert_file} expired on "
                            f"{time.strftime('%Y-%m-%d', time.gmtime(not_after))}: peers will refuse it")
        elif not_after is not None and not_after - time.time() < CERT_WARN_DAYS * 86400:
            print(f"warning: [tls] certificate {config.tls.cert_file} expires on "
                  f"{time.strftime('%Y-%m-%d', time.gmtime(not_after))}", file=sys.stderr)
    return problems


def _readable(path: Path) -> bool:
    try:
        with path.open("rb"):
            return True
    except OSError:
        return False


def _writable_file(path: Path) -> bool:
    """Whether ``path`` can be appended to, or created (its nearest existing folder writable)."""
    try:
        if path.exists():
            return os.access(path, os.W_OK)
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)
    except OSError:  # a folder this user may not look into (the node's 0700 data_dir): the node's user can
        return True


# -- route --dry-run -------------------------------------------------------------------------

def cmd_route(args: argparse.Namespace) -> int:
    if not args.dry_run:
        print("route only works with --dry-run (it never sends anything)", file=sys.stderr)
        return 2
    config = _config(args)
    from inference.models import ModelRegistry

    from .assembly import completeness
    from .headers import SeriesAttributes, describe
    from .journal import InstanceRecord
    from .routing import route
    from .service import prepare_models

    # the models as the node takes them (a segmenter that is not a segmentation model disables volumetry)
    installed = prepare_models(config, ModelRegistry(config.inference.models_dir), warm=False)
    root = Path(args.dicom_dir)
    if not root.is_dir():
        print(f"{root}: not a directory", file=sys.stderr)
        return 2
    series: dict[str, list[InstanceRecord]] = defaultdict(list)
    attrs_of: dict[str, SeriesAttributes] = {}
    skipped = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = dcmread(path, stop_before_pixels=True)
            uid = str(ds.SeriesInstanceUID)
            received = describe(ds)  # a header value it cannot read (InstanceNumber "1e999"): skipped
        except (InvalidDicomError, AttributeError, OSError, ValueError, TypeError, OverflowError, RecursionError,
                BytesLengthException):
            skipped += 1
            continue
        attrs_of.setdefault(uid, received.series)
        series[uid].append(InstanceRecord(received.sop_instance_uid, uid, received.sop_class_uid, "", str(path),
                                          received.header))
    for uid, instances in series.items():
        attrs = attrs_of[uid]
        decision = route(config, attrs, uid, calling_ae=args.calling_ae, installed_models=installed)
        whole = completeness(instances)
        print(f"series {attrs.series_number} {attrs.series_description!r} ({len(instances)} instances, {uid})")
        print(f"  assembly: {'whole' if whole.whole else 'NOT whole'}: {whole.reason}")
        for line in decision.trace:
            print(f"  {line}")
        print(f"  → {decision.reason}")
    if skipped:
        print(f"({skipped} non-DICOM file(s) skipped)")
    if not series:
        print("no DICOM series found")
    return 0


# -- status ----------------------------------------------------------------------------------

def _ts(value: float | None) -> str:
    return "-" if not value else datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")


#: ``status`` exit codes: failures to look at (failed jobs in the window, deliveries failed for good), and
#: the node not running (as ``systemctl status`` and monitoring plugins read 3).
STATUS_FAILURES = 1
STATUS_NOT_RUNNING = 3
#: `config check` warns when the TLS certificate expires within this many days
CERT_WARN_DAYS = 30
STATUS_UNKNOWN = 4  #: status could not be read (the data directory is not readable by the user who asked)


def _job_json(j: JobRecord, follow_ups: Sequence[FollowUpRecord] = ()) -> dict[str, Any]:
    return {"id": j.id, "series_uid": j.series_uid, "version": j.version, "rule": j.rule, "model": j.model,
            "state": str(j.state), "reason": j.reason, "optional_failed": j.optional_failed,
            "updated_at": j.updated_at, "timings": j.timings,
            "follow_ups": [{"id": f.id, "step": f.step, "state": str(f.state), "reason": f.reason,
                            "attempts": f.attempts, "updated_at": f.updated_at} for f in follow_ups]}


def status_report(config: NodeConfig, limit: int, since_h: float) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (``--json`` prints it as it is)."""
    from .httpd import probe_health, probe_url
    from .journal import JobState

    holder = probe(config.node.data_dir)
    url = probe_url(config)
    # the lock tells a node on this machine; its /health (when [http] is on) tells whether it is healthy
    health = probe_health(config) if url is not None else None
    failing = [f"{name}: {c.get('detail', '')}" for name, c in (health or {}).get("checks", {}).items()
               if not c.get("ok")]
    node = {"running": holder.running or health is not None, "pid": holder.pid, "started": holder.started,
            "ports": holder.ports, "data_dir": str(config.node.data_dir), "ae_title": config.node.ae_title,
            "health_url": url, "health": health, "unhealthy": failing,
            "processes": processes(config.node.data_dir)}
    path = journal_location(config)
    if not journal_exists(config):
        return {"node": node, "journal": None, "problems": [f"no journal at {path}: the node has not run with "
                                                             "this data_dir yet"]}
    journal = open_journal(config, read_only=True)  # status never creates, upgrades or locks the journal
    try:
        cutoff = time.time() - since_h * 3600
        failed_jobs = [j for j in journal.jobs(states=[JobState.FAILED], limit=1000) if j.updated_at >= cutoff]
        counts = journal.counts()
        report: dict[str, Any] = {
            "node": node,
            "journal": path,
            "counts": counts,
            "failures": {"since_hours": since_h, "jobs": [_job_json(j) for j in failed_jobs],
                         "deliveries_failed": counts["outbox"].get(OutboxState.FAILED, 0)},
            "series": [{"series_uid": s.series_uid, "description": s.description, "instances": s.n_instances,
                        "state": str(s.state), "note": s.note, "last_received": s.last_received,
                        "purged_at": s.purged_at, "purged_instances": s.purged_instances}
                       for s in journal.all_series(limit=limit)],
            "jobs": [_job_json(j, journal.follow_ups(j.id)) for j in journal.jobs(limit=limit)],
            "outbox": journal.outbox_summary(),
        }
    finally:
        journal.close()
    problems = [f"UNHEALTHY: {'; '.join(failing)}"] if failing else []
    if holder.running and url is not None and health is None:
        problems.append(f"the node runs but {url} does not answer")
    if failed_jobs:
        problems.append(f"{len(failed_jobs)} job(s) failed in the last {since_h:g} h")
    now = time.time()
    for row in report["outbox"]:
        since = row.get("failing_since")
        if row["state"] == OutboxState.PENDING and since and now - since >= config.dispatch.alert_after_s:
            problems.append(f"deliveries to {row['destination']} failing for {(now - since) / 60:.0f} min "
                            f"({row['n']} item(s) waiting; last error: {row['last_error'] or '?'})")
    if report["failures"]["deliveries_failed"]:
        problems.append(f"{report['failures']['deliveries_failed']} delivery item(s) failed for good "
                        "(`dicom-node retry` queues them again)")
    report["problems"] = problems
    return report


def _print_job(j: dict[str, Any]) -> None:
    """One job of ``status``, and a line for each of its follow-ups."""
    reason = f" - {j['reason']}" if j["reason"] else ""
    reason += f" (optional step failed: {j['optional_failed']})" if j["optional_failed"] else ""
    total = j["timings"].get("total")
    took = f" ({total:.1f} s)" if total else ""
    print(f"  #{j['id']} {_ts(j['updated_at'])} rule {j['rule']} v{j['version']}: {j['state']}{took}{reason}")
    for f in j["follow_ups"]:
        note = f" - {f['reason']}" if f["reason"] else ""
        print(f"      follow-up {f['step']}: {f['state'].upper() if f['state'] == 'failed' else f['state']}{note}")


def _print_status(report: dict[str, Any]) -> None:
    node = report["node"]
    if node["running"]:
        ports = node.get("ports") or {}
        where = f", DICOM port {ports['dicom']}" if ports.get("dicom") else ""
        if node["health_url"] is None:
            health = "health unknown ([http] port = 0)"
        elif node["health"] is None:
            health = f"NOT ANSWERING {node['health_url']}"
        else:
            health = "UNHEALTHY: " + "; ".join(node["unhealthy"]) if node["unhealthy"] else "healthy"
        print(f"node: RUNNING (process {node['pid'] or '?'}{where}), {health}; data in {node['data_dir']}")
    else:
        print(f"node: NOT RUNNING (data in {node['data_dir']})")
    for process in node["processes"]:
        worker = f" as {process['worker']}" if process.get("worker") else ""
        metrics = f", /metrics on port {process['metrics_port']}" if process.get("metrics_port") else ""
        print(f"  process {process.get('pid', '?')}: {process.get('role', '?')}{worker}{metrics}")
    if report["journal"] is None:
        print(report["problems"][0])
        return
    counts = report["counts"]
    purged = counts["purged"]
    print(f"instances received: {counts['instances']['total'] + purged['instances']}"
          + (f" ({purged['instances']} deleted by retention, from {purged['series']} series)"
             if purged["series"] else ""))
    print("series: " + (", ".join(f"{k} {v}" for k, v in sorted(counts['series'].items())) or "none"))
    print("jobs:   " + (", ".join(f"{k} {v}" for k, v in sorted(counts['jobs'].items())) or "none"))
    if counts.get("follow_ups"):
        print("follow-ups (optional steps of written jobs): "
              + ", ".join(f"{k} {v}" for k, v in sorted(counts["follow_ups"].items())))
    print("\nrecent series:")
    for s in report["series"]:
        note = f" - {s['note']}" if s["note"] else ""
        if s["purged_at"]:
            note += f" [{s['purged_instances']} inst deleted {_ts(s['purged_at'])}]"
        print(f"  {_ts(s['last_received'])} {s['description']!r:32} {s['instances']:4d} inst  {s['state']}{note}")
    print("\nrecent jobs:")
    for j in report["jobs"]:
        _print_job(j)
    print("\noutbox by destination:")
    if not report["outbox"]:
        print("  empty")
    for r in report["outbox"]:
        extra = ""
        if r["state"] == OutboxState.PENDING:
            extra = f", next try {_ts(r['next_at'])}"
        if r["last_error"]:
            extra += f", last error: {r['last_error']}"
        print(f"  {r['destination']}: {r['n']} {r['state']} (tries up to {r['max_tries']}{extra})")
    if report["problems"]:
        print("\nNEEDS ATTENTION: " + "; ".join(report["problems"]))


def cmd_status(args: argparse.Namespace) -> int:
    config = _config(args)
    try:
        report = status_report(config, args.limit, args.since)
    except PermissionError as exc:  # not "running, with failures" (1) to a monitoring check run as another user
        print(f"dicom-node: status unknown: {exc} (run it as the node's user)", file=sys.stderr)
        return STATUS_UNKNOWN
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_status(report)
    if not report["node"]["running"]:
        return STATUS_NOT_RUNNING  # first: a node that is down must not read as "some failures" to monitoring
    return STATUS_FAILURES if report["journal"] is not None and report["problems"] else 0


# -- journal rebuild -------------------------------------------------------------------------

def cmd_journal_rebuild(args: argparse.Namespace) -> int:
    config = _config(args)
    _setup_logging(config)
    from .rebuild import rebuild

    spool = config.node.data_dir / "spool"
    if not spool.is_dir():
        print(f"no spool at {spool}: nothing to rebuild from", file=sys.stderr)
        return 1
    _as_data_owner(config)
    lock = NodeLock(config.node.data_dir)
    try:  # held as a serving node holds it: none starts meanwhile, and none may be running
        lock.acquire(command="journal rebuild")
    except NodeRunning as exc:
        print(f"{exc}: stop it first (beside a running node, a rebuild would mark the series still arriving as "
              "ignored)", file=sys.stderr)
        return 1
    try:
        journal = open_journal(config)
        try:
            result = rebuild(journal, spool, reprocess=args.reprocess)
        finally:
            journal.close()
    finally:
        lock.release()
    what = ("left to close and be processed at the next start" if args.reprocess
            else "marked ignored (not processed again)")
    print(f"journal rebuilt from {spool}: {result.added} instance(s) in {len(result.series)} series added, {what}")
    for path, why in result.unreadable:
        print(f"  not added: {path}: {why}", file=sys.stderr)
    return 1 if result.unreadable else 0


# -- echo ------------------------------------------------------------------------------------

#: AE@host:port, an IPv6 address in brackets (AE@[::1]:104)
_ADDRESS = re.compile(r"^(?P<ae>[^@]{1,16})@(?:\[(?P<host6>[0-9A-Fa-f:.%\w]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d+)$")


def cmd_echo(args: argparse.Namespace) -> int:
    config = _config(args)
    from .dispatch import echo

    match = _ADDRESS.match(args.dest)
    if args.dest.startswith(("http://", "https://")):
        dest = Destination(name="adhoc", protocol="stow-rs", url=args.dest)
    elif match:
        dest = Destination(name="adhoc", ae_title=match["ae"], host=match["host6"] or match["host"],
                           port=int(match["port"]))
    else:
        try:
            dest = config.destination(args.dest)
        except KeyError:
            names = ", ".join(d.name for d in config.destinations) or "none configured"
            print(f"unknown destination {args.dest!r} (known: {names}; or give AE@host:port or a DICOMweb URL)",
                  file=sys.stderr)
            return 1  # an error (as `retry NAME`); 2 is an invalid configuration
    ok, message = echo(config, dest)
    print(message)
    return 0 if ok else 1


def cmd_retry(args: argparse.Namespace) -> int:
    config = _config(args)
    journal = _journal(config)
    if args.dest is not None and all(d.name != args.dest for d in config.destinations):
        journal.close()
        names = ", ".join(d.name for d in config.destinations) or "none configured"
        print(f"no destination named {args.dest!r} ([[destinations]]: {names})", file=sys.stderr)
        return 1
    n = journal.retry_failed(args.dest)
    journal.close()
    _audit(config, "retry", destination=args.dest, items=n)
    print(f"{n} delivery item(s) queued again; a running node sends them within "
          f"{config.dispatch.scan_interval_s:.0f} s")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    config = _config(args)
    _setup_logging(config)
    from .retention import Retention

    settings = config.retention
    journal = _journal(config)
    if not settings.enabled:
        journal.close()
        print("retention is disabled ([retention] enabled = false): nothing deleted")
        return 0
    try:
        result = Retention(config, journal).sweep(dry_run=args.dry_run)
    finally:
        journal.close()
    if not args.dry_run:
        _audit(config, "purge", series=[c.series_uid for c in result.series], instances=result.instances)
    verb = "would delete" if args.dry_run else "deleted"
    for c in result.series:
        why = "delivered" if c.delivered else "not processed"
        print(f"  {verb}: series {c.description!r} ({c.series_uid}), {c.state}, {why}, last change "
              f"{_ts(c.settled_at)}: {c.instances} instance(s), outputs of {len(c.jobs)} job(s)")
    print(f"{verb} {len(result.series)} series ({result.instances} instance(s), outputs of {result.jobs} job(s))"
          + ("" if args.dry_run else f", {result.files} file(s) and folder(s), {result.bytes_freed / 1e6:.1f} MB")
          + f"; policy: {settings.delivered_days:g} day(s) after delivery, {settings.not_processed_days:g} day(s)"
          " when not processed")
    if result.undeleted:
        print(f"{len(result.undeleted)} file(s) or folder(s) could not be deleted (see the log); they stay recorded "
              "and are tried again at the next sweep")
    return 1 if result.refused or result.undeleted else 0


def cmd_reprocess(args: argparse.Namespace) -> int:
    config = _config(args)

    journal = _journal(config)
    try:
        marked = journal.request_reprocess(series_uid=args.series, study_uid=args.study, patient_id=args.patient)
        described = [journal.series(uid) for uid in marked]
    finally:
        journal.close()
    _audit(config, "reprocess", series_uid=args.series, study_uid=args.study, patient_id=args.patient,
           series=marked)
    if not marked:
        print("no stored series to reprocess (not found, the node's own outputs, still receiving, or a job queued "
              "or running)", file=sys.stderr)
        return 1
    for s in described:
        if s is not None:
            print(f"  {s.description!r} ({s.series_uid}): version {s.version}")
    print(f"{len(marked)} series marked for reprocessing with the current rules; a running node routes them within "
          f"{config.node.sweep_interval_s:.0f} s, a stopped one when it starts")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import ReportError, format_report

    path = Path(args.file)
    if not path.is_file():
        raise CommandError(f"{path}: no such file")
    try:
        print(format_report(path), end="")
    except ReportError as exc:
        raise CommandError(str(exc)) from None
    return 0


# -- main ------------------------------------------------------------------------------------

#: What adds one subcommand: ``add(name, func, help, description)`` → its parser (with ``--config``).
_AddCommand = Callable[..., argparse.ArgumentParser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-node", description=__doc__.split("\n")[0].strip("`: ") or None,
        epilog="Without --config: $DICOM_NODE_CONFIG, else /etc/dicom-node/node.toml when it exists, else the "
               "embedded defaults.")
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def adder(subparsers: argparse._SubParsersAction) -> _AddCommand:  # type: ignore[type-arg]
        def add(name: str, func: Callable[[argparse.Namespace], int], help_: str,
                description: str | None = None) -> argparse.ArgumentParser:
            p = subparsers.add_parser(name, help=help_, description=description or help_)
            p.add_argument("--config", "-c", metavar="TOML",
                           help="configuration file (default: $DICOM_NODE_CONFIG, else /etc/dicom-node/node.toml, "
                                "else the embedded defaults)")
            p.set_defaults(func=func)
            return p
        return add

    def group(name: str, help_: str) -> _AddCommand:
        p = sub.add_parser(name, help=help_, description=f"{help_[0].upper()}{help_[1:]}.")
        return adder(p.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND"))

    add = adder(sub)
    serve = add("serve", cmd_serve, "run the node (DICOM listener, jobs, delivery)",
                "Run the node in the foreground until SIGTERM or SIGINT. Refuses to start (one line, exit 1) when "
                "the data directory cannot be written, a port is taken, or another node serves the same data "
                "directory.")
    serve.add_argument("--role", choices=("all", "receiver", "worker", "dispatcher"), default="all",
                       help="all (default): everything in one process; receiver: listener, routing, delivery, "
                            "retention, jobs left queued (or, with [executor] kind = \"celery\", published) for "
                            "workers (several receivers may share a data_dir); worker: claims and runs the queued "
                            "jobs of the same data_dir (any number); dispatcher: delivers the outbox (any number)")
    serve.add_argument("--metrics-port", type=_port, default=None, metavar="PORT",
                       help="a worker's own /metrics on this port (overrides [executor] worker_metrics_port; "
                            "0: none)")
    group("config", "configuration commands")(
        "check", cmd_config_check, "validate a configuration file and show what it means",
        "Validate the configuration and print what it means; exit 1 when a rule's model is "
        "missing, there is no destination or the TLS certificate cannot be loaded (unless --allow-missing), "
        "2 when it is invalid.",
    ).add_argument("--allow-missing", action="store_true",
                   help="exit 0 even when a rule's model is not installed, no destination is configured or the "
                        "TLS certificate cannot be loaded")
    _add_file_tools(add)
    _add_operations(add)
    rebuild = group("journal", "journal commands (stop the node first)")
    rebuild("rebuild", cmd_journal_rebuild, "add every spooled object the journal does not know (after a lost "
            "journal)", "Add every spooled object the journal does not know, e.g. after the journal was lost or "
            "restored from an older backup.").add_argument(
        "--reprocess", action="store_true",
        help="process the rebuilt series again at the next start (default: mark them ignored)")
    return parser


def _add_file_tools(add: _AddCommand) -> None:
    """The subcommands that read DICOM files, not the node's data: route --dry-run, report."""
    p = add("route", cmd_route, "show how the series in a folder would be routed",
            "Explain, for each series of DICOM files in a folder, whether it is whole and which rule it would "
            "take. Never processes or sends anything.")
    p.add_argument("--dry-run", action="store_true", help="required: only explain, never process or send")
    p.add_argument("--calling-ae", default="", help="calling AE title to assume for rules that match on it")
    p.add_argument("dicom_dir", help="folder of DICOM files (searched recursively)")
    p = add("report", cmd_report, "print a volumetry or agreement SR as a table",
            "Print the content of a volumetry SR (volumes, ICV, asymmetry, quality control) or of an agreement SR "
            "(image agreement, registration, Dice and ASPC). The configuration is not needed.")
    p.add_argument("file", help="the SR file (DICOM)")


def _add_operations(add: _AddCommand) -> None:
    """The subcommands an operator runs on a node's data: status, echo, retry, reprocess, purge."""
    p = add("status", cmd_status, "whether the node runs; series, jobs and the outbox per destination",
            f"Whether the node runs, what it received, its jobs and deliveries. Exit code 0: running and "
            f"nothing failed; {STATUS_FAILURES}: jobs failed in the last --since hours or deliveries failed for "
            f"good; {STATUS_NOT_RUNNING}: the node is not running; {STATUS_UNKNOWN}: unknown (the data directory "
            f"cannot be read by this user).")
    p.add_argument("--limit", type=int, default=20, help="recent series and jobs to list (default 20)")
    p.add_argument("--since", type=float, default=24.0, metavar="HOURS",
                   help="failed jobs younger than this count as failures (default 24)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p = add("echo", cmd_echo, "C-ECHO a destination (a QIDO-RS search of a STOW-RS one)")
    p.add_argument("dest", help="destination name from the config, AE@host:port, or a DICOMweb URL")
    p = add("retry", cmd_retry, "re-queue deliveries that failed for good",
            "Queue again every delivery item that failed for good; a running node sends them at its next scan.")
    p.add_argument("dest", nargs="?", default=None, help="only this destination")
    p = add("reprocess", cmd_reprocess,
            "route stored series again with the current rules; their outputs are a new version (v2, ...)",
            "Route stored series again with the current rules (after a rule change, or a failure fixed); their "
            "outputs are a new version. A running node picks them up at its next sweep, a stopped one at start. "
            "Exit 1 when no series could be marked.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--series", metavar="UID", help="one series (SeriesInstanceUID)")
    which.add_argument("--study", metavar="UID", help="every series of a study (StudyInstanceUID)")
    which.add_argument("--patient", metavar="ID", help="every series of a patient (PatientID)")
    p = add("purge", cmd_purge, "delete received instances and outputs that [retention] no longer keeps",
            "Run a retention sweep now ([retention]): delete the received instances and outputs of series no "
            "longer needed. Safe while the node runs; the journal keeps what was received and sent.")
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")


def _port(text: str) -> int:
    """A TCP port number (0-65535; 0: none) from the command line."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number (0-65535): {port}")
    return port


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except (JournalError, CommandError) as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1
    except HTTPListenError as exc:  # [http] port taken, password file unusable
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dicom-node: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the user; the traceback on request
        if os.environ.get("DICOM_NODE_DEBUG"):
            raise
        where = f"{args.command} " if getattr(args, "command", None) else ""
        print(f"dicom-node: {where}failed: {type(exc).__name__}: {exc} (DICOM_NODE_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
