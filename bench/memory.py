"""P3 memory: peak resident set (VmHWM) of the node process that processed a 256³ 1 mm series."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from .data import MEMORY_DESCRIPTION
from .models import MODEL_ID
from .node import BenchNode
from .send import send, write_profile

RULE = {"name": "bench-memory", "series_description": f"^{MEMORY_DESCRIPTION}$", "model": MODEL_ID,
        "output_name": "sT1MEM", "mr_acquisition_type": "3D", "image_type": ["ORIGINAL"]}


@dataclass(frozen=True)
class Memory:
    size: int             # voxels per axis of the input
    idle_kb: int          # VmHWM after start (models warm), before anything was received
    after_receive_kb: int
    peak_kb: int          # VmHWM after the job was written
    job_seconds: float
    outputs: int


def memory(series: Path, size: int, models_dir: Path, log=print) -> Memory:  # noqa: ANN001
    with tempfile.TemporaryDirectory(prefix="bench-p3-") as tmp:
        tmp_path = Path(tmp)
        profile = write_profile(series, tmp_path / "storescu.cfg")
        with BenchNode(tmp_path / "node", models_dir=models_dir, rules=[RULE]) as node:
            idle = node.status("VmHWM")
            sent = send(series, profile, node.port, called_ae=node.ae_title)
            if not sent.ok:
                raise RuntimeError(f"series not accepted: {sent.failures or sent.output[-2000:]}")
            received = node.status("VmHWM")

            def done(journal):  # noqa: ANN001, ANN202
                jobs = journal.jobs()
                return jobs[0] if jobs and jobs[0].state in ("sent", "failed") and jobs[0].timings else None

            job = node.wait_for(done, timeout=900, poll=0.5, what="memory job written")
            if job.state != "sent":
                raise RuntimeError(f"job {job.id} {job.state}: {job.reason}")
            peak = node.status("VmHWM")
            outputs = len(list((node.data_dir / "outputs").rglob("*.dcm")))
    result = Memory(size, idle, received, peak, job.timings["total"], outputs)
    log(f"P3: VmHWM idle {idle / 1024:.0f} MiB, after receive {received / 1024:.0f} MiB, "
        f"after processing {peak / 1024:.0f} MiB (job {job.timings['total']:.1f} s, {outputs} files)")
    return result
