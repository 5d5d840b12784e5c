"""The node as the tests run it: ``dicom-node serve`` in a subprocess with a generated config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dicom_node.config import load_config
from dicom_node.journal import Journal, open_journal

from .peers import LOCALHOST, echoscu, free_port

REPO = Path(__file__).resolve().parents[2]


#: The fixture synthesis model of the e2e ``models_dir`` fixture (tests/e2e/conftest.py).
SYNTH_MODEL = "test-synth"


def synthesis_rule(name: str, pattern: str, destination: str, *, output_name: str | None = None) -> dict[str, Any]:
    """A routing rule (TOML table) sending series whose description matches ``pattern`` to ``SYNTH_MODEL``."""
    return {"name": name, "series_description": pattern, "model": SYNTH_MODEL,
            "output_name": output_name or f"s{name}", "volumetry": False, "destinations": [destination]}


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_toml(sections: Mapping[str, Any]) -> str:
    """TOML text for a dict of tables (dict) and arrays of tables (list of dicts)."""
    lines: list[str] = []
    for name, body in sections.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{name}]]")
                lines += [f"{k} = {_toml(v)}" for k, v in item.items() if v is not None]
                lines.append("")
        else:
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml(v)}" for k, v in body.items() if v is not None]
            lines.append("")
    return "\n".join(lines)


class NodeProcess:
    """``dicom-node serve`` on a free loopback port; ``kill()`` is a real SIGKILL."""

    def __init__(
        self,
        workdir: Path,
        *,
        models_dir: Path,
        destinations: Sequence[Mapping[str, Any]] = (),
        peers: Sequence[Mapping[str, Any]] = (),
        rules: Sequence[Mapping[str, Any]] | None = None,
        node: Mapping[str, Any] | None = None,
        dispatch: Mapping[str, Any] | None = None,
        inference: Mapping[str, Any] | None = None,
        limits: Mapping[str, Any] | None = None,
        tls: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,  # other tables of the config: {"jobs": {...}, "notifications": [...]}
        retention: Mapping[str, Any] | None = None,
        http: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        ae_title: str = "DICOM_NODE",
        port: int | None = None,
        user: str | None = None,
        python: str | None = None,
        role: str = "all",
        data_dir: Path | None = None,
        module: str = "dicom_node.cli",
    ) -> None:
        # serve --role: a worker listens on nothing and shares the receiver's data_dir (ready: its log says so)
        self.role = role
        # the module run as ``python -m``: a test's own entry point may patch a step first (tests.e2e.slow_serve)
        self.module = module
        # run as this user: started as root, the process drops to it after its imports (tests.e2e.as_user)
        self.user = user
        # another interpreter (e.g. a virtual environment's, with the node installed from a wheel) runs outside the
        # repository, so that it imports what is installed there
        self.python = python
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.port = port or free_port()
        # the readiness probe must be an admitted peer
        self.probe_ae = str(peers[0]["ae_title"]) if peers else "E2E_PROBE"
        self.data_dir = Path(data_dir) if data_dir is not None else self.workdir / "data"
        # the HTTP server on a free port of its own (never the default 8080 another node may hold)
        self.http_port = int(http["port"]) if http and "port" in http else free_port(besides=(self.port,))
        self.env = dict(env or {})
        sections: dict[str, Any] = {
            "node": {
                "ae_title": ae_title, "host": LOCALHOST, "port": self.port, "data_dir": str(self.data_dir),
                "idle_timeout_s": 3.0, "sweep_interval_s": 0.5, "release_grace_s": 0.5, "log_level": "INFO",
                **(node or {}),
            },
            # the segmenter takes 20-60 s a real head: off (each model's own labels) unless a test turns it on
            "inference": {"models_dir": str(models_dir), "threads": 2, "segmenter": "", **(inference or {})},
            "dispatch": {"backoff_initial_s": 1.0, "backoff_max_s": 2.0, "scan_interval_s": 0.5,
                         **(dispatch or {})},
        }
        sections["http"] = {"host": LOCALHOST, **(http or {}), "port": self.http_port}
        if limits:
            sections["limits"] = dict(limits)
        if tls:
            sections["tls"] = dict(tls)
        if retention:
            sections["retention"] = dict(retention)
        if peers:
            sections["peers"] = list(peers)
        if destinations:
            sections["destinations"] = list(destinations)
        if rules is not None:
            sections["rules"] = list(rules)
        sections.update(extra or {})
        self.config_path = self.workdir / "node.toml"
        self.config_path.write_text(config_toml(sections))
        self.log_path = self.workdir / "node.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> NodeProcess:
        log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        command = [self.python or sys.executable, "-m", self.module, "serve", "--config", str(self.config_path),
                   *(["--role", self.role] if self.role != "all" else [])]
        if self.user:
            command = [sys.executable, "-m", "tests.e2e.as_user", self.user, "--",
                       "serve", "--config", str(self.config_path)]
            self.workdir.chmod(0o755)
            self.config_path.chmod(0o644)
        self._process = subprocess.Popen(
            command,
            cwd=self.workdir if self.python else REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"node exited with {self._process.returncode}; log:\n{self.log()}")
            if self.role in ("worker", "dispatcher"):  # no listener: ready when its log says so
                if f"role {self.role})" in self.log():
                    return self
            elif echoscu(self.port, called_ae=self.ae_title, calling_ae=self.probe_ae, timeout=5).returncode == 0:
                # a receiver sharing its port with another: the echo may have been the other's answer
                if self.role != "receiver" or "role receiver)" in self.log():
                    return self
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"node did not answer C-ECHO within {timeout} s; log:\n{self.log()}")
            time.sleep(0.2)

    @property
    def http_url(self) -> str:
        """The base URL of the node's HTTP server (``/health``, ``/metrics``, the dashboard)."""
        return f"http://{LOCALHOST}:{self.http_port}"

    @property
    def pid(self) -> int:
        assert self._process is not None, "node not started"
        return self._process.pid

    def alive(self) -> bool:
        """True while the started process runs."""
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait()
        self._process = None

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def journal(self) -> Journal:
        """The node's journal as its configuration names it (SQLite in data_dir, or PostgreSQL)."""
        return open_journal(load_config(self.config_path))

    def wait_for(self, predicate, *, timeout: float = 120, poll: float = 0.25,  # noqa: ANN001
                 what: str = "condition") -> Any:
        """Poll ``predicate(journal)`` until it returns something truthy (error if the node exits first)."""
        deadline = time.monotonic() + timeout
        while True:
            journal = self.journal()
            try:
                result = predicate(journal)
            finally:
                journal.close()
            if result:
                return result
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"node exited while waiting for {what}; log:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not reached within {timeout} s; node log:\n{self.log()[-4000:]}")
            time.sleep(poll)
