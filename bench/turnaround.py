"""P2 turnaround: last scout instance received → derived objects acknowledged by Orthanc, per stage.

Every time comes from the node's own journal (one clock): instances.received_at, jobs.created_at,
jobs.timings (the job runner's stages) and jobs.updated_at when the outbox settled the job as sent.

The reference for queue+send, measured in the same run: the same derived objects sent by dcmtk's storescu to
another fresh Orthanc over one association (what this PACS takes to file them from the fastest sender at hand).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dicom_node.journal import JobRecord, Journal
from tests.e2e.peers import Orthanc

from .node import BenchNode
from .send import send, write_profile

#: Stages measured around the job; the job's own stages (its timings keys) come in between.
BEFORE_JOB, JOB_REST, AFTER_JOB = "assemble", "job (untimed: outbox rows, journal)", "queue+send"


@dataclass(frozen=True)
class Turnaround:
    seconds: float
    stages: dict[str, float]
    outputs: int
    orthanc_instances: int
    #: the same objects sent to a fresh Orthanc by /usr/bin/storescu, one association (the PACS's own floor)
    storescu_send: float
    #: [[destinations]] max_associations the node sent with
    associations: int = 1


def _sent_job(journal: Journal) -> JobRecord | None:
    jobs = journal.jobs()
    if jobs and jobs[0].state in ("sent", "failed") and jobs[0].timings:
        return jobs[0]
    return None


def breakdown(journal: Journal, job: JobRecord) -> tuple[float, dict[str, float], int]:
    """(turnaround seconds, stage seconds, outbox items) of a job that was sent."""
    series = journal.series(job.series_uid)
    assert series is not None
    last_received = series.last_received
    stages = {BEFORE_JOB: job.created_at - last_received}
    timed = {k: v for k, v in job.timings.items() if k != "total"}
    stages.update(timed)
    stages[JOB_REST] = job.timings["total"] - sum(timed.values())
    stages[AFTER_JOB] = job.updated_at - job.created_at - job.timings["total"]
    return job.updated_at - last_received, stages, len(journal.outbox(job.id))


def storescu_floor(journal: Journal, job: JobRecord, folder: Path) -> float:
    """Seconds /usr/bin/storescu takes to send ``job``'s derived objects (copied into ``folder``) to a fresh
    Orthanc over one association."""
    folder.mkdir(parents=True)
    for n, item in enumerate(journal.outbox(job.id)):
        shutil.copyfile(item.path, folder / f"{n:04d}.dcm")
    profile = write_profile(folder, folder.parent / f"{folder.name}.cfg")
    with Orthanc(workdir=folder.parent / f"{folder.name}-orthanc") as orthanc:
        sent = send(folder, profile, orthanc.dicom_port, called_ae=orthanc.aet, calling_ae="BENCH")
    if not sent.ok:
        raise RuntimeError(f"storescu reference send failed: {sent.failures or sent.output[-2000:]}")
    return sent.seconds


def _one_run(scout: Path, profile: Path, models_dir: Path, workdir: Path, associations: int) -> Turnaround:
    with Orthanc(workdir=workdir / "orthanc") as orthanc:
        pacs = {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port,
                "max_associations": associations}
        with BenchNode(workdir / "node", models_dir=models_dir, destinations=[pacs]) as node:
            sent = send(scout, profile, node.port, called_ae=node.ae_title, calling_ae="SCANNER")
            if not sent.ok:
                raise RuntimeError(f"scout not accepted: {sent.failures or sent.output[-2000:]}")
            job = node.wait_for(_sent_job, timeout=600, poll=0.25, what="job sent")
            if job.state != "sent":
                raise RuntimeError(f"job {job.id} {job.state}: {job.reason}")
            journal = node.journal()
            try:
                seconds, stages, outputs = breakdown(journal, job)
                in_orthanc = int(orthanc.get("/statistics")["CountInstances"])
                floor = storescu_floor(journal, job, workdir / "storescu")
            finally:
                journal.close()
    return Turnaround(seconds, stages, outputs, in_orthanc, floor, associations)


def turnaround(scout: Path, models_dir: Path, runs: int, log=print, associations: int = 1,  # noqa: ANN001
               ) -> list[Turnaround]:
    """``runs`` times: fresh Orthanc and node (default rules; the destination's ``max_associations``:
    ``associations``), send the scout, wait until sent; then the storescu reference."""
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-p2-") as tmp:
        tmp_path = Path(tmp)
        profile = write_profile(scout, tmp_path / "storescu.cfg")
        for r in range(runs):
            result = _one_run(scout, profile, models_dir, tmp_path / f"run-{r}", associations)
            results.append(result)
            log(f"P2 run {r + 1}/{runs}: {result.seconds:.1f} s, {result.outputs} objects, Orthanc holds "
                f"{result.orthanc_instances}; " + ", ".join(f"{k} {v:.2f}" for k, v in result.stages.items())
                + f"; storescu reference send {result.storescu_send:.2f}")
    return results
