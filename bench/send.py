"""Timed sends with dcmtk /usr/bin/storescu (TCP_NODELAY=1), one association per sender; and with a pynetdicom SCU
that opens one association per image (TCP_NODELAY on its sockets), as some modalities and forwarders do."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, evt

from dicom_node.reactor import waking_dul
from dicom_node.scp import nodelay_on_open
from tests.e2e.peers import (
    DCMTK_ENV,
    LOCALHOST,
    STORESCU,
    failed_stores,
    storescu_profile,
)

_PROFILE = "E2E"  # the profile name tests.e2e.peers.storescu_profile writes


@dataclass(frozen=True)
class Send:
    seconds: float
    returncode: int
    failures: list[str]
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.failures


def _args(folder: Path, profile: Path, port: int, called_ae: str, calling_ae: str) -> list[str]:
    return [str(STORESCU), "-aet", calling_ae, "-aec", called_ae, "-nh", "-xf", str(profile), _PROFILE,
            "+sd", "+r", LOCALHOST, str(port), str(folder)]


def write_profile(folder: Path, target: Path) -> Path:
    """The storescu association profile for the files in ``folder`` (built once, outside the timing)."""
    target.write_text(storescu_profile(sorted(p for p in folder.rglob("*") if p.is_file())))
    return target


def send(folder: Path, profile: Path, port: int, *, called_ae: str, calling_ae: str = "BENCH",
         timeout: float = 600) -> Send:
    """Send every file under ``folder`` in one association; wall time of the storescu process."""
    args = _args(folder, profile, port, called_ae, calling_ae)
    start = time.perf_counter()
    result = subprocess.run(args, env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout, check=False)
    seconds = time.perf_counter() - start
    return Send(seconds, result.returncode, failed_stores(result), result.stdout + result.stderr)


def send_parallel(folders: list[Path], profile: Path, port: int | Sequence[int], *, called_ae: str,
                  timeout: float = 600) -> tuple[float, list[Send]]:
    """One storescu per folder, all started at once, to ``port`` (or the i-th folder to the i-th of a port per
    folder); (wall time until the last ends, each result)."""
    ports = [port] * len(folders) if isinstance(port, int) else list(port)
    if len(ports) != len(folders):
        raise ValueError(f"{len(ports)} ports for {len(folders)} senders")
    start = time.perf_counter()
    procs = []
    for i, (folder, to) in enumerate(zip(folders, ports, strict=True)):
        args = _args(folder, profile, to, called_ae, f"BENCH{i}")
        procs.append((subprocess.Popen(args, env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True), time.perf_counter()))
    results = []
    for proc, started in procs:
        out, err = proc.communicate(timeout=timeout)
        completed = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        results.append(Send(time.perf_counter() - started, proc.returncode, failed_stores(completed), out + err))
    return time.perf_counter() - start, results


def send_per_image(files: list[Path], port: int, *, called_ae: str, calling_ae: str = "BENCH") -> Send:
    """Send each file in an association of its own, one after the other (pynetdicom, TCP_NODELAY, its reactor
    waiting for work instead of polling, as the node's dispatcher runs it); wall time of all of them."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                                     for ds in (dcmread(f, stop_before_pixels=True) for f in files)}):
        ae.add_requested_context(sop_class, syntax)
    failures: list[str] = []
    start = time.perf_counter()
    for path in files:
        assoc = ae.associate(LOCALHOST, port, ae_title=called_ae, evt_handlers=[(evt.EVT_CONN_OPEN, nodelay_on_open)])
        if not assoc.is_established:
            failures.append(f"{path.name}: association not established")
            continue
        waking_dul(assoc.dul)
        status = assoc.send_c_store(path)
        if getattr(status, "Status", None) != 0x0000:
            failures.append(f"{path.name}: status {getattr(status, 'Status', None)}")
        assoc.release()
    seconds = time.perf_counter() - start
    return Send(seconds, 0, failures, "\n".join(failures))
