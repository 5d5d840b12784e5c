"""``dicom-node serve`` as a benchmark subject: a subprocess with a generated config and a known pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dicom_node.journal import Journal
from tests.e2e.node_proc import config_toml
from tests.e2e.peers import LOCALHOST, echoscu, free_port

REPO = Path(__file__).resolve().parents[1]


class BenchNode:
    """One node process on a free loopback port, its data in ``workdir/data``."""

    def __init__(self, workdir: Path, *, models_dir: Path, rules: Sequence[Mapping[str, Any]] | None = None,
                 destinations: Sequence[Mapping[str, Any]] = (), node: Mapping[str, Any] | None = None,
                 inference: Mapping[str, Any] | None = None, ae_title: str = "DICOM_NODE") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.port = free_port()
        self.data_dir = self.workdir / "data"
        sections: dict[str, Any] = {
            "node": {"ae_title": ae_title, "host": LOCALHOST, "port": self.port, "data_dir": str(self.data_dir),
                     "fsync": True, "idle_timeout_s": 30.0, "sweep_interval_s": 1.0, "log_level": "INFO",
                     **(node or {})},
            "inference": {"models_dir": str(models_dir), **(inference or {})},
            "dispatch": {"scan_interval_s": 0.5, "backoff_initial_s": 1.0, "backoff_max_s": 2.0},
        }
        if destinations:
            sections["destinations"] = list(destinations)
        if rules is not None:
            sections["rules"] = list(rules)
        self.config_path = self.workdir / "node.toml"
        self.config_path.write_text(config_toml(sections))
        self.log_path = self.workdir / "node.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 120) -> BenchNode:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.config_path)],
                cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while echoscu(self.port, called_ae=self.ae_title, calling_ae="BENCH_PROBE", timeout=5).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"node did not start; log:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> BenchNode:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def journal(self) -> Journal:
        return Journal(self.data_dir / "journal.sqlite3")

    def status(self, key: str) -> int:
        """A ``VmHWM``/``VmRSS``-style line of /proc/<pid>/status, in kB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def wait_for(self, predicate, *, timeout: float = 300, poll: float = 0.1, what: str = "condition"):  # noqa: ANN001, ANN201
        """Poll ``predicate(journal)`` until it returns something truthy."""
        deadline = time.monotonic() + timeout
        while True:
            journal = self.journal()
            try:
                result = predicate(journal)
            finally:
                journal.close()
            if result:
                return result
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"node exited while waiting for {what}; log:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not reached in {timeout:.0f} s; log:\n{self.log()[-3000:]}")
            time.sleep(poll)
