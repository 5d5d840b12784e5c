"""``dicom-node``: the command line hospital IT uses.

    dicom-node serve [--config node.toml]
    dicom-node journal rebuild [--config node.toml] [--reprocess]
    dicom-node config check --config node.toml [--allow-missing]
    dicom-node route --config node.toml --dry-run DICOM_DIR
    dicom-node status [--config node.toml]
    dicom-node echo DEST [--config node.toml]        (DEST: a destination name or AE@host:port)
    dicom-node retry [DEST] [--config node.toml]     (re-queue deliveries that failed for good)
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from collections import defaultdict
from datetime import datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from . import __version__
from .config import ConfigError, Destination, NodeConfig, load_config
from .httpd import HTTPListenError
from .journal import JournalError, OutboxState

log = logging.getLogger("dicom_node")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    from .logsafe import install

    install()  # no patient data in the log through library warnings


def _config(args: argparse.Namespace) -> NodeConfig:
    return load_config(Path(args.config) if args.config else None)


# -- serve -----------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    os.umask(0o077)  # spool, journal and outputs hold patient data: readable by the node's user only
    config = _config(args)
    _setup_logging(config.node.log_level)
    from .service import Node

    node = Node(config)
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    node.start()
    log.info("dicom-node %s ready (data in %s)", __version__, config.node.data_dir)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        node.stop()
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
        print(f"destination {d.name}: {d.ae_title}@{d.host}:{d.port}{over}, up to {d.max_associations} association(s)")
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
    problems = readiness_problems(config, disabled)
    if problems and not args.allow_missing:
        print("NOT READY: " + "; ".join(problems) + " (--allow-missing accepts this)", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"accepted with --allow-missing: {problem}")
    return 0


def readiness_problems(config: NodeConfig, disabled_rules: int) -> list[str]:
    """What would make a valid configuration useless in service: rules without their models, nowhere to send
    the results, TLS files that cannot be loaded."""
    problems = []
    if disabled_rules:
        problems.append(f"{disabled_rules} rule(s) disabled: model not installed in {config.inference.models_dir}")
    if not config.destinations:
        problems.append("no [[destinations]]: results would only be kept on disk")
    if config.tls.port is not None:
        from .tls import server_context

        try:
            server_context(config.tls)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            problems.append(f"[tls] certificate or key cannot be loaded: {exc}")
    for dest in config.destinations:
        if dest.tls and dest.tls_ca_file is not None and not Path(dest.tls_ca_file).is_file():
            problems.append(f"destination {dest.name}: tls_ca_file {dest.tls_ca_file} not found")
    return problems


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

    installed = set(ModelRegistry(config.inference.models_dir).available())
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
        except (InvalidDicomError, AttributeError, OSError, ValueError):
            skipped += 1
            continue
        received = describe(ds)
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


def running_line(config: NodeConfig) -> str:
    """Whether the configured node runs, in one line: its HTTP server's ``/health`` answers (1 s), or not."""
    from .httpd import probe_health, probe_url

    url = probe_url(config)
    if url is None:
        return "node: unknown whether it runs ([http] port = 0: no health endpoint)"
    health = probe_health(config)
    if health is None:
        return f"node: NOT running (nothing answers {url})"
    failing = [f"{name}: {c.get('detail', '')}" for name, c in health["checks"].items() if not c.get("ok")]
    return "node: running, " + ("healthy" if not failing else "UNHEALTHY: " + "; ".join(failing))


def cmd_status(args: argparse.Namespace) -> int:
    config = _config(args)
    from .journal import Journal

    print(running_line(config))
    path = config.node.data_dir / "journal.sqlite3"
    if not path.exists():
        print(f"no journal at {path}: the node has not run with this data_dir yet")
        return 1
    journal = Journal(path)
    counts = journal.counts()
    print(f"instances received: {counts['instances']['total']}")
    print("series: " + (", ".join(f"{k} {v}" for k, v in sorted(counts['series'].items())) or "none"))
    print("jobs:   " + (", ".join(f"{k} {v}" for k, v in sorted(counts['jobs'].items())) or "none"))
    print("\nrecent series:")
    for s in journal.all_series(limit=args.limit):
        note = f" - {s.note}" if s.note else ""
        print(f"  {_ts(s.last_received)} {s.description!r:32} {s.n_instances:4d} inst  {s.state}{note}")
    print("\nrecent jobs:")
    for j in journal.jobs(limit=args.limit):
        reason = f" - {j.reason}" if j.reason else ""
        total = j.timings.get("total")
        took = f" ({total:.1f} s)" if total else ""
        print(f"  #{j.id} {_ts(j.updated_at)} rule {j.rule} v{j.version}: {j.state}{took}{reason}")
    print("\noutbox by destination:")
    rows = journal.outbox_summary()
    if not rows:
        print("  empty")
    for r in rows:
        extra = ""
        if r["state"] == OutboxState.PENDING:
            extra = f", next try {_ts(r['next_at'])}"
        if r["last_error"]:
            extra += f", last error: {r['last_error']}"
        print(f"  {r['destination']}: {r['n']} {r['state']} (tries up to {r['max_tries']}{extra})")
    journal.close()
    return 0


# -- journal rebuild -------------------------------------------------------------------------

def cmd_journal_rebuild(args: argparse.Namespace) -> int:
    config = _config(args)
    _setup_logging(config.node.log_level)
    from .journal import Journal
    from .rebuild import rebuild

    spool = config.node.data_dir / "spool"
    if not spool.is_dir():
        print(f"no spool at {spool}: nothing to rebuild from", file=sys.stderr)
        return 1
    journal = Journal(config.node.data_dir / "journal.sqlite3", fsync=config.node.fsync)
    try:
        result = rebuild(journal, spool, reprocess=args.reprocess)
    finally:
        journal.close()
    what = ("left to close and be processed at the next start" if args.reprocess
            else "marked ignored (not processed again)")
    print(f"journal rebuilt from {spool}: {result.added} instance(s) in {len(result.series)} series added, {what}")
    for path, why in result.unreadable:
        print(f"  not added: {path}: {why}", file=sys.stderr)
    return 1 if result.unreadable else 0


# -- echo ------------------------------------------------------------------------------------

_ADDRESS = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d+)$")


def cmd_echo(args: argparse.Namespace) -> int:
    config = _config(args)
    from .dispatch import echo

    match = _ADDRESS.match(args.dest)
    if match:
        dest = Destination(name="adhoc", ae_title=match["ae"], host=match["host"], port=int(match["port"]))
    else:
        try:
            dest = config.destination(args.dest)
        except KeyError:
            names = ", ".join(d.name for d in config.destinations) or "none configured"
            print(f"unknown destination {args.dest!r} (known: {names}; or give AE@host:port)", file=sys.stderr)
            return 2
    ok, message = echo(config, dest)
    print(message)
    return 0 if ok else 1


def cmd_retry(args: argparse.Namespace) -> int:
    config = _config(args)
    from .journal import Journal

    path = config.node.data_dir / "journal.sqlite3"
    if not path.exists():
        print(f"no journal at {path}: the node has not run with this data_dir yet", file=sys.stderr)
        return 1
    journal = Journal(path)
    n = journal.retry_failed(args.dest)
    journal.close()
    print(f"{n} delivery item(s) queued again; a running node sends them within "
          f"{config.dispatch.scan_interval_s:.0f} s")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import format_report

    print(format_report(Path(args.file)))
    return 0


# -- main ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-node", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help_: str) -> argparse.ArgumentParser:  # noqa: ANN001
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", "-c", help="TOML configuration (default: embedded defaults)")
        p.set_defaults(func=func)
        return p

    add("serve", cmd_serve, "run the node")
    p = sub.add_parser("config", help="configuration commands")
    csub = p.add_subparsers(dest="config_command", required=True)
    c = csub.add_parser("check", help="validate a configuration file and show what it means")
    c.add_argument("--config", "-c", required=True)
    c.add_argument("--allow-missing", action="store_true",
                   help="exit 0 even when a rule's model is not installed or no destination is configured")
    c.set_defaults(func=cmd_config_check)
    p = add("route", cmd_route, "show how the series in a folder would be routed")
    p.add_argument("--dry-run", action="store_true", help="required: only explain, never process or send")
    p.add_argument("--calling-ae", default="", help="calling AE title to assume for rules that match on it")
    p.add_argument("dicom_dir")
    p = add("status", cmd_status, "series, jobs and the outbox per destination")
    p.add_argument("--limit", type=int, default=20)
    p = add("echo", cmd_echo, "C-ECHO a destination")
    p.add_argument("dest", help="destination name from the config, or AE@host:port")
    p = add("retry", cmd_retry, "re-queue deliveries that failed for good")
    p.add_argument("dest", nargs="?", default=None, help="only this destination")
    p = sub.add_parser("journal", help="journal commands (stop the node first)")
    jsub = p.add_subparsers(dest="journal_command", required=True)
    j = jsub.add_parser("rebuild", help="add every spooled object the journal does not know (after a lost journal)")
    j.add_argument("--config", "-c", help="TOML configuration (default: embedded defaults)")
    j.add_argument("--reprocess", action="store_true",
                   help="process the rebuilt series again at the next start (default: mark them ignored)")
    j.set_defaults(func=cmd_journal_rebuild)
    p = add("report", cmd_report, "print the volumes of a volumetry SR as a table")
    p.add_argument("file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except JournalError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1
    except HTTPListenError as exc:  # [http] port taken, password file unusable
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
