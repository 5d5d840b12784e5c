"""P1 ingest (node vs dcmtk storescp vs Orthanc) and P4 concurrency (8 senders to the node)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.peers import Orthanc, StoreSCP, echoscu, free_port

from .node import REPO, BenchNode
from .send import send, send_parallel, write_profile

TARGETS = ("node", "storescp", "orthanc", "node-no-fsync", "pynetdicom-bare")
#: The goal compares node and storescp; "node-no-fsync" (what durability costs) and "pynetdicom-bare" (a
#: pynetdicom SCP that keeps nothing: the ceiling of the library the node is built on) are references.


@dataclass
class IngestResult:
    images: int
    seconds: dict[str, list[float]] = field(default_factory=lambda: {t: [] for t in TARGETS})

    def rates(self, target: str) -> list[float]:
        return [self.images / s for s in self.seconds[target]]


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(what)


def _node_run(folder: Path, profile: Path, work: Path, empty_models: Path, images: int, *,
              fsync: bool = True) -> float:
    with BenchNode(work / "node", models_dir=empty_models, node={"fsync": fsync}) as node:
        result = send(folder, profile, node.port, called_ae=node.ae_title)
        _check(result.ok, f"node: storescu failed: {result.failures or result.output[-2000:]}")
        journal = node.journal()
        try:
            n = journal.counts()["instances"]["total"]
        finally:
            journal.close()
        _check(n == images, f"node journal holds {n} instances, {images} were sent")
    return result.seconds


def _storescp_run(folder: Path, profile: Path, work: Path, images: int) -> float:
    with StoreSCP(work / "storescp") as scp:
        result = send(folder, profile, scp.port, called_ae=scp.aet)
        _check(result.ok, f"storescp: storescu failed: {result.failures or result.output[-2000:]}")
        _check(len(scp.wait_for_files(images, timeout=30)) == images, "storescp file count")
    return result.seconds


def _bare_run(folder: Path, profile: Path, images: int) -> float:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "bench.bare_scp", str(port), "BARE_SCP"], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while echoscu(port, called_ae="BARE_SCP", timeout=5).returncode != 0:
            _check(process.poll() is None and time.monotonic() < deadline, "bare pynetdicom SCP did not start")
            time.sleep(0.1)
        result = send(folder, profile, port, called_ae="BARE_SCP")
        _check(result.ok, f"bare SCP: storescu failed: {result.failures or result.output[-2000:]}")
    finally:
        process.terminate()
        process.wait(timeout=10)
    return result.seconds


def _orthanc_run(folder: Path, profile: Path, work: Path, images: int) -> float:
    with Orthanc(workdir=work / "orthanc") as orthanc:
        result = send(folder, profile, orthanc.dicom_port, called_ae=orthanc.aet)
        _check(result.ok, f"orthanc: storescu failed: {result.failures or result.output[-2000:]}")
        n = int(orthanc.get("/statistics")["CountInstances"])
        _check(n == images, f"Orthanc holds {n} instances, {images} were sent")
    return result.seconds


def ingest(folder: Path, images: int, runs: int, log=print) -> IngestResult:  # noqa: ANN001
    """``runs`` interleaved rounds over ``TARGETS``, each receiver fresh and empty every run."""
    out = IngestResult(images)
    with tempfile.TemporaryDirectory(prefix="bench-p1-") as tmp:
        tmp_path = Path(tmp)
        profile = write_profile(folder, tmp_path / "storescu.cfg")
        empty_models = tmp_path / "no-models"
        empty_models.mkdir()
        for r in range(runs):
            for target in TARGETS:
                work = tmp_path / f"run-{r}-{target}"
                if target == "node":
                    seconds = _node_run(folder, profile, work, empty_models, images)
                elif target == "node-no-fsync":
                    seconds = _node_run(folder, profile, work, empty_models, images, fsync=False)
                elif target == "pynetdicom-bare":
                    seconds = _bare_run(folder, profile, images)
                elif target == "storescp":
                    seconds = _storescp_run(folder, profile, work, images)
                else:
                    seconds = _orthanc_run(folder, profile, work, images)
                out.seconds[target].append(seconds)
                log(f"P1 run {r + 1}/{runs} {target}: {seconds:.2f} s, {images / seconds:.0f} images/s")
                shutil.rmtree(work, ignore_errors=True)
    return out


@dataclass
class ConcurrencyResult:
    senders: int
    images_each: int
    seconds: float
    rejected: int
    failed_senders: int
    journal_instances: int

    @property
    def expected(self) -> int:
        return self.senders * self.images_each

    @property
    def ok(self) -> bool:
        return not self.rejected and not self.failed_senders and self.journal_instances == self.expected


def concurrency(folders: list[Path], images_each: int, log=print) -> ConcurrencyResult:  # noqa: ANN001
    """All senders at once to one fresh node; counts what the journal holds afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench-p4-") as tmp:
        tmp_path = Path(tmp)
        profile = write_profile(folders[0], tmp_path / "storescu.cfg")
        empty_models = tmp_path / "no-models"
        empty_models.mkdir()
        with BenchNode(tmp_path / "node", models_dir=empty_models) as node:
            seconds, results = send_parallel(folders, profile, node.port, called_ae=node.ae_title)
            journal = node.journal()
            try:
                n = journal.counts()["instances"]["total"]
            finally:
                journal.close()
    rejected = sum("Association Rejected" in r.output for r in results)
    failed = sum(not r.ok for r in results)
    for r in results:
        if not r.ok:
            log(f"P4 sender failed (rc {r.returncode}): {(r.failures or [r.output[-500:]])[0]}")
    log(f"P4: {len(folders)} × {images_each} in {seconds:.2f} s; journal holds {n}")
    return ConcurrencyResult(len(folders), images_each, seconds, rejected, failed, n)
