"""P1 ingest (node vs dcmtk storescp vs Orthanc: one sender, 4 at once, and one association per image) and P4
concurrency (8 senders)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e.peers import Orthanc, StoreSCP, echoscu, free_port

from .node import REPO, BenchNode
from .send import Send, send, send_parallel, send_per_image, write_profile

TARGETS = ("node", "storescp", "orthanc", "orthanc-sync", "node-no-fsync", "node-synced-in-place", "pynetdicom-bare",
           "node-2-receivers")
#: The goal compares node and Orthanc; "orthanc-sync" is Orthanc with its default SyncStorageArea (fsync of each
#: file, as the node's fsync), "orthanc" without it (as the end-to-end tests run it); references: "node-no-fsync"
#: (what durability costs), "node-synced-in-place" (``[node] receipt_log = false``: the spool file, its directory
#: and the journal row each synced before the response, as before the receipt log) and "pynetdicom-bare" (a
#: pynetdicom SCP that keeps nothing: the ceiling of the library the node is built on). "node-2-receivers": two
#: ``serve --role receiver`` processes of one data directory sharing the port (``[node] reuse_port``), fsync on:
#: what more receiving processes give.
#: Senders at once in the concurrent part of P1.
SENDERS = 4
#: References of the concurrent part only: a receiving process per sender, each on a port of its own, sender i
#: sending to process i, the even spread no shared listener gives (``SO_REUSEPORT`` hashes connections; a pool of
#: processes behind one acceptor could at best match it). "node-process-each": ``serve --role receiver`` processes
#: of one data directory, fsync on, as "node-2-receivers"; "pynetdicom-bare-process-each": as many
#: "pynetdicom-bare" SCPs. What a multi-process layout could reach, and the library's own ceiling in it.
SPREAD_TARGETS = ("node-process-each", "pynetdicom-bare-process-each")
#: Receivers of the part of P1 where each image comes in an association of its own (what an association costs).
PER_IMAGE_TARGETS = ("node", "storescp", "orthanc", "orthanc-sync", "node-synced-in-place", "pynetdicom-bare")


@dataclass
class IngestResult:
    images: int  # per run, all senders together
    senders: int = 1
    targets: tuple[str, ...] = TARGETS
    seconds: dict[str, list[float]] = field(default_factory=dict)
    #: CPU seconds (user and system, every thread) the receiving processes used while the senders ran, per run
    cpu: dict[str, list[float]] = field(default_factory=dict)
    #: CPU seconds the whole machine was busy meanwhile (senders, receivers and the kernel's own threads), per run
    machine: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for target in self.targets:
            self.seconds.setdefault(target, [])
            self.cpu.setdefault(target, [])
            self.machine.setdefault(target, [])

    def rates(self, target: str) -> list[float]:
        return [self.images / s for s in self.seconds[target]]

    def cpu_ms(self, target: str) -> list[float]:
        """Receiving processes' CPU milliseconds per image, per run."""
        return [1000 * c / self.images for c in self.cpu[target]]

    def machine_ms(self, target: str) -> list[float]:
        """The machine's busy CPU milliseconds per image, per run."""
        return [1000 * c / self.images for c in self.machine[target]]


@dataclass(frozen=True)
class Measured:
    seconds: float  # wall time of the senders
    cpu: float  # CPU seconds of the receiving processes meanwhile
    machine: float  # busy CPU seconds of the whole machine meanwhile


def process_cpu(pids: Sequence[int]) -> float:
    """CPU seconds (user and system, all threads) the processes ``pids`` have used so far (Linux /proc)."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> float:
    """CPU seconds this machine's CPUs have worked since boot: user, nice, system, irq and softirq (not idle or
    waiting for I/O, and not steal: the hypervisor running other guests; guest time is already in user)."""
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in
                                                         Path("/proc/stat").read_text().split(None, 8)[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


#: How long the CPU reading waits for a receiver to finish what it does after the last response
SETTLE_WAIT_S = 10.0


def _measured(sender: Sender, port: int | Sequence[int], ae_title: str, pids: Sequence[int],
              settled: Callable[[], bool] | None = None) -> Measured:
    """Send, and what it cost the receiving processes ``pids`` and the machine: the seconds until the senders
    ended; the CPU also of what a receiver does after its last response (``settled``: it is done, e.g. the node's
    receipt segments synced and deleted), waited for up to SETTLE_WAIT_S."""
    cpu, machine = process_cpu(pids), machine_cpu()
    seconds = sender(port, ae_title)
    deadline = time.monotonic() + SETTLE_WAIT_S
    while settled is not None and not settled() and time.monotonic() < deadline:
        time.sleep(0.02)
    return Measured(seconds, process_cpu(pids) - cpu, machine_cpu() - machine)


def receipts_settled(data_dir: Path) -> Callable[[], bool]:
    """Whether the node has settled what it received: no receipt segment holding a record (the spare one is
    empty), so every spool file and journal row is synced."""
    def settled() -> bool:
        for segment in (data_dir / "receipts").glob("*.log"):
            try:
                if segment.stat().st_size:
                    return False
            except FileNotFoundError:
                continue
        return True
    return settled


class SyncOrthanc(Orthanc):
    """Orthanc as it ships: ``SyncStorageArea`` true (each stored file fsync'd)."""

    def config(self) -> dict[str, Any]:
        return {**super().config(), "SyncStorageArea": True}


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(what)


def _sent(results: list[Send], what: str) -> None:
    for result in results:
        _check(result.ok, f"{what}: storescu failed: {result.failures or result.output[-2000:]}")


#: (port, or a port per sender; called AE title) -> seconds; raises when a send failed
Sender = Callable[[int | Sequence[int], str], float]


def _sender(folders: list[Path], profile: Path) -> Sender:
    """One storescu for one folder, or one per folder at once (wall time until the last ends)."""
    def run(port: int | Sequence[int], ae_title: str) -> float:
        if len(folders) == 1:
            assert isinstance(port, int)
            result = send(folders[0], profile, port, called_ae=ae_title)
            _sent([result], ae_title)
            return result.seconds
        seconds, results = send_parallel(folders, profile, port, called_ae=ae_title)
        _sent(results, ae_title)
        return seconds
    return run


def _sender_per_image(folder: Path) -> Sender:
    """One pynetdicom SCU, one association per file."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())

    def run(port: int | Sequence[int], ae_title: str) -> float:
        assert isinstance(port, int)
        result = send_per_image(files, port, called_ae=ae_title)
        _check(result.ok, f"{ae_title}: per-image sends failed: {result.failures[:3]}")
        return result.seconds
    return run


def _node_run(sender: Sender, work: Path, empty_models: Path, images: int, *, fsync: bool = True,
              receipt_log: bool = True) -> Measured:
    with BenchNode(work / "node", models_dir=empty_models, node={"fsync": fsync, "receipt_log": receipt_log}) as node:
        measured = _measured(sender, node.port, node.ae_title, [node.pid], receipts_settled(node.data_dir))
        journal = node.journal()
        try:
            n = journal.counts()["instances"]["total"]
        finally:
            journal.close()
        _check(n == images, f"node journal holds {n} instances, {images} were sent")
    return measured


def _receivers_run(sender: Sender, work: Path, empty_models: Path, images: int, n: int = 2, *,
                   port_each: bool = False) -> Measured:
    """``n`` receiver processes of one data directory: sharing one port, or (``port_each``) each on its own, the
    i-th sender sending to the i-th."""
    ports = [free_port() for _ in range(n)] if port_each else [free_port()] * n
    nodes = [BenchNode(work / f"receiver-{i}", models_dir=empty_models, role="receiver", port=ports[i],
                       data_dir=work / "data", node={"reuse_port": not port_each}) for i in range(n)]
    try:
        for node in nodes:
            node.start()
        measured = _measured(sender, ports if port_each else ports[0], nodes[0].ae_title, [n.pid for n in nodes],
                             receipts_settled(work / "data"))
        journal = nodes[0].journal()
        try:
            stored = journal.counts()["instances"]["total"]
        finally:
            journal.close()
        _check(stored == images, f"the receivers' journal holds {stored} instances, {images} were sent")
    finally:
        for node in nodes:
            node.stop()
    return measured


def _storescp_run(sender: Sender, work: Path, images: int) -> Measured:
    with StoreSCP(work / "storescp") as scp:
        measured = _measured(sender, scp.port, scp.aet, [scp.pid])
        _check(len(scp.wait_for_files(images, timeout=30)) == images, "storescp file count")
    return measured


def _bare_run(sender: Sender, n: int = 1) -> Measured:
    """One bare pynetdicom SCP; or ``n``, each on its own port, the i-th sender sending to the i-th."""
    ports = [free_port() for _ in range(n)]
    processes = [subprocess.Popen([sys.executable, "-m", "bench.bare_scp", str(port), "BARE_SCP"], cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for port in ports]
    try:
        deadline = time.monotonic() + 30
        for port, process in zip(ports, processes, strict=True):
            while echoscu(port, called_ae="BARE_SCP", timeout=5).returncode != 0:
                _check(process.poll() is None and time.monotonic() < deadline, "bare pynetdicom SCP did not start")
                time.sleep(0.1)
        return _measured(sender, ports[0] if n == 1 else ports, "BARE_SCP", [p.pid for p in processes])
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)


def _orthanc_run(sender: Sender, work: Path, images: int, *, sync: bool) -> Measured:
    with (SyncOrthanc if sync else Orthanc)(workdir=work / "orthanc") as orthanc:
        measured = _measured(sender, orthanc.dicom_port, orthanc.aet, [orthanc.pid])
        # its statistics may lag its last Success by a moment (a run of 800 once read 799): asked again for 10 s
        deadline = time.monotonic() + 10
        while (n := int(orthanc.get("/statistics")["CountInstances"])) != images and time.monotonic() < deadline:
            time.sleep(0.2)
        _check(n == images, f"Orthanc holds {n} instances, {images} were sent")
    return measured


def _run(target: str, sender: Sender, work: Path, empty_models: Path, images: int, senders: int = 1) -> Measured:
    if target in ("node", "node-no-fsync", "node-synced-in-place"):
        return _node_run(sender, work, empty_models, images, fsync=target != "node-no-fsync",
                         receipt_log=target != "node-synced-in-place")
    if target == "node-2-receivers":
        return _receivers_run(sender, work, empty_models, images)
    if target == "node-process-each":
        return _receivers_run(sender, work, empty_models, images, senders, port_each=True)
    if target == "pynetdicom-bare":
        return _bare_run(sender)
    if target == "pynetdicom-bare-process-each":
        return _bare_run(sender, senders)
    if target == "storescp":
        return _storescp_run(sender, work, images)
    return _orthanc_run(sender, work, images, sync=target == "orthanc-sync")


def ingest(folders: list[Path], images_each: int, runs: int, log=print,  # noqa: ANN001
           per_image: bool = False) -> IngestResult:
    """``runs`` interleaved rounds over ``TARGETS``, each receiver fresh and empty every run; one storescu per
    folder, all at once. ``per_image``: the first folder's files, each in an association of its own (a pynetdicom
    SCU), to ``PER_IMAGE_TARGETS``."""
    if per_image:
        out = IngestResult(images_each, 1, targets=PER_IMAGE_TARGETS)
    else:
        out = IngestResult(images_each * len(folders), len(folders),
                           targets=TARGETS + SPREAD_TARGETS if len(folders) > 1 else TARGETS)
    what = "one association per image" if per_image else f"{len(folders)} sender(s)"
    with tempfile.TemporaryDirectory(prefix="bench-p1-") as tmp:
        tmp_path = Path(tmp)
        if per_image:
            sender = _sender_per_image(folders[0])
        else:
            sender = _sender(folders, write_profile(folders[0], tmp_path / "storescu.cfg"))
        empty_models = tmp_path / "no-models"
        empty_models.mkdir()
        for r in range(runs):
            order = list(out.targets)
            random.Random(r).shuffle(order)  # no receiver always after the same one (its unsynced writes)
            for target in order:
                work = tmp_path / f"run-{r}-{target}"
                measured = _run(target, sender, work, empty_models, out.images, out.senders)
                out.seconds[target].append(measured.seconds)
                out.cpu[target].append(measured.cpu)
                out.machine[target].append(measured.machine)
                log(f"P1 ({what}) run {r + 1}/{runs} {target}: {measured.seconds:.2f} s, "
                    f"{out.images / measured.seconds:.0f} images/s, CPU ms/image: receiver "
                    f"{1000 * measured.cpu / out.images:.2f}, machine {1000 * measured.machine / out.images:.2f}")
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
