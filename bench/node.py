"""``dicom-node serve`` as a benchmark subject: the end-to-end tests' node process with production settings
(fsync on, a long idle timeout) and a reading of its memory."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dicom_node.config import DEFAULT_SEGMENTER, NodeSettings
from tests.e2e.node_proc import REPO, NodeProcess

__all__ = ["REPO", "BenchNode"]


class BenchNode(NodeProcess):
    """One node process on a free loopback port, its data in ``workdir/data``."""

    def __init__(self, workdir: Path, *, models_dir: Path, rules: Sequence[Mapping[str, Any]] | None = None,
                 destinations: Sequence[Mapping[str, Any]] = (), node: Mapping[str, Any] | None = None,
                 inference: Mapping[str, Any] | None = None, ae_title: str = "DICOM_NODE", role: str = "all",
                 port: int | None = None, data_dir: Path | None = None) -> None:
        super().__init__(
            workdir, models_dir=models_dir, rules=rules, destinations=destinations, ae_title=ae_title, role=role,
            port=port, data_dir=data_dir,
            # the release grace as shipped (the end-to-end harness shortens it)
            node={"fsync": True, "idle_timeout_s": 30.0, "sweep_interval_s": 1.0,
                  "release_grace_s": NodeSettings.model_fields["release_grace_s"].default, **(node or {})},
            # the node's own defaults, as in production (the e2e harness turns the segmenter off for time)
            inference={"threads": None, "segmenter": DEFAULT_SEGMENTER, **(inference or {})},
        )

    def start(self, timeout: float = 120) -> BenchNode:
        super().start(timeout)
        return self

    def status(self, key: str) -> int:
        """A ``VmHWM``/``VmRSS``-style line of /proc/<pid>/status, in kB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)
